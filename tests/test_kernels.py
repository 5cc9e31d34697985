"""gluon-bert's CPU kernels (gluon_bert/kernels): `gb_bmm`, `gb_layer_norm`,
`gb_softmax_ce`, `gb_dropout` and `gb_attention`, forward and backward, against the MXNet
operators they replace (or a float64 reference); when the model takes them and when not;
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
        monkeypatch.setattr(kernels, 'use_here', lambda *args, use=use: use)
        ln = LayerNorm(in_channels=16, epsilon=1e-5)
        ln.initialize()
        ln.gamma.set_data(gamma)
        if hybridize:
            ln.hybridize(static_alloc=True)
        results.append(forward_backward(ln, [x], head))
    for g, r, what in zip(*results, ['y', 'dx']):
        assert_close(g, r, what)


# -- gb_softmax_ce -----------------------------------------------------------------------------

@pytest.mark.parametrize('label_dtype', ['int32', 'float32'])
@pytest.mark.parametrize('shape', [(6, 33), (4, 3, 1000)], ids=['2d', '3d'])
def test_softmax_ce_matches_log_softmax_and_pick(shape, label_dtype):
    rs = onp.random.RandomState(shape[-1])
    # logits of a wide range (a few rows far from zero: the max must be taken out first)
    logits = (rs.randn(*shape) * 4 + rs.randn(*shape[:-1], 1) * 30).astype('float32')
    labels = rs.randint(0, shape[-1], shape[:-1]).astype(label_dtype)
    head = rs.rand(*shape[:-1]).astype('float32')

    def fused(x):
        return mx.nd.gb_softmax_ce(x, mx.nd.array(labels, dtype=label_dtype))[0]

    def stock(x):
        return -mx.nd.pick(mx.nd.log_softmax(x, axis=-1),
                           mx.nd.array(labels, dtype=label_dtype), axis=-1)

    for g, r, what in zip(forward_backward(fused, [logits], head),
                          forward_backward(stock, [logits], head), ['loss', 'dlogits']):
        assert_close(g, r, what)


def test_softmax_ce_underflow_and_every_vector_tail():
    """exp far below the row's max (the kernel clamps at -87 and underflows to ~0, as float32
    exp does) and row widths around the vector lengths (8 and 16 lanes, twice that per loop)."""
    rs = onp.random.RandomState(7)
    for V in (1, 7, 8, 15, 16, 17, 31, 32, 33, 64, 65):
        logits = (rs.randn(5, V) * 60).astype('float32')   # spreads of a few hundred
        logits[:, 0] = 120.0                                # one far above the rest
        labels = rs.randint(0, V, 5).astype('float32')
        head = rs.rand(5).astype('float32')

        def fused(x):
            return mx.nd.gb_softmax_ce(x, mx.nd.array(labels))[0]

        def stock(x):
            return -mx.nd.pick(mx.nd.log_softmax(x, axis=-1), mx.nd.array(labels), axis=-1)

        for g, r, what in zip(forward_backward(fused, [logits], head),
                              forward_backward(stock, [logits], head), ['loss', 'dlogits']):
            got, ref = g.asnumpy(), r.asnumpy()
            assert onp.isfinite(got).all(), (V, what)
            # at least 1 as the scale: with V = 1 the loss is 0 and MXNet's own is ~1e-6
            atol = RTOL * max(1.0, float(onp.abs(ref).max()))
            onp.testing.assert_allclose(got, ref, rtol=0, atol=atol, err_msg=f'{what} V={V}')


def test_softmax_ce_refuses_mismatched_labels():
    with pytest.raises(mx.MXNetError, match=r'labels of shape \(\.\.\.\)'):
        mx.nd.gb_softmax_ce(mx.nd.ones((4, 5)), mx.nd.ones((5,)))[0].wait_to_read()


# -- gb_dropout --------------------------------------------------------------------------------

@pytest.mark.parametrize('p', [0.1, 0.5])
def test_dropout_kernel_drops_a_share_p_and_its_gradient_follows_the_mask(p):
    x = mx.nd.array(onp.random.RandomState(0).rand(200, 501) + 0.5)   # no zeros in x
    x.attach_grad()
    head = mx.nd.array(onp.random.RandomState(1).randn(200, 501))
    with autograd.record():
        y, keep = mx.nd.gb_dropout(x, p=p)
        (y * head).sum().backward()
    y, keep, xs = y.asnumpy(), keep.asnumpy(), x.asnumpy()
    assert keep.dtype == onp.uint8 and set(onp.unique(keep)) == {0, 1}
    n = keep.size
    # the share dropped is p within 5 standard deviations of a binomial
    assert abs((keep == 0).mean() - p) < 5 * (p * (1 - p) / n) ** 0.5
    onp.testing.assert_allclose(y, xs * keep / (1 - p), rtol=1e-6)
    onp.testing.assert_allclose(x.grad.asnumpy(), head.asnumpy() * keep / (1 - p), rtol=1e-6)


def test_dropout_kernel_repeats_with_mxnets_seed_and_differs_between_calls():
    x = mx.nd.ones((64, 64))
    mx.random.seed(7)
    first, second = [mx.nd.gb_dropout(x, p=0.5)[1].asnumpy() for _ in range(2)]
    mx.random.seed(7)
    again = mx.nd.gb_dropout(x, p=0.5)[1].asnumpy()
    assert (first == again).all()
    assert (first != second).any()
    # neighbouring elements are not correlated (a counter-based stream)
    flat = first.ravel().astype(float)
    assert abs(onp.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.05


def test_dropout_kernel_refuses_p_of_one():
    with pytest.raises(mx.MXNetError, match=r'p must be in \[0, 1\)'):
        mx.nd.gb_dropout(mx.nd.ones((3,)), p=1.0)[0].wait_to_read()


# -- gb_attention ------------------------------------------------------------------------------


def _attention_reference(q, k, v, lens, heads, alpha):
    """Packed self-attention in float64 numpy: each sequence's rows attend to themselves."""
    T, H = q.shape
    d = H // heads
    out = onp.zeros((T, H))
    starts = onp.concatenate([[0], onp.cumsum(lens)]).astype(int)
    for b in range(len(lens)):
        r = slice(starts[b], starts[b + 1])
        for j in range(heads):
            c = slice(j * d, (j + 1) * d)
            s = alpha * q[r, c].astype(onp.float64) @ k[r, c].T.astype(onp.float64)
            p = onp.exp(s - s.max(1, keepdims=True))
            out[r, c] = (p / p.sum(1, keepdims=True)) @ v[r, c]
    return out


