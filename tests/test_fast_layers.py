"""The fast forms of the model's operators against what they replace: LayerNorm made of `dot`s
against MXNet's LayerNorm operator, the additive length mask against softmax(use_length=True),
the positional embedding added through a product with ones against broadcast_add, the
losses inside the hybridized step against the imperative ones, and the zero-copy inputs.

Tolerances are relative to the scale of each array (its largest magnitude): the fast forms
sum in another order, so float32 results differ in the last bits. Measured: LayerNorm
within 1.2e-6 of MXNet's operator, the softmax within 1e-7; the tests allow 2e-5.
"""
from __future__ import annotations

import copy
import gc

import mxnet as mx
import numpy as onp
import pytest
from mxnet import autograd, gluon

from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTClassifier, BERTModel
from gluon_bert.model.attention import masked_softmax
from gluon_bert.model.encoder import BERTEncoder
from gluon_bert.model.layers import LayerNorm
from gluon_bert.train.step import (FinetuneStep, PretrainStep, _as_nd, make_trainer,
                                   mlm_loss, nsp_loss, split_batch)

from batches import pretrain_batch

RTOL = 2e-5  # of an array's scale


def assert_close(got, ref, rtol=RTOL, what=''):
    got = got.asnumpy() if hasattr(got, 'asnumpy') else onp.asarray(got)
    ref = ref.asnumpy() if hasattr(ref, 'asnumpy') else onp.asarray(ref)
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    scale = float(onp.abs(ref).max()) or 1.0
    onp.testing.assert_allclose(got, ref, rtol=0, atol=rtol * scale, err_msg=what)


# -- LayerNorm -----------------------------------------------------------------------------------

@pytest.mark.parametrize('shape', [(7, 24), (3, 5, 32)], ids=['2d', '3d'])
@pytest.mark.parametrize('eps', [1e-5, 1e-12])
@pytest.mark.parametrize('spread', [20.0, 3e-3], ids=['wide', 'eps-sized'])
def test_layer_norm_matches_mxnets_operator(shape, eps, spread, hybridize):
    rs = onp.random.RandomState(1)
    H = shape[-1]
    # rows of very different spreads (x e^N(0,1)) and offsets: centring and scaling both
    # matter; at spread 3e-3 the variance is about eps = 1e-5, so eps must be where
    # MXNet puts it (var + eps)
    x = (rs.randn(*shape) * onp.exp(rs.randn(*shape[:-1], 1)) * spread
         + rs.randn(*shape[:-1], 1) * 1.5 * spread).astype('float32')
    gamma = (1 + 0.5 * rs.randn(H)).astype('float32')
    beta = rs.randn(H).astype('float32')
    head = rs.randn(*shape).astype('float32')

    ln = LayerNorm(in_channels=H, epsilon=eps)
    ln.initialize()
    ln.gamma.set_data(mx.nd.array(gamma))
    ln.beta.set_data(mx.nd.array(beta))
    if hybridize:
        ln.hybridize(static_alloc=True, static_shape=True)
    data = mx.nd.array(x)
    data.attach_grad()
    with autograd.record():
        out = ln(data)
    out.backward(mx.nd.array(head))

    ref_x, ref_g, ref_b = mx.nd.array(x), mx.nd.array(gamma), mx.nd.array(beta)
    for a in (ref_x, ref_g, ref_b):
        a.attach_grad()
    with autograd.record():
        ref = mx.nd.LayerNorm(ref_x, ref_g, ref_b, axis=-1, eps=eps)
    ref.backward(mx.nd.array(head))

    assert_close(out, ref, what='output')
    assert_close(data.grad, ref_x.grad, what='d data')
    assert_close(ln.gamma.grad(), ref_g.grad, what='d gamma')
    assert_close(ln.beta.grad(), ref_b.grad, what='d beta')
    # and both against float64 numpy
    x64 = x.astype('float64')
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    assert_close(out, (x64 - mean) / onp.sqrt(var + eps) * gamma + beta, what='numpy')
    assert ln.gamma.grad().dtype == onp.float32 and out.dtype == onp.float32


def test_layer_norm_keeps_its_parameter_names_and_shapes():
    ln = LayerNorm(in_channels=16)
    ln.initialize()
    params = ln._collect_params_with_prefix()
    assert sorted(params) == ['beta', 'gamma']
    assert params['gamma'].shape == (16,) and params['beta'].shape == (16,)
    # default gamma 1, beta 0: plain standardisation of each row
    x = mx.nd.array(onp.random.RandomState(0).randn(3, 16) * 4 + 2)
    y = ln(x).asnumpy()
    onp.testing.assert_allclose(y.mean(-1), 0, atol=1e-6)
    onp.testing.assert_allclose(y.std(-1), 1, atol=1e-4)


