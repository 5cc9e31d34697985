"""The Transformer encoder blocks and the BERT encoder.

Shape legend
    B: batch size   L: sequence length (<= max_len)   H: num_hiddens   F: ffn_num_hiddens
"""
from __future__ import annotations

from mxnet.gluon import nn

from .attention import MultiHeadAttention
from .layers import Dense, Dropout, Embedding, HybridSequential, LayerNorm, LegacyBoundary

__all__ = ['PositionWiseFFN', 'AddNorm', 'TransformerEncoderBlock', 'BERTEncoder']


class PositionWiseFFN(LegacyBoundary, nn.HybridBlock):
    """Two dense layers applied to every position: (B, L, H) -> (B, L, F) -> (B, L, H)."""

    def __init__(self, ffn_num_hiddens, ffn_num_outputs, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            # The block is residual: its input has ffn_num_outputs features too.
            self.dense1 = Dense(ffn_num_hiddens, flatten=False, activation='relu',
                                in_units=ffn_num_outputs)
            self.dense2 = Dense(ffn_num_outputs, flatten=False, in_units=ffn_num_hiddens)

    def hybrid_forward(self, F, X):
        return self.dense2(self.dense1(X))


class AddNorm(LegacyBoundary, nn.HybridBlock):
    """Residual connection followed by layer normalization: ln(dropout(Y) + X)."""

    def __init__(self, dropout, num_features=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.dropout = Dropout(dropout)
            self.ln = LayerNorm(in_channels=num_features)

    def hybrid_forward(self, F, X, Y):
        return self.ln(self.dropout(Y) + X)


class TransformerEncoderBlock(LegacyBoundary, nn.HybridBlock):
    """Post-LN Transformer encoder block, as in the book and the BERT paper."""

    def __init__(self, num_hiddens, ffn_num_hiddens, num_heads, dropout, use_bias=False,
                 **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout, use_bias)
            self.addnorm1 = AddNorm(dropout, num_hiddens)
            self.ffn = PositionWiseFFN(ffn_num_hiddens, num_hiddens)
            self.addnorm2 = AddNorm(dropout, num_hiddens)

    def hybrid_forward(self, F, X, valid_lens=None):
        Y = self.addnorm1(X, self.attention(X, X, X, valid_lens))  # (B, L, H)
        return self.addnorm2(Y, self.ffn(Y))                       # (B, L, H)


class BERTEncoder(LegacyBoundary, nn.HybridBlock):
    """Token + segment + learnable positional embeddings, then `num_blks` encoder blocks."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=1000, **kwargs):
        super().__init__(**kwargs)
        self.max_len = max_len
        with self.name_scope():
            self.token_embedding = Embedding(vocab_size, num_hiddens)
            self.segment_embedding = Embedding(2, num_hiddens)
            self.blks = HybridSequential()
            for _ in range(num_blks):
                # BERT's attention projections have biases (use_bias=True), as in the book.
                self.blks.add(TransformerEncoderBlock(num_hiddens, ffn_num_hiddens, num_heads,
                                                      dropout, True))
            # Positional embeddings are learned in BERT; long enough for any allowed input.
            self.pos_embedding = self.params.get('pos_embedding', shape=(1, max_len, num_hiddens))

    def hybrid_forward(self, F, tokens, segments, valid_lens=None, pos_embedding=None):
        X = self.token_embedding(tokens) + self.segment_embedding(segments)  # (B, L, H)
        # The first L rows of the positional table: (1, max_len, H) -> (1, L, H)
        pos = F.slice_like(pos_embedding, X, axes=(1,))
        X = F.broadcast_add(X, pos)                                           # (B, L, H)
        for blk in self.blks:
            X = blk(X, valid_lens)
        return X
