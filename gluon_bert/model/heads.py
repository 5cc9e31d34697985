"""The two pretraining heads: masked language model and next sentence prediction.

Shape legend
    B: batch size   L: sequence length   H: num_hiddens   P: predictions per example
    V: vocabulary size
"""
from __future__ import annotations

from mxnet.gluon import nn

from .layers import Dense, HybridSequential, LayerNorm, LegacyBoundary

__all__ = ['MaskLM', 'NextSentencePred']


class MaskLM(LegacyBoundary, nn.HybridBlock):
    """Predicts the original tokens at `pred_positions` from the encoded sequence."""

    def __init__(self, vocab_size, num_hiddens, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.mlp = HybridSequential()
            self.mlp.add(Dense(num_hiddens, flatten=False, activation='relu',
                               in_units=num_hiddens))
            self.mlp.add(LayerNorm(in_channels=num_hiddens))
            self.mlp.add(Dense(vocab_size, flatten=False, in_units=num_hiddens))

    def hybrid_forward(self, F, X, pred_positions):
        positions = F.cast(pred_positions, 'int32')                           # (B, P)
        # The example index of every prediction: (B,) -> (B, 1) -> (B, P)
        batch_idx = F.cast(F.contrib.arange_like(positions, axis=0), 'int32')
        batch_idx = F.broadcast_like(F.expand_dims(batch_idx, axis=-1), positions)
        # gather_nd indices (2, B, P) pick X[b, pred_positions[b, p]] -> (B, P, H)
        masked_X = F.gather_nd(X, F.stack(batch_idx, positions, axis=0))
        return self.mlp(masked_X)                                             # (B, P, V)


class NextSentencePred(LegacyBoundary, nn.HybridBlock):
    """Two-way classifier of whether the second sentence follows the first."""

    def __init__(self, num_inputs=0, **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.output = Dense(2, in_units=num_inputs)

    def hybrid_forward(self, F, X):
        return self.output(X)  # (B, H) -> (B, 2)
