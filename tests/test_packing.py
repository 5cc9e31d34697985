"""Packed pretraining and fine-tuning batches (`gluon_bert.data.packing`) and the packed
steps: the host-side index arrays against the padded batch they come from, and the packed
model and steps against the padded ones (the same outputs at the real positions, the same
losses and gradients)."""
from __future__ import annotations

import mxnet as mx
import numpy as onp
import pytest

from gluon_bert.config import BERTConfig
from gluon_bert.data.packing import (FINETUNE_PACKED_KEYS, PACKED_KEYS, PackedSizes,
                                     pack_finetune_batch, pack_pretrain_batch)
from gluon_bert.model import BERTClassifier, BERTModel
from gluon_bert.train.step import FinetuneStep, PretrainStep, make_trainer

from batches import pretrain_batch

VOCAB = 60


def _batch(seed, B=8, L=12, P=3, drop=0.3):
    return pretrain_batch(onp.random.RandomState(seed), B, L, P, vocab=VOCAB, drop=drop)


# -- the index arrays ----------------------------------------------------------------------


def test_packed_arrays_address_the_real_tokens_and_predictions():
    batch = _batch(0)
    B, L = batch['tokens'].shape
    lengths = batch['valid_lens'].astype(int)
    T, K = int(lengths.sum()), int((batch['mlm_weights'] != 0).sum())
    p = pack_pretrain_batch(batch, num_tokens=T + 5, num_rows=K + 3)
    assert set(p) == set(PACKED_KEYS)
    assert p['tokens'].shape == p['pack'].shape == (T + 5,) and p['unpack'].shape == (B, L)
    assert p['mlm_rows'].shape == (K + 3,)
    # the real tokens in row-major order, with their segments and positions
    flat = p['pack'][:T]
    b, l = flat // L, flat % L
    assert (l < lengths[b]).all() and len(set(flat.tolist())) == T
    onp.testing.assert_array_equal(p['tokens'][:T], batch['tokens'][b, l])
    onp.testing.assert_array_equal(p['segments'][:T], batch['segments'][b, l])
    onp.testing.assert_array_equal(p['positions'][:T], l)
    # unpack inverts pack at every real position; padding points at row 0
    for bb in range(B):
        for ll in range(L):
            row = p['unpack'][bb, ll]
            assert (p['pack'][row] == bb * L + ll) if ll < lengths[bb] else row == 0
    onp.testing.assert_array_equal(p['pack'][p['cls_rows']], onp.arange(B) * L)
    # each real prediction: the packed row of its position, its label and weight, in order
    real = batch['mlm_weights'] != 0
    example = onp.nonzero(real)[0]
    onp.testing.assert_array_equal(p['pack'][p['mlm_rows'][:K]],
                                   example * L + batch['pred_positions'][real])
    onp.testing.assert_array_equal(p['mlm_labels'][:K], batch['mlm_labels'][real])
    onp.testing.assert_array_equal(p['mlm_weights'][:K], batch['mlm_weights'][real])
    # the extra entries point at row 0 and weigh nothing
    assert (p['pack'][T:] == 0).all() and (p['mlm_rows'][K:] == 0).all()
    assert (p['mlm_weights'][K:] == 0).all()


def test_packing_refuses_what_it_cannot_represent():
    batch = _batch(1)
    T = int(batch['valid_lens'].sum())
    with pytest.raises(ValueError, match='num_tokens'):
        pack_pretrain_batch(batch, num_tokens=T - 1)
    with pytest.raises(ValueError, match='num_rows'):
        pack_pretrain_batch(batch, num_rows=0)
    bad = dict(batch, valid_lens=batch['valid_lens'] * 0)
    with pytest.raises(ValueError, match='valid_lens'):
        pack_pretrain_batch(bad)
    # a weighted prediction at a padding position would read a row that is not there
    bad = {k: v.copy() for k, v in batch.items()}
    b = int(onp.argmin(bad['valid_lens']))
    bad['pred_positions'][b, 0] = bad['tokens'].shape[1] - 1
    bad['valid_lens'][b] = bad['tokens'].shape[1] - 1
    bad['mlm_weights'][b, 0] = 1.0
    with pytest.raises(ValueError, match='padding position'):
        pack_pretrain_batch(bad)


