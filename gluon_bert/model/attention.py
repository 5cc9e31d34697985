"""Multi-head scaled dot-product self-attention with a length mask.

Shape legend
    B: batch size            L: sequence length of the keys and values
    Lq: of the queries (L in self-attention, 1 where only <cls> is read)
    H: num_hiddens           h: num_heads          d = H / h: size of one head
    T: real tokens of a packed batch (`gluon_bert.data.packing`)
"""
from __future__ import annotations

import math

from mxnet import autograd
from mxnet.gluon import nn

from .. import kernels
from .layers import Dense, Dropout, LegacyBoundary

__all__ = ['masked_softmax', 'MultiHeadAttention']


def masked_softmax(F, scores, valid_lens):
    """Softmax over the last axis of `scores` that ignores keys at positions >= valid_len.

    scores: (B*h, Lq, L); valid_lens: (B*h,) or None. Masked keys get probability 0: they
    get -1e6 added before the softmax, as the book writes -1e6 over them, and exp(-1e6)
    is exactly 0 in float32. (MXNet's own `softmax(..., use_length=True)` gives the same
    numbers but runs at a quarter of the speed of the plain softmax on the CPU: 105 ms
    against 24 + 8 ms at (512, 128, 128).) The mask is a constant of the data: no gradient.
    """
    if valid_lens is None:
        return F.softmax(scores, axis=-1)
    # key positions: (B*h, Lq, L) -> (L,) -> (1, 1, L); lengths: (B*h,) -> (B*h, 1, 1)
    keys = F.reshape(F.contrib.arange_like(scores, axis=-1), shape=(1, 1, -1))
    lengths = F.reshape(valid_lens, shape=(-1, 1, 1))
    bias = (F.broadcast_lesser(keys, lengths) - 1) * 1e6        # (B*h, 1, L): 0 or -1e6
    # Broadcast first, then an elementwise add: the backward of broadcast_add reduces over
    # the rows for its second input even when no gradient is wanted there (30 ms a call).
    bias = F.BlockGrad(F.broadcast_like(bias, scores))           # (B*h, 1, L) -> (B*h, Lq, L)
    return F.softmax(scores + bias, axis=-1)                      # (B*h, Lq, L)


