"""gluon-bert's CPU kernels (gluon_bert/kernels): `gb_bmm` and `gb_layer_norm`, forward and
backward, against the MXNet operators they replace; when the model takes them and when not;
the build and its failures.

Tolerances are relative to each array's scale (its largest magnitude): the kernels sum in
another order than OpenBLAS and MXNet's LayerNorm, so float32 results differ in the last
bits. Measured: within 1e-6 of the scale; the tests allow 2e-5.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as onp
import pytest
from mxnet import autograd

from gluon_bert import kernels
from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTModel
from gluon_bert.model.layers import LayerNorm

from batches import pretrain_batch

RTOL = 2e-5
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not kernels.status()['loaded'],
                                reason=f"kernels not loaded: {kernels.status()['reason']}")


def assert_close(got, ref, what=''):
    got, ref = got.asnumpy(), ref.asnumpy()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = float(onp.abs(ref).max()) or 1.0
    onp.testing.assert_allclose(got, ref, rtol=0, atol=RTOL * scale, err_msg=what)


def forward_backward(fn, inputs, head):
    """fn(*inputs) and the gradients of sum(fn(*inputs) * head) by each input."""
    inputs = [mx.nd.array(a) for a in inputs]
    for a in inputs:
        a.attach_grad()
    with autograd.record():
        out = fn(*inputs)
        (out * mx.nd.array(head)).sum().backward()
    return [out] + [a.grad for a in inputs]


# -- gb_bmm ------------------------------------------------------------------------------------

# (N, M, K, P): BERT's head shapes, and sizes that are not multiples of the 6 x 16 blocks
SHAPES = [(4, 64, 64, 64), (3, 7, 5, 33), (2, 1, 130, 17), (5, 13, 64, 128)]


@pytest.mark.parametrize('transpose_a', [False, True], ids=['a', 'aT'])
@pytest.mark.parametrize('transpose_b', [False, True], ids=['b', 'bT'])
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_bmm_matches_batch_dot(shape, transpose_a, transpose_b):
    N, M, K, P = shape
    rs = onp.random.RandomState(sum(shape))
    a = rs.randn(*((N, K, M) if transpose_a else (N, M, K))).astype('float32')
    b = rs.randn(*((N, P, K) if transpose_b else (N, K, P))).astype('float32')
    head = rs.randn(N, M, P).astype('float32')
    flags = dict(transpose_a=transpose_a, transpose_b=transpose_b)
    got = forward_backward(lambda x, y: mx.nd.gb_bmm(x, y, alpha=0.125, **flags), [a, b], head)
    ref = forward_backward(lambda x, y: mx.nd.batch_dot(x, y, **flags) * 0.125, [a, b], head)
    for g, r, what in zip(got, ref, ['C', 'dA', 'dB']):
        assert_close(g, r, what)


def test_bmm_refuses_mismatched_shapes_and_dtypes():
    a, b = mx.nd.ones((2, 3, 4)), mx.nd.ones((2, 5, 6))
    with pytest.raises(mx.MXNetError, match='inner sizes differ'):
        mx.nd.gb_bmm(a, b).wait_to_read()
    with pytest.raises(mx.MXNetError, match='same batch size'):
        mx.nd.gb_bmm(a, mx.nd.ones((3, 4, 6))).wait_to_read()
    with pytest.raises(mx.MXNetError, match='float32 inputs only'):
        mx.nd.gb_bmm(a.astype('float64'), mx.nd.ones((2, 4, 6), dtype='float64')).wait_to_read()


# -- gb_layer_norm -------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(7, 24), (3, 5, 32), (2, 3, 4, 768)], ids=['2d', '3d', '4d'])
@pytest.mark.parametrize('eps', [1e-5, 1e-12])
def test_layer_norm_kernel_matches_mxnets_operator(shape, eps):
    rs = onp.random.RandomState(len(shape))
    H = shape[-1]
    # rows of different spreads and offsets: centring and scaling both matter
    x = (rs.randn(*shape) * onp.exp(rs.randn(*shape[:-1], 1)) + 3 * rs.randn(*shape[:-1], 1))
    params = [x.astype('float32'), (1 + 0.5 * rs.randn(H)).astype('float32'),
              rs.randn(H).astype('float32')]
    head = rs.randn(*shape).astype('float32')
    got = forward_backward(lambda d, g, b: mx.nd.gb_layer_norm(d, g, b, eps=eps), params, head)
    ref = forward_backward(lambda d, g, b: mx.nd.LayerNorm(d, g, b, eps=eps), params, head)
    for g, r, what in zip(got, ref, ['y', 'dx', 'dgamma', 'dbeta']):
        assert_close(g, r, what)


def test_layer_norm_kernel_refuses_wrong_gamma():
    with pytest.raises(mx.MXNetError, match=r'gamma and beta must have shape \(8,\)'):
        mx.nd.gb_layer_norm(mx.nd.ones((2, 8)), mx.nd.ones(7), mx.nd.ones(8)).wait_to_read()


def test_layer_norm_block_gives_the_same_with_and_without_the_kernel(hybridize, monkeypatch):
    """The block's two paths (the kernel; dots with ones where there is none) agree."""
    rs = onp.random.RandomState(3)
    x = rs.randn(4, 6, 16).astype('float32') * 4 + 1
    head = rs.randn(4, 6, 16).astype('float32')
    gamma = mx.nd.array(1 + rs.randn(16) * 0.1)
    results = []
    for use in (True, False):
        monkeypatch.setattr(kernels, 'use_here', lambda use=use: use)
        ln = LayerNorm(in_channels=16, epsilon=1e-5)
        ln.initialize()
        ln.gamma.set_data(gamma)
        if hybridize:
            ln.hybridize(static_alloc=True)
        results.append(forward_backward(ln, [x], head))
    for g, r, what in zip(*results, ['y', 'dx']):
        assert_close(g, r, what)