def test_packed_sizes_grow_only_in_steps_and_never_past_the_padded_batch():
    sizes = PackedSizes(granularity=4)              # steps of 96 / 4 = 24 tokens
    short = _batch(2, L=12)
    short['valid_lens'][:] = 5                      # 40 real tokens of 96
    t1, r1 = sizes.update(short)
    assert t1 == 48 and r1 >= int((short['mlm_weights'] != 0).sum())
    long = _batch(3, L=12)
    long['valid_lens'][:] = 11                      # 88 tokens: 96, the whole batch
    assert sizes.update(long)[0] == 96
    assert sizes.update(short) == (96, sizes.num_rows)   # never shrinks
    # shards share one size: the largest any of them needs
    sizes = PackedSizes(granularity=4)
    assert sizes.update([short, long])[0] == 96
    # small batches: steps of at least 8, and never more than the padded batch
    tiny = _batch(4, B=2, L=5, P=2)
    t, r = PackedSizes().update(tiny)
    assert t <= tiny['tokens'].size and r <= tiny['mlm_weights'].size
    # ... but an epoch's short last batch does not shrink the sizes of the full ones
    assert sizes.update(tiny) == (96, sizes.num_rows)


# -- the packed model and step against the padded ones ---------------------------------------


@pytest.mark.parametrize('preset', ['tiny', 'tiny.bert'])
@pytest.mark.filterwarnings('ignore:.*not used by any computation')  # gb_attention: no unpack
def test_packed_model_equals_the_padded_model_at_real_positions(preset, hybridize):
    """encode_packed's rows are forward's rows at the real positions; the MLM and NSP
    outputs are the padded model's at the real predictions. `tiny.bert` has the BERT
    options: LayerNorm after the embeddings, GELU, the decoder tied to the embedding."""
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=0.0)
    net = BERTModel(config)
    net.initialize(mx.init.Xavier())
    batch = _batch(4)
    p = pack_pretrain_batch(batch, num_tokens=int(batch['valid_lens'].sum()) + 7,
                            num_rows=int((batch['mlm_weights'] != 0).sum()) + 2)
    nd = {k: mx.nd.array(v, dtype=v.dtype) for k, v in {**batch, **p}.items()}
    padded = {k: mx.nd.array(v, dtype=v.dtype) for k, v in batch.items()}
    encoded, mlm_hat, nsp_hat = net(padded['tokens'], padded['segments'],
                                    padded['valid_lens'], padded['pred_positions'])

    class Packed(mx.gluon.HybridBlock):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def hybrid_forward(self, F, *args):
            tokens, segments, positions, valid_lens, unpack, pack, cls_rows, mlm_rows = args
            X = self.net.encoder.encode_packed(F, tokens, segments, positions, valid_lens,
                                               unpack, pack)
            mlm, nsp = self.net.pretrain_packed(F, *args)
            return X, mlm, nsp

    packed = Packed(net)
    if hybridize:
        packed.hybridize(static_alloc=True, static_shape=True)
    X, mlm, nsp = packed(*(nd[k] for k in ('tokens', 'segments', 'positions', 'valid_lens',
                                           'unpack', 'pack', 'cls_rows', 'mlm_rows')))
    T = int(batch['valid_lens'].sum())
    B, L = batch['tokens'].shape
    ref = encoded.asnumpy().reshape(B * L, -1)[p['pack'][:T]]        # (B, L, H) -> (T, H)
    scale = float(onp.abs(ref).max())
    onp.testing.assert_allclose(X.asnumpy()[:T], ref, rtol=0, atol=2e-5 * scale)
    real = batch['mlm_weights'] != 0
    K = int(real.sum())
    onp.testing.assert_allclose(mlm.asnumpy()[:K], mlm_hat.asnumpy()[real], rtol=0,
                                atol=2e-5 * float(onp.abs(mlm_hat.asnumpy()).max()))
    onp.testing.assert_allclose(nsp.asnumpy(), nsp_hat.asnumpy(), rtol=0,
                                atol=2e-5 * float(onp.abs(nsp_hat.asnumpy()).max()))