# -- masked softmax ------------------------------------------------------------------------------

class _MaskedSoftmax(gluon.HybridBlock):
    def hybrid_forward(self, F, scores, valid_lens):
        return masked_softmax(F, scores, valid_lens)


def _old_masked_softmax(scores, valid_lens):
    """The implementation this replaced: MXNet's softmax with use_length."""
    lengths = mx.nd.broadcast_like(mx.nd.expand_dims(valid_lens, axis=-1), scores,
                                   lhs_axes=(1,), rhs_axes=(1,))          # (N, L)
    return mx.nd.softmax(scores, length=mx.nd.cast(lengths, 'int32'), axis=-1,
                         use_length=True)


def _numpy_masked_softmax(scores, valid_lens):
    s = scores.astype('float64')
    keep = onp.arange(s.shape[-1])[None, None, :] < valid_lens[:, None, None]
    e = onp.where(keep, onp.exp(s - onp.where(keep, s, -onp.inf).max(-1, keepdims=True)), 0)
    return e / e.sum(-1, keepdims=True)


def test_masked_softmax_matches_use_length_and_numpy(hybridize):
    rs = onp.random.RandomState(2)
    N, L = 6, 9
    scores = (rs.randn(N, L, L) * 4).astype('float32')
    valid = onp.array([1, L, 3, 5, 1, L], dtype='float32')  # the extremes included
    head = rs.randn(N, L, L).astype('float32')
    block = _MaskedSoftmax()
    if hybridize:
        block.hybridize(static_alloc=True, static_shape=True)

    def run(fn):
        s = mx.nd.array(scores)
        s.attach_grad()
        with autograd.record():
            p = fn(s, mx.nd.array(valid))
        p.backward(mx.nd.array(head))
        return p.asnumpy(), s.grad.asnumpy()

    p, dp = run(block)
    p_old, dp_old = run(_old_masked_softmax)
    ref = _numpy_masked_softmax(scores, valid)
    masked = onp.broadcast_to(onp.arange(L)[None, None, :] >= valid[:, None, None], p.shape)
    assert (p[masked] == 0).all()  # exactly 0, not merely small
    assert (p[~masked] > 0).all()
    assert_close(p, p_old, what='vs use_length')
    assert_close(p, ref, what='vs numpy')
    onp.testing.assert_allclose(p.sum(-1), 1, atol=1e-6)
    onp.testing.assert_array_equal(p[valid == 1][:, :, 0], 1.0)  # one key: all weight on it
    # d scores = P * (g - sum(g * P)); zero at masked keys
    ref_grad = ref * (head - (head * ref).sum(-1, keepdims=True))
    assert (dp[masked] == 0).all()
    assert_close(dp, ref_grad, what='grad vs numpy')
    assert_close(dp, dp_old, what='grad vs use_length')


def test_masked_softmax_without_lengths_is_the_plain_softmax():
    scores = mx.nd.array(onp.random.RandomState(3).randn(2, 4, 4))
    assert_close(masked_softmax(mx.nd, scores, None), mx.nd.softmax(scores, axis=-1))


def test_attention_ignores_what_is_past_the_length(hybridize):
    """The mask seen from the model: keys past valid_len change nothing."""
    config = BERTConfig.from_preset('tiny', vocab_size=50, dropout=0.0)
    net = BERTModel(config)
    net.initialize(mx.init.Xavier())
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    rs = onp.random.RandomState(4)
    tokens = rs.randint(5, 50, (3, 12))
    segments = rs.randint(0, 2, (3, 12))
    valid = onp.array([4, 12, 7], dtype='float32')
    other = tokens.copy()
    for b, n in enumerate(valid.astype(int)):
        other[b, n:] = rs.randint(5, 50, 12 - n)  # different tokens past each length
    enc = [net(mx.nd.array(t), mx.nd.array(segments), mx.nd.array(valid))[0].asnumpy()
           for t in (tokens, other)]
    for b, n in enumerate(valid.astype(int)):
        assert_close(enc[1][b, :n], enc[0][b, :n], what=f'example {b}')
    assert not onp.allclose(enc[1][0, 4:], enc[0][0, 4:])  # the padded positions did change


# -- positional embedding ------------------------------------------------------------------------

