"""The Transformer encoder blocks and the BERT encoder.

The book's blocks, with what the BERT paper's models add as options (all off by default):
a GELU activation, a LayerNorm (and dropout) after the summed embeddings, and the
LayerNorm epsilon. Options add no parameters where they are off, so the book's names
stay as they are.

Shape legend
    B: batch size   L: sequence length (<= max_len)   H: num_hiddens   F: ffn_num_hiddens
    T: real tokens of a packed batch (`gluon_bert.data.packing`)
"""
from __future__ import annotations

import mxnet as mx
from mxnet.gluon import nn

from .attention import MultiHeadAttention
from .layers import Dense, Dropout, Embedding, HybridSequential, LayerNorm, LegacyBoundary

__all__ = ['PositionWiseFFN', 'AddNorm', 'TransformerEncoderBlock', 'BERTEncoder',
           'activation_dense', 'apply_activation']


def activation_dense(units, in_units, activation):
    """A Dense layer for `activation`: relu and tanh are fused into the layer as the book
    has them; gelu (not one of MXNet's Activation types) is applied after it by
    `apply_activation`, so that the parameter names are the same for both."""
    fused = activation if activation in ('relu', 'tanh') else None
    return Dense(units, flatten=False, activation=fused, in_units=in_units)


def apply_activation(F, X, activation):
    """The part of `activation` that `activation_dense` does not fuse."""
    if activation == 'gelu':
        return F.LeakyReLU(X, act_type='gelu')  # x * Phi(x), the erf form BERT uses
    return X


class PositionWiseFFN(LegacyBoundary, nn.HybridBlock):
    """Two dense layers applied to every position: (B, L, H) -> (B, L, F) -> (B, L, H)."""

    def __init__(self, ffn_num_hiddens, ffn_num_outputs, activation='relu', **kwargs):
        super().__init__(**kwargs)
        self._activation = activation
        with self.name_scope():
            # The block is residual: its input has ffn_num_outputs features too.
            self.dense1 = activation_dense(ffn_num_hiddens, ffn_num_outputs, activation)
            self.dense2 = Dense(ffn_num_outputs, flatten=False, in_units=ffn_num_hiddens)

    def hybrid_forward(self, F, X):
        return self.dense2(apply_activation(F, self.dense1(X), self._activation))