def _twins(preset, make=BERTModel):
    """Two hybridized nets (`make`: BERTModel or BERTClassifier) with the same weights.
    (Two devices against one, packed by default: tests/test_train.py.)"""
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=0.0)
    nets = [make(config), make(config)]
    nets[0].initialize(mx.init.Xavier())
    nets[1].initialize()
    src, dst = (n._collect_params_with_prefix() for n in nets)
    for name, param in src.items():
        dst[name].set_data(param.data().copy())
    for n in nets:
        n.hybridize(static_alloc=True, static_shape=True)
    return nets


@pytest.mark.parametrize('preset', ['tiny', 'tiny.bert'])
def test_packed_step_trains_as_the_padded_step(preset):
    """Three SGD steps on changing batches (the packed shapes grow, then stay): the packed
    step's losses and parameters follow the padded step's."""
    nets = _twins(preset)
    before = {n: p.data().asnumpy() for n, p in nets[0]._collect_params_with_prefix().items()}
    steps = [PretrainStep(net, make_trainer(net.collect_params(), 0.5, None, 'sgd'),
                          [mx.cpu()], packed=packed) for net, packed in zip(nets, (True, False))]
    for seed, L in ((5, 12), (6, 10), (7, 12)):
        batch = _batch(seed, L=L)
        (m1, n1), (m2, n2) = (s(batch) for s in steps)
        onp.testing.assert_allclose([m1.asscalar(), n1.asscalar()],
                                    [m2.asscalar(), n2.asscalar()], rtol=1e-5)
    assert steps[0].sizes.num_tokens >= 12 * 8 // 2
    _assert_trained_alike(nets, before, spare=1)  # a W_k bias may get ~0


def _assert_trained_alike(nets, before, spare):
    """The two nets' parameters agree, and all but `spare` of them moved from `before`."""
    p1, p2 = (n._collect_params_with_prefix() for n in nets)
    moved = 0
    # one scale for all: the W_k biases stay at float noise (softmax ignores a shift that
    # all keys share), which the two sums' orders make differently
    scale = max(float(onp.abs(p.data().asnumpy()).max()) for p in p2.values())
    for name, param in p1.items():
        got, ref = param.data().asnumpy(), p2[name].data().asnumpy()
        onp.testing.assert_allclose(got, ref, rtol=0, atol=2e-5 * scale, err_msg=name)
        moved += not onp.array_equal(got, before[name])
    assert moved >= len(p1) - spare  # every parameter trained



def test_reserved_sizes_hold_for_every_batch_shown():
    """The loop shows the step an epoch's batches first (`runner.reserve`): the step then
    runs all of them at one shape, its graph planned once."""
    net, _ = _twins('tiny')
    step = PretrainStep(net, make_trainer(net.collect_params(), 0.1, None, 'sgd'), [mx.cpu()])
    batches = [_batch(seed, L=12) for seed in range(10, 16)]
    batches.append(_batch(16, B=3, L=12))  # an epoch's short last batch
    for b in batches:
        step.reserve(b)
    reserved = (step.sizes.num_tokens, step.sizes.num_rows)
    assert reserved[0] >= max(int(b['valid_lens'].sum()) for b in batches)
    for b in batches:
        step(b)
        assert (step.sizes.num_tokens, step.sizes.num_rows) == reserved
    mx.nd.waitall()


# -- fine-tuning ---------------------------------------------------------------------------


def _finetune_batch(seed, B=8, L=12):
    batch = _batch(seed, B=B, L=L)
    labels = onp.random.RandomState(seed).randint(0, 3, B).astype('int32')
    return dict(tokens=batch['tokens'], segments=batch['segments'],
                valid_lens=batch['valid_lens'], labels=labels)