# (lengths, heads, head size): one-row sequences, lengths around the 8- and 16-lane vectors,
# head sizes that are not a multiple of either, BERT's 64
ATTENTION_CASES = [((5, 1, 17, 33, 8), 2, 16), ((64, 2, 16, 15), 2, 64), ((9, 40), 3, 5),
                   ((1,), 1, 8)]


@pytest.mark.parametrize('lens, heads, d', ATTENTION_CASES)
def test_attention_kernel_matches_packed_attention_and_its_gradients(lens, heads, d):
    """Forward against the float64 reference; the backward against the reference's
    derivative taken by central differences at a few entries of q, k and v. Rows past the
    sequences (padding of the packed batch) come out 0 and get no gradient."""
    rs = onp.random.RandomState(0)
    T, H, alpha = sum(lens) + 3, heads * d, 1 / d ** 0.5
    q, k, v, head = (rs.randn(T, H).astype('float32') for _ in range(4))
    lens_nd = mx.nd.array(onp.array(lens, 'float32'))
    out, dq, dk, dv = forward_backward(
        lambda a, b, c: mx.nd.gb_attention(a, b, c, lens_nd, num_heads=heads, alpha=alpha,
                                           p=0.0)[0], [q, k, v], head)
    ref = _attention_reference(q, k, v, lens, heads, alpha)
    onp.testing.assert_allclose(out.asnumpy(), ref, rtol=0, atol=RTOL * onp.abs(ref).max())
    assert not out.asnumpy()[sum(lens):].any()
    eps, rows = 1e-3, sorted({0, sum(lens) // 2, sum(lens) - 1, T - 1})
    for name, x, grad in (('q', q, dq), ('k', k, dk), ('v', v, dv)):
        for r in rows:
            c = (r * 7) % H
            hi, lo = (x.astype(onp.float64) for _ in range(2))
            hi[r, c] += eps
            lo[r, c] -= eps
            args = {'q': q, 'k': k, 'v': v}
            f_hi = _attention_reference(**{**args, name: hi}, lens=lens, heads=heads,
                                        alpha=alpha)
            f_lo = _attention_reference(**{**args, name: lo}, lens=lens, heads=heads,
                                        alpha=alpha)
            numeric = ((f_hi - f_lo) * head).sum() / (2 * eps)
            assert abs(grad.asnumpy()[r, c] - numeric) < 1e-3 * (1 + abs(numeric)), (name, r, c)
        assert not grad.asnumpy()[sum(lens):].any(), name


def _rows_reference(q, k, v, lens, heads, alpha, rows):
    """The queries q (R, H) at packed rows `rows`, each over its sequence's keys, float64."""
    d = q.shape[1] // heads
    starts = onp.concatenate([[0], onp.cumsum(lens)]).astype(int)
    out = onp.zeros(q.shape)
    for i, row in enumerate(rows):
        b = onp.searchsorted(starts, row, side='right') - 1
        r = slice(starts[b], starts[b + 1])
        for j in range(heads):
            c = slice(j * d, (j + 1) * d)
            s = alpha * k[r, c].astype(onp.float64) @ q[i, c].astype(onp.float64)
            p = onp.exp(s - s.max())
            out[i, c] = (p / p.sum()) @ v[r, c]
    return out


def test_attention_kernel_at_query_rows_matches_its_reference_and_gradients():
    """query_rows: queries at some packed rows (any order, a row twice, a sequence with
    none) over their whole sequences; keys and values of a sequence without queries and
    the padding rows get no gradient."""
    rs = onp.random.RandomState(2)
    lens, heads, d = (7, 1, 12, 9), 2, 5
    T, H, alpha = sum(lens) + 2, heads * d, 1 / d ** 0.5
    # sequences start at rows 0, 7, 8 and 20: queries in each, row 0 twice, not in order
    rows = onp.array([20, 0, 7, 8, 0, 21, 10], 'float32')
    k, v = (rs.randn(T, H).astype('float32') for _ in range(2))
    q, head = (rs.randn(len(rows), H).astype('float32') for _ in range(2))
    lens_nd, rows_nd = mx.nd.array(onp.array(lens, 'float32')), mx.nd.array(rows)
    out, dq, dk, dv = forward_backward(
        lambda a, b, c: mx.nd.gb_attention(a, b, c, lens_nd, rows_nd, num_heads=heads,
                                           alpha=alpha, query_rows=True)[0],
        [q, k, v], head)
    ref = _rows_reference(q, k, v, lens, heads, alpha, rows.astype(int))
    onp.testing.assert_allclose(out.asnumpy(), ref, rtol=0, atol=RTOL * onp.abs(ref).max())
    eps = 1e-3
    for name, x, grad, picks in (('q', q, dq, [(0, 3), (4, 9), (6, 0)]),
                                 ('k', k, dk, [(0, 1), (9, 4), (21, 7)]),
                                 ('v', v, dv, [(3, 2), (12, 5), (28, 8)])):
        for r, c in picks:
            hi, lo = (x.astype(onp.float64) for _ in range(2))
            hi[r, c] += eps
            lo[r, c] -= eps
            args = {'q': q, 'k': k, 'v': v}
            f = [_rows_reference(**{**args, name: y}, lens=lens, heads=heads, alpha=alpha,
                                 rows=rows.astype(int)) for y in (hi, lo)]
            numeric = ((f[0] - f[1]) * head).sum() / (2 * eps)
            assert abs(grad.asnumpy()[r, c] - numeric) < 1e-3 * (1 + abs(numeric)), (name, r, c)
    assert not dk.asnumpy()[sum(lens):].any() and not dv.asnumpy()[sum(lens):].any()
    # a sequence without queries: its keys and values get exactly zero gradient
    few = mx.nd.array(onp.array([8, 10], 'float32'))  # sequence 2 only
    _, _, dk2, dv2 = forward_backward(
        lambda a, b, c: mx.nd.gb_attention(a, b, c, lens_nd, few, num_heads=heads,
                                           alpha=alpha, query_rows=True)[0],
        [q[:2], k, v], head[:2])
    for g in (dk2.asnumpy(), dv2.asnumpy()):
        assert not g[:8].any() and not g[20:].any() and g[8:20].any()
    # the same queries as rows of the self-attention give the same numbers
    full = mx.nd.gb_attention(*(mx.nd.array(a) for a in (k, k, v)), lens_nd,
                              num_heads=heads, alpha=alpha)[0].asnumpy()
    at_rows = mx.nd.gb_attention(mx.nd.array(k[rows.astype(int)]), mx.nd.array(k),
                                 mx.nd.array(v), lens_nd, rows_nd, num_heads=heads,
                                 alpha=alpha, query_rows=True)[0].asnumpy()
    onp.testing.assert_allclose(at_rows, full[rows.astype(int)], rtol=1e-6, atol=1e-6)
    with pytest.raises(mx.MXNetError, match='rows must name real rows'):
        mx.nd.gb_attention(mx.nd.array(q[:1]), mx.nd.array(k), mx.nd.array(v), lens_nd,
                           mx.nd.array([29.0]), num_heads=heads,
                           query_rows=True)[0].wait_to_read()


def test_attention_kernel_dropout_uses_one_mask_forward_and_backward():
    """out = Pd V is linear in v, so sum(dout * out) = sum(dv * v) holds only when the
    backward regenerates the forward's mask; the mask repeats with mx.random.seed."""
    rs = onp.random.RandomState(1)
    lens = (30, 7, 64)
    T, H = sum(lens), 32
    q, k, v, head = (rs.randn(T, H).astype('float32') for _ in range(4))
    lens_nd = mx.nd.array(onp.array(lens, 'float32'))

    def attend(a, b, c, p=0.3):
        return mx.nd.gb_attention(a, b, c, lens_nd, num_heads=2, alpha=0.25, p=p)[0]

    mx.random.seed(3)
    out, _, _, dv = forward_backward(attend, [q, k, v], head)
    onp.testing.assert_allclose((head * out.asnumpy()).sum(), (dv.asnumpy() * v).sum(),
                                rtol=1e-4)
    mx.random.seed(3)
    again = attend(*(mx.nd.array(a) for a in (q, k, v)))
    onp.testing.assert_array_equal(again.asnumpy(), out.asnumpy())
    no_drop = attend(*(mx.nd.array(a) for a in (q, k, v)), p=0.0).asnumpy()
    assert not onp.allclose(out.asnumpy(), no_drop)
    # dropped weights rescaled by 1 / (1 - p): the mean output stays about the same
    assert abs(out.asnumpy().mean() - no_drop.mean()) < 0.1 * onp.abs(no_drop).mean()


def test_attention_kernel_refuses_what_it_cannot_compute():
    q = mx.nd.ones((6, 8))
    with pytest.raises(mx.MXNetError, match='add up to at most 6'):
        mx.nd.gb_attention(q, q, q, mx.nd.array([4, 3]), num_heads=2)[0].wait_to_read()
    with pytest.raises(mx.MXNetError, match='divisible by num_heads'):
        mx.nd.gb_attention(q, q, q, mx.nd.array([4]), num_heads=3)[0].wait_to_read()
    with pytest.raises(mx.MXNetError, match=r'p must be in \[0, 1\)'):
        mx.nd.gb_attention(q, q, q, mx.nd.array([4]), num_heads=2, p=1.0)[0].wait_to_read()


def test_the_model_builds_apart_for_training_and_inference():
    """Dropout's kernel is chosen when the graph is built: a training graph has it, an
    inference graph has no dropout at all, and switching modes rebuilds the graph."""
    net = BERTModel(BERTConfig.from_preset('tiny', vocab_size=40, dropout=0.3))
    net.initialize(mx.init.Normal(0.1))
    net.hybridize(static_alloc=True, static_shape=True)
    data = pretrain_batch(onp.random.RandomState(0), 4, 12, 3, 40)
    batch = [mx.nd.array(data[k]) for k in ('tokens', 'segments', 'valid_lens', 'pred_positions')]
    infer = net(*batch)[0].asnumpy()
    assert 'gb_dropout' not in _graph_ops(net) and 'Dropout' in _graph_ops(net)
    with autograd.record():
        trained = net(*batch)[0]
    assert 'gb_dropout' in _graph_ops(net)
    assert not onp.allclose(trained.asnumpy(), infer)       # dropout acted
    onp.testing.assert_allclose(net(*batch)[0].asnumpy(), infer, rtol=1e-6)  # and not here
    assert 'gb_dropout' not in _graph_ops(net)


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
    monkeypatch.setattr(kernels, 'use_here', lambda *args: False)
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
