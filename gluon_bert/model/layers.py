"""The boundary between the book's `mxnet.numpy` world and our legacy-operator graphs.

Why the model is written with the legacy operator API (`hybrid_forward(self, F, ...)`
with `F.*` ops): MXNet 1.9.1's mixed precision (`mxnet.contrib.amp`) rewrites only
legacy operators. On the numpy interface `amp.init()` silently changes nothing and
`amp.init_trainer()` fails. The book, however, calls `npx.set_np()` and passes
`mxnet.numpy` arrays. So every block of this package:

* runs its graph, and creates, loads and saves its parameters, with numpy semantics
  switched off (`legacy_scope()`), whatever the caller's global mode is;
* accepts `mxnet.numpy` arrays and hands `mxnet.numpy` arrays back when the caller is
  in numpy mode, and plain `NDArray`s otherwise.

The conversions are shallow (`as_nd_ndarray` / `as_np_ndarray` share memory and
autograd history), so gradients flow through the boundary unchanged.
"""
from __future__ import annotations

import contextlib
import math

import mxnet as mx
from mxnet import autograd
from mxnet.gluon import nn
from mxnet.util import is_np_array, np_array, np_shape

from .. import kernels

__all__ = ['legacy_scope', 'LegacyBoundary', 'Dense', 'LayerNorm', 'Embedding', 'Dropout',
           'HybridSequential', 'to_legacy', 'to_numpy']


@contextlib.contextmanager
def legacy_scope():
    """Switch off numpy array and shape semantics inside the block."""
    with np_array(False), np_shape(False):
        yield


def _convert(obj, fn):
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert(o, fn) for o in obj)
    if isinstance(obj, mx.nd.NDArray):
        return fn(obj)
    return obj


def to_legacy(obj):
    """`mxnet.numpy` arrays (also inside lists/tuples) -> legacy NDArrays, shallowly."""
    return _convert(obj, lambda a: a.as_nd_ndarray() if isinstance(a, mx.np.ndarray) else a)


def to_numpy(obj):
    """Legacy NDArrays (also inside lists/tuples) -> `mxnet.numpy` arrays, shallowly."""
    return _convert(obj, lambda a: a if isinstance(a, mx.np.ndarray) else a.as_np_ndarray())


class LegacyBoundary:
    """Mixin for HybridBlocks: numpy-mode callers in, legacy graph inside.

    Put it first in the bases so that its methods wrap Gluon's.
    """

    def __call__(self, *args):
        # The device of the arrays decides which kernels the graph takes (gluon-bert's CPU
        # kernels, or MXNet's operators elsewhere); symbols (inside a graph being built)
        # leave the outer call's choice alone.
        device = next((a.context.device_type for a in args if isinstance(a, mx.nd.NDArray)),
                      None)
        # A hybridized block caches one graph per pattern of omitted (None) inputs, e.g.
        # BERTModel with and without pred_positions, per device type and per mode
        # (training or not: see Dropout): rebuild when the pattern changes.
        pattern = (tuple(a is None for a in args), device or kernels.current_device(),
                   autograd.is_training())
        if getattr(self, '_active', False) and getattr(self, '_none_pattern', pattern) != pattern:
            self._clear_cached_op()
        self._none_pattern = pattern
        with kernels.device_scope(pattern[1]):
            if not is_np_array():  # already inside a legacy graph (or a legacy caller)
                return super().__call__(*args)
            with legacy_scope():
                out = super().__call__(*to_legacy(args))
        return to_numpy(out)

    # Parameters are created, loaded and saved as legacy NDArrays in every mode, so that
    # the legacy operators of the graph can take them.
    def initialize(self, *args, **kwargs):
        with legacy_scope():
            return super().initialize(*args, **kwargs)

    def load_parameters(self, *args, **kwargs):
        # A .params file records whether it was written with numpy shape semantics and
        # MXNet refuses to read it in the other mode: the book's checkpoints (and ours) are
        # numpy-shape files, a legacy Gluon program writes the other kind. Read either.
        try:
            with np_array(False), np_shape(True):
                return super().load_parameters(*args, **kwargs)
        except mx.base.MXNetError as err:
            if 'np shape semantics' not in str(err):
                raise
        with legacy_scope():
            return super().load_parameters(*args, **kwargs)

    def save_parameters(self, *args, **kwargs):
        # Written with numpy shape semantics, like the book's checkpoints, so that the
        # book's `load_parameters` (under npx.set_np()) reads ours.
        with np_array(False), np_shape(True):
            return super().save_parameters(*args, **kwargs)

    def hybridize(self, *args, **kwargs):
        with legacy_scope():
            return super().hybridize(*args, **kwargs)

    def export(self, *args, **kwargs):
        with legacy_scope():
            return super().export(*args, **kwargs)

    def cast(self, *args, **kwargs):
        with legacy_scope():
            return super().cast(*args, **kwargs)