def test_finetune_packing_keeps_the_sequences_and_labels():
    batch = _finetune_batch(0)
    packed = pack_finetune_batch(batch, num_tokens=100)
    assert tuple(packed) == FINETUNE_PACKED_KEYS
    lengths = batch['valid_lens'].astype(int)
    T = lengths.sum()
    assert packed['tokens'].shape == (100,) and not packed['tokens'][T:].any()
    # the packed tokens are the real ones, <cls> rows at each sequence's start
    real = onp.concatenate([batch['tokens'][b, :n] for b, n in enumerate(lengths)])
    onp.testing.assert_array_equal(packed['tokens'][:T], real)
    onp.testing.assert_array_equal(packed['cls_rows'],
                                   onp.concatenate([[0], onp.cumsum(lengths)[:-1]]))
    onp.testing.assert_array_equal(packed['labels'], batch['labels'])
    # a fine-tuning shard has no predictions: its packed sizes count tokens only
    assert PackedSizes().update(batch)[1] == 0


@pytest.mark.parametrize('preset', ['tiny', 'tiny.bert'])
def test_packed_finetune_step_trains_as_the_padded_step(preset):
    """Three SGD steps: the packed fine-tuning step (the classifier on the real tokens, its
    last block at <cls>) gives the padded step's losses, hits and parameters."""
    nets = _twins(preset, BERTClassifier)
    before = {n: p.data().asnumpy() for n, p in nets[0]._collect_params_with_prefix().items()}
    steps = [FinetuneStep(net, make_trainer(net.collect_params(), 0.5, None, 'sgd'),
                          [mx.cpu()], packed=packed) for net, packed in zip(nets, (True, False))]
    for seed, L in ((5, 12), (6, 10), (7, 12)):
        batch = _finetune_batch(seed, L=L)
        (l1, h1), (l2, h2) = (s(batch) for s in steps)
        onp.testing.assert_allclose(l1.asscalar(), l2.asscalar(), rtol=1e-5)
        assert h1.asscalar() == h2.asscalar()
    assert steps[0].sizes.num_tokens >= 12 * 8 // 2 and steps[0].sizes.num_rows == 0
    _assert_trained_alike(nets, before, spare=2)  # W_k biases may get ~0


@pytest.mark.parametrize('hybridize', [False, True], ids=['imperative', 'hybridized'])
def test_packed_evaluation_counts_what_the_padded_one_counts(hybridize):
    """count_correct on packed shards (the default for our classifier) against the padded
    batches: the same hits, over full batches and a short last one, on two devices."""
    from gluon_bert.data.batching import BatchLoader
    from gluon_bert.train.finetune import count_correct
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.1)
    contexts = [mx.cpu(0), mx.cpu(1)]
    net = BERTClassifier(config)
    net.initialize(mx.init.Normal(0.5), ctx=contexts)
    if hybridize:
        net.hybridize(static_alloc=True, static_shape=True)
    parts = [_finetune_batch(seed, B=8, L=12) for seed in range(3)]
    arrays = {k: onp.concatenate([p[k] for p in parts])[:21] for k in parts[0]}
    loader = BatchLoader(arrays, 8, shuffle=False)
    packed = count_correct(net, loader, contexts, packed=True)
    padded = count_correct(net, loader, contexts, packed=False)
    assert packed == padded and packed[1] == 21
    assert count_correct(net, loader, contexts) == packed  # packed by default
    assert 0 < packed[0] < 21  # random weights: some right, some wrong


# -- packed inference -----------------------------------------------------------------------


def _without_labels(batch):
    return {k: v for k, v in batch.items() if k not in ('labels', 'mlm_labels', 'nsp_labels')}


