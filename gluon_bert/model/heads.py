"""The two pretraining heads: masked language model and next sentence prediction.

Shape legend
    B: batch size   L: sequence length   H: num_hiddens   P: predictions per example
    V: vocabulary size
"""
from __future__ import annotations

from mxnet.gluon import nn

from .encoder import activation_dense, apply_activation
from .layers import Dense, HybridSequential, LayerNorm, LegacyBoundary

__all__ = ['MaskLM', 'NextSentencePred', 'TiedOutput']


class TiedOutput(LegacyBoundary, nn.HybridBlock):
    """The MLM decoder of BERT: the token embedding as output weights, and a bias of its own.

    (B, P, H) x (V, H) -> (B, P, V). The weight is an input, not a parameter: it is the
    encoder's `token_embedding.weight`, under that one name only.
    """

    def __init__(self, vocab_size, **kwargs):
        super().__init__(**kwargs)
        self._vocab_size = vocab_size
        with self.name_scope():
            self.bias = self.params.get('bias', shape=(vocab_size,), init='zeros')

    def hybrid_forward(self, F, X, weight, bias=None):
        return F.FullyConnected(X, weight, bias, num_hidden=self._vocab_size, flatten=False)


class MaskLM(LegacyBoundary, nn.HybridBlock):
    """Predicts the original tokens at `pred_positions` from the encoded sequence.

    `mlp` is the book's (dense, LayerNorm, dense to V); with `tied=True` (BERT) its last
    layer is a `TiedOutput`, called with the token embedding (`embedding_weight`).
    """

    def __init__(self, vocab_size, num_hiddens, activation='relu', eps=1e-5, tied=False,
                 **kwargs):
        super().__init__(**kwargs)
        self._activation = activation
        self._tied = tied
        with self.name_scope():
            self.mlp = HybridSequential()
            self.mlp.add(activation_dense(num_hiddens, num_hiddens, activation))
            self.mlp.add(LayerNorm(in_channels=num_hiddens, epsilon=eps))
            self.mlp.add(TiedOutput(vocab_size) if tied else
                         Dense(vocab_size, flatten=False, in_units=num_hiddens))

    def hybrid_forward(self, F, X, pred_positions, embedding_weight=None):
        positions = F.cast(pred_positions, 'int32')                           # (B, P)
        # The example index of every prediction: (B,) -> (B, 1) -> (B, P)
        batch_idx = F.cast(F.contrib.arange_like(positions, axis=0), 'int32')
        batch_idx = F.broadcast_like(F.expand_dims(batch_idx, axis=-1), positions)
        # gather_nd indices (2, B, P) pick X[b, pred_positions[b, p]] -> (B, P, H)
        masked_X = F.gather_nd(X, F.stack(batch_idx, positions, axis=0))
        return self.decode(F, masked_X, embedding_weight)                     # (B, P, V)

    def decode(self, F, masked_X, embedding_weight=None):
        """The head on gathered hidden states: (..., H) -> (..., V). The packed pretraining
        objective calls it on the real predictions only (`data.packing`)."""
        dense, ln, output = self.mlp[0], self.mlp[1], self.mlp[2]
        Y = ln(apply_activation(F, dense(masked_X), self._activation))        # (..., H)
        if self._tied:
            return output(Y, embedding_weight)                                # (..., V)
        return output(Y)                                                      # (..., V)


class NextSentencePred(LegacyBoundary, nn.HybridBlock):
    """Two-way classifier of whether the second sentence follows the first."""

    def __init__(self, num_inputs=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.output = Dense(2, in_units=num_inputs)

    def hybrid_forward(self, F, X):
        return self.output(X)  # (B, H) -> (B, 2)