def _encoder(num_blks, hybridize, max_len=20):
    enc = BERTEncoder(vocab_size=30, num_hiddens=16, ffn_num_hiddens=32, num_heads=2,
                      num_blks=num_blks, dropout=0.0, max_len=max_len)
    enc.initialize(mx.init.Normal(0.5))
    if hybridize:
        enc.hybridize(static_alloc=True, static_shape=True)
    return enc


def _inputs(rs, B=4, L=11):
    return (rs.randint(0, 30, (B, L)).astype('int32'), rs.randint(0, 2, (B, L)).astype('int32'),
            rs.randint(1, L + 1, B).astype('float32'))


@pytest.mark.filterwarnings('ignore:The 2-th input to HybridBlock is not used')  # no blocks
def test_positional_embedding_sum_and_gradient_against_numpy(hybridize):
    """No blocks: the encoder's output is the three embeddings' sum, exactly."""
    enc = _encoder(0, hybridize)
    rs = onp.random.RandomState(5)
    tokens, segments, valid = _inputs(rs)
    B, L = tokens.shape
    head = rs.randn(B, L, 16).astype('float32')
    with autograd.record():
        out = enc(mx.nd.array(tokens), mx.nd.array(segments), mx.nd.array(valid))
    out.backward(mx.nd.array(head))
    tok = enc.token_embedding.weight.data().asnumpy()
    seg = enc.segment_embedding.weight.data().asnumpy()
    pos = enc.pos_embedding.data().asnumpy()                      # (1, max_len, H)
    assert_close(out, tok[tokens] + seg[segments] + pos[:, :L], rtol=1e-6, what='sum')
    grad = enc.pos_embedding.grad().asnumpy()
    assert_close(grad[0, :L], head.sum(0), rtol=1e-6, what='d pos')
    assert (grad[0, L:] == 0).all()  # positions past L get no gradient


@pytest.mark.parametrize('batch', [1, 5])
def test_positional_embedding_as_broadcast_add_through_the_blocks(hybridize, batch):
    enc = _encoder(2, hybridize)
    rs = onp.random.RandomState(6)
    tokens, segments, valid = _inputs(rs, B=batch)
    L = tokens.shape[1]
    head = mx.nd.array(rs.randn(batch, L, 16))
    args = [mx.nd.array(a) for a in (tokens, segments, valid)]
    with autograd.record():
        out = enc(*args)
    out.backward(head)
    got_grad = enc.pos_embedding.grad().copy()
    # the same parameters, the positional table added by broadcasting
    pos = enc.pos_embedding.data().copy()
    pos.attach_grad()
    with autograd.record():
        X = enc.token_embedding(args[0]) + enc.segment_embedding(args[1])
        X = mx.nd.broadcast_add(X, mx.nd.slice_axis(pos, axis=1, begin=0, end=L))
        for blk in enc.blks:
            X = blk(X, args[2])
    X.backward(head)
    assert_close(out, X, what='output')
    assert_close(got_grad, pos.grad, what='d pos_embedding')
    assert float(onp.abs(pos.grad.asnumpy()[0, :L]).min()) > 0


# -- the losses inside the step ------------------------------------------------------------------


VOCAB = 60


def _pretrain_batch(rs, B=8, L=12, P=3):
    return pretrain_batch(rs, B, L, P, vocab=VOCAB, drop=0.3)


def _finetune_batch(rs, B=8, L=12):
    b = _pretrain_batch(rs, B, L)
    return dict(tokens=b['tokens'], segments=b['segments'], valid_lens=b['valid_lens'],
                labels=rs.randint(0, 3, B).astype('int32'))


def _twin_nets(task, hybridize):
    """Two nets with the same weights and no dropout: one for the step, one imperative."""
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.0)
    make = BERTModel if task == 'pretrain' else BERTClassifier
    mx.random.seed(11)
    a, b = make(config), make(config)
    a.initialize(mx.init.Xavier())
    b.initialize()
    pa, pb = a._collect_params_with_prefix(), b._collect_params_with_prefix()
    for name, p in pa.items():
        pb[name].set_data(p.data().copy())
    if hybridize:
        a.hybridize(static_alloc=True, static_shape=True)
    return a, b


def _grads(net):
    return {n: p.grad().asnumpy() for n, p in net._collect_params_with_prefix().items()
            if p.grad_req != 'null'}


def _nd(batch, *keys):
    return [mx.nd.array(batch[k], dtype=batch[k].dtype) for k in keys]