# -- where the model takes them ------------------------------------------------------------------

def _graph_ops(net):
    return {node['op'] for node in json.loads(net._cached_graph[1].tojson())['nodes']}


def _tiny_model():
    net = BERTModel(BERTConfig.from_preset('tiny', vocab_size=40, dropout=0.0))
    net.initialize(mx.init.Normal(0.1))
    net.hybridize(static_alloc=True, static_shape=True)
    return net


def test_the_cpu_graph_takes_the_kernels_and_a_gpu_graph_does_not(monkeypatch):
    net = _tiny_model()
    data = pretrain_batch(onp.random.RandomState(0), 4, 12, 3, 40)
    batch = [mx.nd.array(data[k]) for k in ('tokens', 'segments', 'valid_lens', 'pred_positions')]
    cpu_out = net(*batch)
    assert {'gb_bmm', 'gb_layer_norm'} <= _graph_ops(net)
    assert not {'batch_dot', 'LayerNorm'} & _graph_ops(net)
    # the graph for a GPU: MXNet's own operators
    with kernels.device_scope('gpu'):
        assert not kernels.use_here()
        net._clear_cached_op()
        net._build_cache(*batch)
    assert not {'gb_bmm', 'gb_layer_norm'} & _graph_ops(net)
    assert 'batch_dot' in _graph_ops(net)
    # ... which gives the same outputs within rounding (run here on the CPU)
    monkeypatch.setattr(kernels, 'use_here', lambda: False)
    net._clear_cached_op()
    for got, ref in zip(cpu_out, net(*batch)):
        assert_close(got, ref)


def _run(code, env):
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_kernels_can_be_turned_off():
    done = _run('import gluon_bert.model, gluon_bert.kernels as k; print(k.status())',
                {'GLUON_BERT_KERNELS': '0'})
    assert done.returncode == 0, done.stderr
    assert "'loaded': False" in done.stdout and 'GLUON_BERT_KERNELS=0' in done.stdout


def test_without_a_compiler_the_model_runs_on_mxnets_operators(tmp_path):
    """No compiler and an empty cache: one warning that says why, and the model still
    trains, on batch_dot and LayerNorm."""
    code = ('import json, mxnet as mx, numpy as np\n'
            'import gluon_bert.model, gluon_bert.kernels as k\n'
            'from gluon_bert.config import BERTConfig\n'
            'net = gluon_bert.model.BERTModel(BERTConfig.from_preset("tiny", vocab_size=40))\n'
            'net.initialize(); net.hybridize()\n'
            'x = mx.nd.array(np.random.randint(0, 40, (2, 8)))\n'
            'net(x, mx.nd.zeros((2, 8)), mx.nd.array([8, 5]), mx.nd.array([[1, 2], [3, 4]]))\n'
            'ops = {n["op"] for n in json.loads(net._cached_graph[1].tojson())["nodes"]}\n'
            'print(k.status()["loaded"], "gb_bmm" in ops, "batch_dot" in ops)\n')
    done = _run(code, {'CXX': str(tmp_path / 'no-such-compiler'),
                       'GLUON_BERT_CACHE': str(tmp_path / 'cache')})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ['False', 'False', 'True']
    assert 'CPU kernels are unavailable' in done.stderr and 'no-such-compiler' in done.stderr


def test_build_reports_the_compilers_error(tmp_path, monkeypatch):
    broken = tmp_path / 'broken.cc'
    broken.write_text('this is not C++;\n')
    monkeypatch.setattr(kernels, '_SOURCE', broken)
    monkeypatch.setenv('GLUON_BERT_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(RuntimeError, match='failed: .*error'):
        kernels.build(quiet=True)
    assert not list((tmp_path / 'cache' / 'kernels').glob('*.so'))  # nothing half-written