class AddNorm(LegacyBoundary, nn.HybridBlock):
    """Residual connection followed by layer normalization: ln(dropout(Y) + X)."""

    def __init__(self, dropout, num_features=0, eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.dropout = Dropout(dropout)
            self.ln = LayerNorm(in_channels=num_features, epsilon=eps)

    def hybrid_forward(self, F, X, Y):
        return self.ln(self.dropout(Y) + X)


class TransformerEncoderBlock(LegacyBoundary, nn.HybridBlock):
    """Post-LN Transformer encoder block, as in the book and the BERT paper."""

    def __init__(self, num_hiddens, ffn_num_hiddens, num_heads, dropout, use_bias=False,
                 activation='relu', eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias)
            self.addnorm1 = AddNorm(dropout, num_hiddens, eps)
            self.ffn = PositionWiseFFN(ffn_num_hiddens, num_hiddens, activation)
            self.addnorm2 = AddNorm(dropout, num_hiddens, eps)

    def hybrid_forward(self, F, X, valid_lens=None, unpack=None, pack=None, rows=None):
        # X (B, L, H), or packed (T, H) with unpack and pack (BERTEncoder.encode_packed).
        # Packed, `rows` (R,) asks for the output at those rows only: every row still gives
        # its keys and values, but the output projection, the FFN and both LayerNorms run
        # on the R rows (the last block, under heads that read a few positions).
        A = self.attention(X, X, X, valid_lens, unpack, pack, rows)  # like X, or (R, H)
        if rows is not None:
            X = F.take(X, rows)                                       # (T, H) -> (R, H)
        Y = self.addnorm1(X, A)
        return self.addnorm2(Y, self.ffn(Y))                          # like X, or (R, H)

    def first_position(self, F, X, valid_lens=None):
        """The block's output at position 0 only (what a classifier reads): X (B, L, H) ->
        (B, 1, H). Every position still gives its keys and values; the query, output
        projection, FFN and LayerNorms run on one row per example. Called inside a parent
        block's hybrid_forward with its F."""
        Q = F.slice_axis(X, axis=1, begin=0, end=1)                  # (B, L, H) -> (B, 1, H)
        Y = self.addnorm1(Q, self.attention(Q, X, X, valid_lens))   # (B, 1, H)
        return self.addnorm2(Y, self.ffn(Y))                         # (B, 1, H)


class BERTEncoder(LegacyBoundary, nn.HybridBlock):
    """Token + segment + learnable positional embeddings, then `num_blks` encoder blocks.

    `embedding_norm=True` (BERT) normalises the summed embeddings (`embedding_ln`) and
    applies dropout to them before the first block; the book feeds the sum as it is.
    """

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=1000, activation='relu', embedding_norm=False, eps=1e-5, **kwargs):
        super().__init__(**kwargs)
        self.max_len = max_len
        self._embedding_norm = embedding_norm
        with self.name_scope():
            self.token_embedding = Embedding(vocab_size, num_hiddens)
            self.segment_embedding = Embedding(2, num_hiddens)
            if embedding_norm:
                self.embedding_ln = LayerNorm(in_channels=num_hiddens, epsilon=eps)
                self.embedding_dropout = Dropout(dropout)
            self.blks = HybridSequential()
            for _ in range(num_blks):
                # BERT's attention projections have biases (use_bias=True), as in the book.
                self.blks.add(TransformerEncoderBlock(num_hiddens, ffn_num_hiddens, num_heads,
                                                      dropout, True, activation, eps))
            # Positional embeddings are learned in BERT; long enough for any allowed input.
            self.pos_embedding = self.params.get('pos_embedding', shape=(1, max_len, num_hiddens))

    @classmethod
    def from_config(cls, c):
        return cls(c.vocab_size, c.num_hiddens, c.ffn_num_hiddens, c.num_heads, c.num_blks,
                   c.dropout, c.max_len, c.activation, c.embedding_norm, c.layer_norm_eps)

    def hybrid_forward(self, F, tokens, segments, valid_lens=None, pos_embedding=None):
        X = self._embed(F, tokens, segments, pos_embedding)                  # (B, L, H)
        for blk in self.blks:
            X = blk(X, valid_lens)
        return X

    def encode_first(self, F, tokens, segments, valid_lens=None):
        """The encoder's output at position 0 (<cls>) only: (B, L) inputs -> (B, H), the
        row that `forward` gives at position 0 of its (B, L, H) output. The last block
        computes that one row (`TransformerEncoderBlock.first_position`): a classifier
        reads nothing else. Called inside a parent block's hybrid_forward with its F."""
        table = self.pos_embedding.var() if F is mx.sym else \
            self.pos_embedding.data(tokens.context)
        X = self._embed(F, tokens, segments, table)                          # (B, L, H)
        blks = [self.blks[i] for i in range(len(self.blks))]
        for blk in blks[:-1]:
            X = blk(X, valid_lens)
        X = blks[-1].first_position(F, X, valid_lens)                        # (B, 1, H)
        return F.reshape(X, shape=(0, -1))                                    # (B, 1, H) -> (B, H)

    def _embed(self, F, tokens, segments, pos_embedding):
        """The summed embeddings of a padded batch: (B, L) -> (B, L, H)."""
        X = self.token_embedding(tokens) + self.segment_embedding(segments)  # (B, L, H)
        # The first L rows of the positional table: (1, max_len, H) -> (1, L, H)
        pos = F.slice_like(pos_embedding, X, axes=(1,))
        # Added to every example through a product with ones, (B, 1) . (1, L*H), so that
        # its gradient is a matrix product too: the backward of broadcast_add, a reduction
        # over the batch axis, took 50-85 ms a step on the CPU.
        # (the ones are made from the token ids, which carry no gradient)
        first = F.slice_axis(tokens, axis=1, begin=0, end=1)                 # (B, 1)
        ones = F.cast(F.ones_like(first), 'float32')                          # (B, 1)
        pos = F.dot(ones, F.reshape(pos, shape=(1, -1)))                      # (B, L*H)
        X = X + F.reshape_like(pos, X)                                        # (B, L, H)
        if self._embedding_norm:
            X = self.embedding_dropout(self.embedding_ln(X))                  # (B, L, H)
        return X

    def encode_packed(self, F, tokens, segments, positions, valid_lens, unpack, pack,
                      rows=None):
        """The encoder on a packed batch (`gluon_bert.data.packing`): every per-token layer
        (embeddings, projections, FFN, LayerNorm, dropout) runs on the T real tokens only
        (the attention: `MultiHeadAttention`). tokens, segments, positions, pack (T,),
        valid_lens (B,), unpack (B, L) -> (T, H): the rows that `forward` gives at the real
        positions of its (B, L, H) output. With `rows` (R,), the packed rows that the heads
        read, the last block computes those rows only -> (R, H) (`TransformerEncoderBlock`).

        Called inside a parent block's hybrid_forward (`step.PretrainObjective`) with its F."""
        table = self.pos_embedding.var() if F is mx.sym else \
            self.pos_embedding.data(tokens.context)
        table = F.reshape(table, shape=(-3, 0))                  # (1, max_len, H) -> (max_len, H)
        X = self.token_embedding(tokens) + self.segment_embedding(segments)   # (T, H)
        X = X + F.take(table, positions)                                      # (T, H)
        if self._embedding_norm:
            X = self.embedding_dropout(self.embedding_ln(X))                  # (T, H)
        last = len(self.blks) - 1
        for i in range(len(self.blks)):
            X = self.blks[i](X, valid_lens, unpack, pack, rows if i == last else None)
        return X                                                 # (T, H), or (R, H) with rows
