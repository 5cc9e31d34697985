"""`train.optimizer.Adam`: MXNet's Adam with gluon-bert's CPU update kernel gives the same
bits as MXNet's own, through a Trainer as the steps use it."""
from __future__ import annotations

import mxnet as mx
import numpy as onp
import pytest

from gluon_bert import kernels
from gluon_bert.train.optimizer import Adam

pytestmark = pytest.mark.skipif(not kernels.status()['loaded'] and not kernels.load(),
                                reason='gluon-bert kernels not built here')


def _train(optimizer, dtype='float32', steps=5):
    """A few Trainer updates of three parameters (an odd size, so the kernel's vector loop
    and its scalar tail both run) from fixed gradients; the weights and Adam's moments."""
    rng = onp.random.RandomState(0)
    params = mx.gluon.ParameterDict()
    shapes = {'w_weight': (37, 11), 'b_bias': (5,), 'e_weight': (300, 16)}
    for name, shape in shapes.items():
        p = params.get(name, shape=shape, dtype=dtype)
        p.initialize(mx.init.Constant(mx.nd.array(rng.randn(*shape))), ctx=mx.cpu())
    trainer = mx.gluon.Trainer(params, optimizer, None if not isinstance(optimizer, str)
                               else {'learning_rate': 0.01, 'wd': 0.01, 'clip_gradient': 0.5})
    for step in range(steps):
        # gradients G: those of sum(weight * G)
        grads = [mx.nd.array(rng.randn(*p.shape) * (step + 1), dtype=dtype)
                 for p in params.values()]
        with mx.autograd.record():
            loss = mx.nd.add_n(*[(p.data() * g).sum() for p, g in zip(params.values(), grads)])
        loss.backward()
        trainer.step(4)
    states = trainer._updaters[0].states
    moments = [m.asnumpy() for i in sorted(states) for m in states[i]]
    return [p.data().asnumpy() for p in params.values()], moments


def test_kernel_adam_is_mxnet_adam_bit_for_bit(monkeypatch):
    kernel, calls = mx.nd.gb_adam_update, []
    monkeypatch.setattr(mx.nd, 'gb_adam_update',
                        lambda *a, **k: calls.append(1) or kernel(*a, **k))
    ours = _train(Adam(learning_rate=0.01, wd=0.01, clip_gradient=0.5))
    assert len(calls) == 3 * 5  # every parameter, every step, through the kernel
    theirs = _train('adam')
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        assert onp.array_equal(a, b)
    assert not onp.array_equal(ours[0][0], _train('adam', steps=4)[0][0])  # it trained


def test_kernel_adam_falls_back_where_the_kernel_does_not_apply(monkeypatch):
    """float64 weights (the kernel is float32-only) and kernels off: MXNet's update."""
    called = []
    monkeypatch.setattr(mx.nd, 'gb_adam_update',
                        lambda *a, **k: called.append(1), raising=False)
    ours = _train(Adam(learning_rate=0.01, wd=0.01, clip_gradient=0.5), dtype='float64')
    theirs = _train('adam', dtype='float64')
    assert not called
    for a, b in zip(ours[0], theirs[0]):
        assert onp.array_equal(a, b)
    monkeypatch.setitem(kernels._state, 'loaded', False)
    _train(Adam(learning_rate=0.01), steps=1)
    assert not called


def test_kernel_parses_its_rates_as_mxnet_does():
    """The learning rates Adam's bias correction gives, as strings, become the floats that
    adam_update makes of them: 2.5539965058459782e-05 is one that a correctly rounded
    parser (std::stof) and MXNet's (dmlc::stof) turn into neighbouring floats."""
    rng = onp.random.RandomState(0)
    grad = mx.nd.array(rng.randn(16))
    rates = [2.5539965058459782e-05] + list(10 ** rng.uniform(-5, -2, 500))
    for lr in rates:
        out = []
        for update in (mx.nd.adam_update, mx.nd.gb_adam_update):
            # weights 0: the new weights are the step itself, every bit of the rate in it
            w, m, v = mx.nd.zeros(16), mx.nd.zeros(16), mx.nd.zeros(16)
            update(w, grad, m, v, out=w, lr=float(lr), rescale_grad=1 / 64.)
            out.append(w.asnumpy())
        assert onp.array_equal(*out), lr