class MultiHeadAttention(LegacyBoundary, nn.HybridBlock):
    """The book's `MultiHeadAttention` (self-attention form used by BERT).

    Parameters W_q, W_k, W_v, W_o keep the book's names. The book's inner
    `DotProductAttention` only holds a dropout, which lives here directly.
    """

    def __init__(self, num_hiddens, num_heads, dropout, use_bias=False, **kwargs):
        super().__init__(**kwargs)
        if num_hiddens % num_heads:
            raise ValueError(f'num_hiddens {num_hiddens} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self._scale = 1.0 / math.sqrt(num_hiddens // num_heads)
        with self.name_scope():
            # Input sizes are given (self-attention: num_hiddens in, num_hiddens out) so
            # that parameters exist right after initialize(), before any forward pass.
            dense = dict(use_bias=use_bias, flatten=False, in_units=num_hiddens)
            self.W_q = Dense(num_hiddens, **dense)
            self.W_k = Dense(num_hiddens, **dense)
            self.W_v = Dense(num_hiddens, **dense)
            self.W_o = Dense(num_hiddens, **dense)
            self.dropout = Dropout(dropout)

    def _split_heads(self, F, X):
        # (B, L, H) -> (B, L, h, d)
        X = F.reshape(X, shape=(0, 0, self.num_heads, -1))
        # (B, L, h, d) -> (B, h, L, d)
        X = F.transpose(X, axes=(0, 2, 1, 3))
        # (B, h, L, d) -> (B*h, L, d)
        return F.reshape(X, shape=(-3, -2))

    def _merge_heads(self, F, X):
        # (B*h, L, d) -> (B, h, L, d)
        X = F.reshape(X, shape=(-4, -1, self.num_heads, -2))
        # (B, h, L, d) -> (B, L, h, d)
        X = F.transpose(X, axes=(0, 2, 1, 3))
        # (B, L, h, d) -> (B, L, H)
        return F.reshape(X, shape=(0, 0, -1))

    def hybrid_forward(self, F, queries, keys, values, valid_lens=None, unpack=None,
                       pack=None, rows=None):
        """(B, Lq, H) queries, (B, L, H) keys and values -> (B, Lq, H); packed (T, H)
        inputs -> (T, H) with `unpack` (B, L) and `pack` (T,) from `data.packing`: the
        projections run on the T real tokens only, the attention on each sequence's own
        rows (`gb_attention`, CPU) or elsewhere on the padded (B, L) layout. Packed,
        `rows` (R,) keeps those rows only before the output projection -> (R, H)."""
        k, v = self.W_k(keys), self.W_v(values)                         # (B, L, H) or (T, H)
        if unpack is not None and kernels.use_here(k):
            # On the CPU gluon-bert's `gb_attention` reads the packed rows as they are: each
            # sequence attends to its own rows, so neither padding nor mask nor head
            # transposes cost anything. The dropout on the weights is drawn inside it.
            # With `rows`, queries are projected and attend at those rows only.
            rate = self.dropout._rate if autograd.is_training() else 0.0
            opts = dict(num_heads=self.num_heads, alpha=self._scale, p=rate)
            q = self.W_q(queries if rows is None else F.take(queries, rows))  # (T or R, H)
            f32 = [kernels.float32(F, x) for x in (q, k, v, valid_lens)]
            if rows is not None:
                f32.append(F.cast(rows, dtype='float32'))  # the kernel reads float32 rows
                opts['query_rows'] = True
            return self.W_o(F.gb_attention(*f32, **opts)[0])                # (T, H) or (R, H)
        q = self.W_q(queries)                                               # (B, Lq, H) or (T, H)
        if unpack is not None:
            # packed rows to the padded layout: (T, H) -> (B, L, H)
            q, k, v = (F.take(x, unpack) for x in (q, k, v))
        q = self._split_heads(F, q)  # (B*h, Lq, d)
        k = self._split_heads(F, k)  # (B*h, L, d)
        v = self._split_heads(F, v)  # (B*h, L, d)
        if valid_lens is not None:
            # Each example's length once per head, in the (B, h) order of _split_heads.
            valid_lens = F.repeat(valid_lens, repeats=self.num_heads, axis=0)  # (B*h,)
        # Scaled after the product, as the book does.
        scores = self._bmm(F, q, k, transpose_b=True, alpha=self._scale)  # (B*h, Lq, L)
        weights = masked_softmax(F, scores, valid_lens)                     # (B*h, Lq, L)
        output = self._bmm(F, self.dropout(weights), v)                     # (B*h, Lq, d)
        output = self._merge_heads(F, output)                               # (B, Lq, H)
        if pack is not None:
            # back to the real tokens: (B, L, H) -> (B*L, H) -> (T, H)
            output = F.take(F.reshape(output, shape=(-3, 0)), pack)
            if rows is not None:
                output = F.take(output, rows)                               # (T, H) -> (R, H)
        return self.W_o(output)                                   # (B, Lq, H), (T, H) or (R, H)

    @staticmethod
    def _bmm(F, a, b, transpose_b=False, alpha=1.0):
        """alpha * a . b (or . b^T) per batch item: (N, M, K) x (N, K, P) -> (N, M, P).

        On the CPU gluon-bert's `gb_bmm` kernel: MXNet's `batch_dot` calls OpenBLAS once
        per (L, d) matrix and runs at a third to a fifth of its speed there."""
        if kernels.use_here(a):
            return F.gb_bmm(kernels.float32(F, a), kernels.float32(F, b),
                            transpose_b=transpose_b, alpha=alpha)
        out = F.batch_dot(a, b, transpose_b=transpose_b)
        return out * alpha if alpha != 1.0 else out