def test_pretrain_step_losses_and_gradients_equal_the_imperative_loss(hybridize):
    rs = onp.random.RandomState(7)
    batch = _pretrain_batch(rs)
    net, ref_net = _twin_nets('pretrain', hybridize)
    # the imperative loss of the book on the reference net
    tokens, segments, valid, positions, weights, labels, nsp_labels = _nd(batch, *PretrainStep.keys)
    with autograd.record():
        _, mlm_hat, nsp_hat = ref_net(tokens, segments, valid, positions)
        mlm = mlm_loss(mlm_hat, labels, weights, weights.sum())
        nsp = nsp_loss(nsp_hat, nsp_labels, len(batch['tokens']))
        total = mlm + nsp
    total.backward()
    # the step (SGD: its gradients are left in the parameters for reading)
    step = PretrainStep(net, make_trainer(net.collect_params(), 1e-3, None, 'sgd'), [mx.cpu()])
    assert getattr(step.objective, '_active', False) == hybridize
    got_mlm, got_nsp = step(batch)
    onp.testing.assert_allclose(got_mlm.asscalar(), mlm.asscalar(), rtol=1e-6)
    onp.testing.assert_allclose(got_nsp.asscalar(), nsp.asscalar(), rtol=1e-6)
    got, ref = _grads(net), _grads(ref_net)
    assert set(got) == set(ref)
    scale = max(float(onp.abs(g).max()) for g in ref.values())
    for name in ref:
        if name.endswith('attention.W_k.bias'):
            # zero in theory: float noise, which the packed step's sums order differently
            assert float(onp.abs(got[name]).max()) < 1e-6 * scale, name
            continue
        assert_close(got[name], ref[name], rtol=1e-4, what=name)
    assert sum(float(onp.abs(g).max()) > 0 for g in ref.values()) > len(ref) // 2


def test_pretrain_step_normalises_by_real_predictions(hybridize):
    """Against numpy: mlm_weights 0 (padding predictions) count neither in the sum nor in
    the divisor; NSP is the batch mean."""
    rs = onp.random.RandomState(8)
    batch = _pretrain_batch(rs)
    batch['mlm_weights'][:] = 1.0
    batch['mlm_weights'][:, -1] = 0.0  # the last prediction of every row is padding
    net, ref_net = _twin_nets('pretrain', hybridize)
    _, mlm_hat, _ = ref_net(*_nd(batch, 'tokens', 'segments', 'valid_lens', 'pred_positions'))
    logp = mlm_hat.log_softmax(axis=-1).asnumpy()[:, :-1]             # real predictions only
    labels = batch['mlm_labels'][:, :-1]
    expected = -onp.take_along_axis(logp, labels[..., None], -1).mean()
    _, _, nsp_hat = ref_net(*_nd(batch, 'tokens', 'segments', 'valid_lens', 'pred_positions'))
    nsp_logp = nsp_hat.log_softmax(axis=-1).asnumpy()
    expected_nsp = -nsp_logp[onp.arange(len(nsp_logp)), batch['nsp_labels']].mean()
    step = PretrainStep(net, make_trainer(net.collect_params(), 1e-3, None, 'sgd'), [mx.cpu()])
    mlm, nsp = step(batch)
    onp.testing.assert_allclose(mlm.asscalar(), expected, rtol=1e-5)
    onp.testing.assert_allclose(nsp.asscalar(), expected_nsp, rtol=1e-5)


def test_finetune_step_loss_hits_and_gradients_equal_the_imperative_loss(hybridize):
    rs = onp.random.RandomState(9)
    batch = _finetune_batch(rs)
    net, ref_net = _twin_nets('finetune', hybridize)
    tokens, segments, valid, labels = _nd(batch, *FinetuneStep.keys)
    with autograd.record():
        logits = ref_net(tokens, segments, valid)
        ce = -mx.nd.pick(mx.nd.log_softmax(logits, axis=-1), labels, axis=-1).sum()
    ce.backward()
    logp = logits.log_softmax(axis=-1).asnumpy()
    expected = -logp[onp.arange(len(labels)), batch['labels']].sum()
    hits = int((logp.argmax(-1) == batch['labels']).sum())
    step = FinetuneStep(net, make_trainer(net.collect_params(), 1e-3, None, 'sgd'), [mx.cpu()])
    loss_sum, correct = step(batch)
    onp.testing.assert_allclose(loss_sum.asscalar(), expected, rtol=1e-6)
    assert correct.asscalar() == hits
    got, ref = _grads(net), _grads(ref_net)
    scale = max(float(onp.abs(g).max()) for g in ref.values())
    for name in ref:
        if name.endswith('attention.W_k.bias'):
            # zero in theory (softmax ignores a shift shared by all keys): both are float
            # noise, which depends on the order of the sums (the step's fused cross-entropy)
            assert float(onp.abs(got[name]).max()) < 1e-6 * scale, name
            continue
        assert_close(got[name], ref[name], rtol=1e-4, what=name)


