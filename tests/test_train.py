"""Training steps, loops, checkpoints and resume (on the shipped sample)."""
from __future__ import annotations

import os

import mxnet as mx
import numpy as onp
import pytest
from mxnet import init

from gluon_bert.config import BERTConfig, TrainConfig
from gluon_bert.model import BERTModel
from gluon_bert.train import (PretrainStep, latest_checkpoint, learning_rate, make_trainer,
                              parse_contexts, pretrain, save_checkpoint)
from gluon_bert.train.checkpoint import CheckpointError

from batches import pretrain_batch

VOCAB = 60




def run_steps(contexts, kvstore, batches, clip_norm=None):
    """Losses, one-step gradients and final parameters of a few SGD steps.

    SGD, not Adam: a gradient that is exactly zero in theory (e.g. `W_k.bias`: softmax
    ignores a shift shared by all keys) holds float noise that depends on how the batch
    was split; Adam divides that noise by its own size and turns it into full-size steps,
    SGD keeps it as small as it is, so every parameter can be compared."""
    mx.random.seed(7)
    net = BERTModel(BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.0))
    net.initialize(init.Xavier(), ctx=contexts)
    net.hybridize(static_alloc=True, static_shape=True)
    trainer = make_trainer(net.collect_params(), 0.1,
                           mx.kv.create(kvstore) if len(contexts) > 1 else None,
                           optimizer='sgd')
    step = PretrainStep(net, trainer, contexts, clip_norm)
    losses, grads = [], None
    for b in batches:
        losses.append(tuple(x.asscalar() for x in step(b)))
        if grads is None:  # the reduced (and clipped) gradients of the first step
            grads = {k: p.grad(contexts[0]).asnumpy()
                     for k, p in net._collect_params_with_prefix().items()}
    return losses, grads, {k: p.data(contexts[0]).asnumpy()
                           for k, p in net._collect_params_with_prefix().items()}


@pytest.mark.parametrize('clip_norm', [None, 0.5])
def test_two_devices_equal_one_with_same_global_batch(clip_norm):
    rs = onp.random.RandomState(0)
    batches = [pretrain_batch(rs) for _ in range(4)]
    one_l, one_g, one_p = run_steps([mx.cpu(0)], None, batches, clip_norm)
    two_l, two_g, two_p = run_steps([mx.cpu(0), mx.cpu(1)], 'device', batches, clip_norm)
    onp.testing.assert_allclose(one_l, two_l, rtol=1e-5)
    # Tolerances relative to each array's own scale: splitting a batch only reorders sums.
    for name in one_p:
        g_scale = float(onp.abs(one_g[name]).max()) + 1e-3
        onp.testing.assert_allclose(one_g[name], two_g[name], rtol=0, atol=1e-4 * g_scale,
                                    err_msg=name)
        p_scale = float(onp.abs(one_p[name]).max()) + 1e-3
        onp.testing.assert_allclose(one_p[name], two_p[name], rtol=0, atol=1e-4 * p_scale,
                                    err_msg=name)
    # the steps really moved every parameter that has a gradient
    assert sum(float(onp.abs(g).max()) > 0 for g in one_g.values()) > len(one_g) // 2


def test_parse_contexts_and_errors():
    assert parse_contexts('cpu(0),cpu(1)') == [mx.cpu(0), mx.cpu(1)]
    assert parse_contexts('cpu') == [mx.cpu(0)]
    assert parse_contexts('auto') == [mx.cpu()]  # no GPU on the test machines
    for bad in ('tpu(0)', 'cpu(0),cpu(0)', 'gpu(0)'):
        with pytest.raises(ValueError):
            parse_contexts(bad)


def test_learning_rate_schedule_is_pure_and_shaped():
    assert learning_rate(10, 0.1, 100) == 0.1
    warm = [learning_rate(s, 1.0, 100, warmup_steps=10, schedule='linear') for s in range(100)]
    assert warm[0] == pytest.approx(0.1) and warm[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(warm[9:], warm[10:])) and warm[-1] < 0.05
    assert learning_rate(55, 1.0, 100, 10, 'cosine') == pytest.approx(0.5)
    with pytest.raises(ValueError):
        learning_rate(0, 1.0, 10, schedule='step')


def small_pretrain(tmp_path, name, **kw):
    return TrainConfig.for_task('pretrain', preset='tiny', batch_size=32, max_len=32,
                                num_steps=kw.pop('num_steps', 12), log_interval=2, lr=2e-3,
                                out_dir=str(tmp_path / name), train_limit=800, **kw)


def test_pretrain_losses_fall_and_resume_is_exact(tmp_path):
    cfg = small_pretrain(tmp_path, 'full', num_steps=16, checkpoint_interval=4)
    full = pretrain(cfg, progress=False)
    hist = [r['train_mlm'] for r in _history(cfg.out_dir)]
    assert hist[-1] < hist[0]
    assert os.path.isfile(full['plot'])
    # interrupted after 6 updates, then resumed: the same losses as the uninterrupted run
    cfg2 = cfg.replace(out_dir=str(tmp_path / 'resumed'))
    pretrain(cfg2, progress=False, stop_after=6)
    with pytest.raises(CheckpointError, match='--resume'):
        pretrain(cfg2, progress=False)
    pretrain(cfg2, resume=True, progress=False)
    a, b = _history(cfg.out_dir), _history(cfg2.out_dir)
    assert [r['step'] for r in a] == [r['step'] for r in b]
    onp.testing.assert_allclose([r['train_mlm'] for r in a], [r['train_mlm'] for r in b],
                                rtol=1e-5)
    onp.testing.assert_allclose([r['train_nsp'] for r in a], [r['train_nsp'] for r in b],
                                rtol=1e-5)


def _history(run_dir):
    import json
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def test_incomplete_checkpoints_are_ignored(tmp_path):
    from gluon_bert.data import Vocab
    net = BERTModel(BERTConfig.from_preset('tiny', vocab_size=VOCAB))
    net.initialize()
    vocab = Vocab([['a', 'b']], reserved_tokens=['<pad>'])
    run = str(tmp_path / 'run')
    params = {k: p.data().asnumpy() for k, p in net._collect_params_with_prefix().items()}
    good = save_checkpoint(run, 3, params, net.config, vocab, dict(task='pretrain', history=[]))
    assert latest_checkpoint(run) == good
    # a crash while writing leaves a temp folder or a newer folder without all files
    os.makedirs(os.path.join(run, '.tmp-ckpt-0000004-1'))
    partial = os.path.join(run, 'ckpt-0000005')
    os.makedirs(partial)
    open(os.path.join(partial, 'model.params'), 'wb').close()
    with open(os.path.join(run, 'latest'), 'w') as f:
        f.write('ckpt-0000005\n')
    assert latest_checkpoint(run) == good