@pytest.mark.parametrize('preset', ['tiny', 'tiny.bert'])
@pytest.mark.filterwarnings('ignore:.*not used by any computation')
def test_packed_forward_gives_the_padded_outputs(preset, hybridize):
    """step.PackedForward (runner.infer_async, `gluon-bert predict`, evaluation): the
    classifier's logits and BERTModel's MLM and NSP outputs at the real predictions are the
    padded forward's, for batches without labels; one graph and grow-only sizes serve a
    larger and then a smaller batch."""
    from gluon_bert.train.step import PackedForward
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=0.5)  # off: inference
    ctx = mx.cpu()

    def close(a, b):
        onp.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(onp.abs(b).max()))

    for make in (BERTModel, BERTClassifier):
        net = make(config)
        net.initialize(mx.init.Normal(0.5))
        if hybridize:
            net.hybridize(static_alloc=True, static_shape=True)
        forward = PackedForward(net)
        graph = forward.graph
        for seed, B in ((5, 8), (6, 3)):
            batch = _without_labels(_batch(seed, B=B))
            padded = net(*(mx.nd.array(batch[k], dtype=batch[k].dtype) for k in
                           ('tokens', 'segments', 'valid_lens', 'pred_positions')[:4 if
                           make is BERTModel else 3]))
            out = forward(batch, ctx)
            if make is BERTClassifier:
                assert out.shape == (B, config.num_classes)
                close(out.asnumpy(), padded.asnumpy())
                continue
            _, mlm_hat, nsp_hat = padded
            mlm, nsp = out
            real = batch['mlm_weights'] != 0
            assert mlm.shape[0] >= real.sum() and nsp.shape == (B, 2)
            close(mlm.asnumpy()[:int(real.sum())], mlm_hat.asnumpy()[real])
            close(nsp.asnumpy(), nsp_hat.asnumpy())
        assert forward.graph is graph and forward.sizes.num_tokens >= 8 * 12 // 2


def test_runner_inference_is_packed_as_its_step():
    """MXNetRunner.infer_async and predict: packed by default, padded with packed=False,
    the same logits either way; the bench times infer_async."""
    from gluon_bert.train.runners import MXNetRunner
    from gluon_bert.train.step import PackedForward
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.1)
    net = BERTClassifier(config)
    net.initialize(mx.init.Normal(0.5))
    params = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}
    batch = _finetune_batch(7)
    runners = [MXNetRunner(config, params, task='finetune', packed=p) for p in (True, False)]
    logits = [r.infer_async(batch).asnumpy() for r in runners]
    assert isinstance(runners[0]._forward, PackedForward) and runners[1]._forward is None
    onp.testing.assert_allclose(logits[0], logits[1], rtol=0,
                                atol=2e-5 * float(onp.abs(logits[1]).max()))
    onp.testing.assert_array_equal(runners[0].predict(batch), logits[0])


def test_runner_pretraining_inference_packs_what_it_can():
    """BERTModel through the runner: the heads at the real predictions when the batch says
    which slots are real (mlm_weights), else the book's padded forward, all three outputs."""
    from gluon_bert.train.runners import MXNetRunner
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.1)
    net = BERTModel(config)
    net.initialize(mx.init.Normal(0.5))
    params = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}
    runner = MXNetRunner(config, params, task='pretrain')
    batch = _without_labels(_batch(8))
    mlm, nsp = runner.infer_async(batch)
    encoded, mlm_hat, nsp_hat = runner.infer_async(
        {k: v for k, v in batch.items() if k != 'mlm_weights'})
    real = batch['mlm_weights'] != 0
    onp.testing.assert_allclose(mlm.asnumpy()[:int(real.sum())], mlm_hat.asnumpy()[real],
                                rtol=0, atol=2e-5 * float(onp.abs(mlm_hat.asnumpy()).max()))
    onp.testing.assert_allclose(nsp.asnumpy(), nsp_hat.asnumpy(), rtol=0,
                                atol=2e-5 * float(onp.abs(nsp_hat.asnumpy()).max()))
    assert encoded.shape == batch['tokens'].shape + (config.num_hiddens,)