# -- inputs: split_batch and _as_nd --------------------------------------------------------------

def test_split_batch_gives_the_numpy_values_on_each_device():
    batch = _pretrain_batch(onp.random.RandomState(10), B=7)
    keys = PretrainStep.keys
    [one] = split_batch(batch, keys, [mx.cpu(0)])
    for key, nd in zip(keys, one):
        assert nd.context == mx.cpu(0) and nd.dtype == batch[key].dtype
        onp.testing.assert_array_equal(nd.asnumpy(), batch[key])
    shards = split_batch(batch, keys, [mx.cpu(0), mx.cpu(1)])
    bounds = [(0, 3), (3, 7)]  # contiguous, even parts
    for (lo, hi), ctx, shard in zip(bounds, (mx.cpu(0), mx.cpu(1)), shards):
        for key, nd in zip(keys, shard):
            assert nd.context == ctx
            onp.testing.assert_array_equal(nd.asnumpy(), batch[key][lo:hi])


def test_as_nd_of_non_contiguous_and_read_only_arrays():
    rs = onp.random.RandomState(11)
    base = rs.randint(0, 100, (6, 10)).astype('int32')
    read_only = base.copy()
    read_only.setflags(write=False)
    for what, a in [('strided', base[:, ::2]), ('transposed', base.T),
                    ('fortran', onp.asfortranarray(base)), ('column', base[:, 3]),
                    ('read-only', read_only),
                    ('broadcast', onp.broadcast_to(base[0].astype('float32'), (4, 10)))]:
        for ctx in (mx.cpu(0), mx.cpu(1)):
            nd = _as_nd(a, ctx)
            assert nd.context == ctx and nd.dtype == a.dtype, what
            onp.testing.assert_array_equal(nd.asnumpy(), a, err_msg=what)


def test_as_nd_keeps_its_data_when_the_numpy_array_is_gone():
    a = onp.random.RandomState(12).randint(0, 1000, (128, 64)).astype('int32')
    expected = a.copy()
    nd = _as_nd(a, mx.cpu())
    del a
    gc.collect()
    clobber = [onp.full((128, 64), -1, dtype='int32') for _ in range(20)]  # reuse freed memory
    onp.testing.assert_array_equal(nd.asnumpy(), expected)
    assert clobber[0][0, 0] == -1


@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_a_step_leaves_the_callers_batch_as_it_was(task, hybridize):
    rs = onp.random.RandomState(13)
    batch = _pretrain_batch(rs) if task == 'pretrain' else _finetune_batch(rs)
    before = copy.deepcopy(batch)
    net, _ = _twin_nets(task, hybridize)
    cls = PretrainStep if task == 'pretrain' else FinetuneStep
    step = cls(net, make_trainer(net.collect_params(), 1e-2, None), [mx.cpu()])
    for _ in range(2):
        out = step(batch)
    mx.nd.waitall()
    assert all(onp.isfinite(o.asscalar()) for o in out)
    for key in before:
        onp.testing.assert_array_equal(batch[key], before[key], err_msg=key)
        assert batch[key].dtype == before[key].dtype
        assert batch[key].flags.writeable, f'{key} was made read-only'


@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_a_step_on_non_contiguous_arrays_equals_one_on_copies(task):
    rs = onp.random.RandomState(14)
    batch = _pretrain_batch(rs) if task == 'pretrain' else _finetune_batch(rs)
    strided = {}
    for key, a in batch.items():  # the same values, every array a strided view
        wide = onp.zeros((a.shape[0], 2) + a.shape[1:], dtype=a.dtype)
        wide[:, 1] = a
        strided[key] = wide[:, 1]
        assert not strided[key].flags.c_contiguous, key
    strided['tokens'] = onp.asfortranarray(batch['tokens'])
    cls = PretrainStep if task == 'pretrain' else FinetuneStep
    results = []
    for b in (batch, strided):
        net, _ = _twin_nets(task, True)
        step = cls(net, make_trainer(net.collect_params(), 1e-2, None), [mx.cpu()])
        results.append([[o.asscalar() for o in step(b)] for _ in range(2)])
    onp.testing.assert_allclose(results[1], results[0], rtol=1e-6)
