"""Adam whose CPU update is gluon-bert's `gb_adam_update` kernel (`gluon_bert.kernels`).

MXNet's `adam_update` runs its element-wise loop at about a quarter of the machine's memory
speed: 11.3 ms for `bert.small`'s token embedding (5.2 M floats) on this project's 2-vCPU
machine, 13% of a fine-tuning step; the kernel takes 2.6 ms. It computes the same float
operations in the same order (no fused multiply-adds) on the same floats (its arguments
parsed by MXNet's own parser), so weights and moments are the same bits as MXNet's
(tests/test_optimizer.py), and checkpoints, resumes and the book's
comparisons are unchanged. Elsewhere (GPUs, sparse or non-float32 weights, kernels off
with GLUON_BERT_KERNELS=0 or not built) it is MXNet's Adam.
"""
from __future__ import annotations

import math

import mxnet as mx
import numpy as np

from .. import kernels

__all__ = ['Adam']


class Adam(mx.optimizer.Adam):
    """`mx.optimizer.Adam` (same arguments, state and bias correction) with the kernel's
    update where it applies."""

    def update(self, index, weight, grad, state):
        if not (kernels.use_here(weight) and np.dtype(weight.dtype) == np.float32 and
                weight.stype == 'default' and grad.stype == 'default'):
            return super().update(index, weight, grad, state)
        # MXNet's Adam.update, step for step, then the kernel instead of adam_update
        self._update_count(index)
        lr = self._get_lr(index)
        wd = self._get_wd(index)
        t = self._index_update_count[index]
        lr *= math.sqrt(1. - self.beta2 ** t) / (1. - self.beta1 ** t)
        kwargs = {'beta1': self.beta1, 'beta2': self.beta2, 'epsilon': self.epsilon,
                  'rescale_grad': self.rescale_grad}
        if self.clip_gradient:
            kwargs['clip_gradient'] = self.clip_gradient
        mean, var = state
        mx.nd.gb_adam_update(weight, grad, mean, var, out=weight, lr=lr, wd=wd, **kwargs)
        return None