class Dense(LegacyBoundary, nn.Dense):
    """`nn.Dense` usable from numpy-mode code (e.g. the book's new classifier output)."""


class LayerNorm(LegacyBoundary, nn.LayerNorm):
    """`nn.LayerNorm` over the last axis (same parameters, `gamma` and `beta`), with a fast
    backward pass on the CPU.

    MXNet 1.9.1's `LayerNorm` operator has a fast forward but a slow backward on the CPU:
    its reductions over the leading axes (for the gradients of gamma and beta) run at
    about 1 GB/s; at the book's pretraining batch each LayerNorm's backward took 140 ms,
    21% of the step. On the CPU this takes gluon-bert's `gb_layer_norm` kernel (11-15 ms
    forward and backward there; `gluon_bert.kernels`). Where the kernels are not available,
    every reduction and every broadcast is a `dot` with a vector of ones, so both passes
    are matrix products and elementwise operators (85 ms). Both compute in float32 under
    mixed precision, so the statistics keep full precision."""

    def hybrid_forward(self, F, data, gamma, beta):
        if kernels.use_here(data):
            return F.gb_layer_norm(kernels.float32(F, data), gamma, beta, eps=self._epsilon)
        return self._composite(F, data, gamma, beta)

    def _composite(self, F, data, gamma, beta):
        H = self.gamma.shape[0]  # in_channels: every LayerNorm of the package gives it
        # constants made from gamma (amp cannot wrap an operator without inputs)
        ones_row = F.reshape(F.ones_like(gamma), shape=(1, H))      # (H,) -> (1, H)
        mean_w = F.reshape(ones_row, shape=(H, 1)) / H              # (1, H) -> (H, 1)
        # (..., H) . (H, 1) -> (..., 1): the mean; (..., 1) . (1, H) -> (..., H): broadcast
        centered = data - F.dot(F.dot(data, mean_w), ones_row)      # (..., H)
        # centered / sqrt(var + eps) = sqrt(H) * centered / sqrt(sum(centered^2) + H * eps):
        # L2Normalization (one fused operator each way) over the last axis of (rows, H)
        rows = F.reshape(centered, shape=(-1, H))                   # (..., H) -> (rows, H)
        unit = F.L2Normalization(rows, mode='instance', eps=H * self._epsilon)
        normed = F.reshape_like(unit, centered)                     # (rows, H) -> (..., H)
        # gamma and beta broadcast by (..., 1) . (1, H): their gradients are matrix
        # products over all rows, not slow reductions; sqrt(H) rides on the ones
        # (the ones come through BlockGrad: no gradient flows back along them)
        ones = F.ones_like(F.slice_axis(F.BlockGrad(data), axis=-1, begin=0, end=1))  # (..., 1)
        scale = F.dot(ones * math.sqrt(H), F.reshape(gamma, shape=(1, H)))  # (..., H)
        shift = F.dot(ones, F.reshape(beta, shape=(1, H)))                  # (..., H)
        return normed * scale + shift


class Embedding(LegacyBoundary, nn.Embedding):
    pass


class Dropout(LegacyBoundary, nn.Dropout):
    """`nn.Dropout`; in training on the CPU gluon-bert's `gb_dropout` kernel, which draws
    its mask 5-10x faster than MXNet's operator (`gluon_bert.kernels`).

    The kernel cannot ask whether the graph runs in training mode, as MXNet's operator
    does, so the choice is made when the graph is built: the top block's graph is built
    apart for training and for inference (`LegacyBoundary`)."""

    def hybrid_forward(self, F, x):
        if self._rate > 0 and not self._axes and autograd.is_training() and \
                kernels.use_here(x):
            return F.gb_dropout(kernels.float32(F, x), p=self._rate)[0]
        return super().hybrid_forward(F, x)


class HybridSequential(LegacyBoundary, nn.HybridSequential):
    pass
