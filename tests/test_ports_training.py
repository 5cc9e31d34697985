"""Training through the runners: 20 steps from the same weights and batches give the same loss
curve as our hybridized MXNet BERT with gluon.Trainer('adam') (within 1e-3 relative, dropout
off), and the runner interface behaves as the training loop expects."""
from __future__ import annotations


import numpy as onp
import pytest
import mxnet as mx
from mxnet import autograd, gluon

from gluon_bert.config import BERTConfig
from gluon_bert.model import BERTClassifier, BERTModel, legacy_scope
from gluon_bert.ports import convert
from gluon_bert.train.runners import FINETUNE_KEYS, make_runner
from gluon_bert.ports.synthetic import synthetic_batch
from ports_fixtures import FRAMEWORKS



VOCAB = 97
STEPS = 20
CURVE_TOL = 1e-3
CASES = [  # (preset, task, batch, length, predictions, learning rate)
    ('tiny', 'pretrain', 8, 16, 3, 0.01),      # the book's pretraining rate
    ('tiny', 'finetune', 8, 16, 3, 1e-4),      # the book's fine-tuning rate
    # At 0.01 a 256-wide BERT on these small random batches is unstable (its loss climbs to
    # 7), and an unstable run amplifies float rounding (curves 2e-3 apart after 20 steps).
    ('bert.small', 'pretrain', 4, 24, 4, 1e-3),
]


def nd(array):
    return mx.nd.array(array, dtype=array.dtype)


def mxnet_loss(net, batch, task):
    """Forward and the book's loss (`_get_batch_loss_bert`; fine-tuning: mean cross-entropy)."""
    ce = gluon.loss.SoftmaxCrossEntropyLoss()
    inputs = [nd(batch['tokens']), nd(batch['segments']), nd(batch['valid_lens'])]
    if task == 'finetune':
        return ce(net(*inputs), nd(batch['labels'])).mean()
    _, mlm_Y_hat, nsp_Y_hat = net(*inputs, nd(batch['pred_positions']))
    weights = nd(batch['mlm_weights']).reshape((-1, 1))
    mlm_l = ce(mlm_Y_hat.reshape((-1, VOCAB)), nd(batch['mlm_labels']).reshape(-1), weights)
    mlm_l = mlm_l.sum() / (weights.sum() + 1e-8)
    return mlm_l + ce(nsp_Y_hat, nd(batch['nsp_labels'])).mean()


def mxnet_curve(config, task, batches, lr):
    """Initial weights and the loss of each of the steps, in MXNet."""
    with legacy_scope():
        mx.random.seed(0)
        net = BERTModel(config)
        net.initialize(mx.init.Xavier())
        if task == 'finetune':
            net = BERTClassifier(net)
            net.output.initialize()
        net.hybridize()
        mxnet_loss(net, batches[0], task)  # creates the deferred weights
        params = convert.mxnet_params(net)
        trainer = gluon.Trainer(net.collect_params(), 'adam', {'learning_rate': lr})
        losses = []
        for batch in batches:
            with autograd.record():
                loss = mxnet_loss(net, batch, task)
            loss.backward()
            trainer.step(1)  # the loss is already a mean, as in the book's pretraining loop
            losses.append(float(loss.asscalar()))
        return params, onp.array(losses), convert.mxnet_params(net)


@pytest.fixture(scope='module', params=CASES, ids=['-'.join(c[:2]) for c in CASES])
def curve(request):
    preset, task, B, L, P, lr = request.param
    config = BERTConfig.from_preset(preset, vocab_size=VOCAB, dropout=0.0)
    rng = onp.random.default_rng(1)
    batches = [synthetic_batch(rng, config, task, B, L, P) for _ in range(STEPS)]
    params, losses, final = mxnet_curve(config, task, batches, lr)
    return preset, task, lr, config, batches, params, losses, final


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_loss_curves_match_mxnet(curve, framework):
    preset, task, lr, config, batches, params, mx_losses, mx_final = curve
    runner = make_runner(framework, config, params, task=task, lr=lr)
    losses = onp.array([runner.train_step(batch)['loss'] for batch in batches])
    runner.sync()
    rel = onp.abs(losses - mx_losses) / onp.abs(mx_losses)
    final = runner.params()
    weight_diff = max(float(onp.abs(final[n] - a).max()) for n, a in mx_final.items())
    print(f'\n{preset} {task} {framework}: loss {mx_losses[0]:.4f} -> {mx_losses[-1]:.4f}, '
          f'max relative diff over {STEPS} steps {rel.max():.2e}, '
          f'final weights max abs diff {weight_diff:.2e}')
    # The weights really moved (Adam's first step moves each by about lr).
    assert max(float(onp.abs(mx_final[n] - a).max()) for n, a in params.items()) > lr
    assert rel.max() < CURVE_TOL, (losses, mx_losses)


# -- the runner interface ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
    config = BERTConfig.from_preset('tiny', vocab_size=VOCAB, dropout=0.0)
    rng = onp.random.default_rng(2)
    batch = synthetic_batch(rng, config, 'pretrain', 4, 12, 3)
    with legacy_scope():
        net = BERTModel(config)
        net.initialize(mx.init.Xavier())
        net(nd(batch['tokens']), nd(batch['segments']), nd(batch['valid_lens']))
    return config, convert.mxnet_params(net), batch


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_runner_interface(tiny, framework):
    config, params, batch = tiny
    runner = make_runner(framework, config, params, task='pretrain', lr=0.01)
    assert runner.name.startswith(framework)
    back = runner.params()  # MXNet names, untouched until a step
    assert sorted(back) == sorted(params)
    assert all(back[n].tobytes() == a.tobytes() for n, a in params.items())
    metrics = runner.train_step(batch)
    assert set(metrics) == {'loss', 'mlm', 'nsp'}
    assert all(isinstance(v, float) for v in metrics.values())
    assert abs(metrics['loss'] - metrics['mlm'] - metrics['nsp']) < 1e-5
    runner.sync()
    assert any(not onp.array_equal(runner.params()[n], a) for n, a in params.items())
    with pytest.raises(KeyError, match='lacks mlm_weights'):
        runner.train_step({k: v for k, v in batch.items() if k != 'mlm_weights'})
    with pytest.raises(KeyError, match='lacks labels'):
        clf_params = {n: a for n, a in params.items() if not n.startswith(('mlm.', 'nsp.'))}
        clf_params.update({'output.weight': onp.zeros((3, config.num_hiddens), 'float32'),
                           'output.bias': onp.zeros(3, 'float32')})
        clf = make_runner(framework, config, clf_params, task='finetune')
        clf.train_step({k: batch[k] for k in FINETUNE_KEYS[:-1]})


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_dropout_is_on_in_training_only_and_seeded(tiny, framework):
    config, params, batch = tiny
    noisy = config.replace(dropout=0.3)

    def first_losses(cfg, seed):
        runner = make_runner(framework, cfg, params, task='pretrain', lr=0.01, seed=seed)
        predicted = runner.predict(batch)[1]
        return runner.train_step(batch)['loss'], predicted

    clean_loss, clean_pred = first_losses(config, 0)
    loss_a, pred_a = first_losses(noisy, 0)
    loss_b, _ = first_losses(noisy, 0)
    loss_c, _ = first_losses(noisy, 1)
    assert loss_a != clean_loss                # dropout changes the training loss,
    assert onp.array_equal(pred_a, clean_pred)  # but not predictions;
    assert loss_a == loss_b                    # the seed fixes the masks,
    assert loss_a != loss_c                    # and another seed draws others.


def test_bad_runner_arguments(tiny):
    config, params, _ = tiny
    with pytest.raises(ValueError, match='unknown framework'):
        make_runner('tensorflow', config, params)
    pytest.importorskip('jax')
    with pytest.raises(ValueError, match='task must be'):
        make_runner('jax', config, params, task='pretraining')
    with pytest.raises(convert.ConversionError, match='expected'):
        make_runner('jax', config.replace(num_hiddens=64), params)


@pytest.mark.slow
def test_torch_compile_matches_eager(tiny):
    pytest.importorskip('torch')
    config, params, batch = tiny
    eager = make_runner('torch', config, params, lr=0.01)
    compiled = make_runner('torch', config, params, lr=0.01, compile=True)
    assert compiled.name == 'torch.compile'
    for _ in range(3):
        a, b = eager.train_step(batch)['loss'], compiled.train_step(batch)['loss']
        assert abs(a - b) / a < 1e-4


@pytest.mark.parametrize('framework', FRAMEWORKS)
def test_schedule_and_clipping_match_our_mxnet_step(tiny, framework):
    """With warmup, linear decay and a global-norm clip that bites, the ports follow the
    package's own MXNet step (MXNetRunner, as `compare` and `--framework` use it)."""
    from gluon_bert.train.runners import MXNetRunner
    from gluon_bert.train.schedule import learning_rate
    config, params, _ = tiny
    rng = onp.random.default_rng(3)
    batches = [synthetic_batch(rng, config, 'pretrain', 8, 16, 3) for _ in range(10)]

    def curve(runner):
        out = []
        for step, batch in enumerate(batches):
            runner.set_learning_rate(learning_rate(step, 0.01, len(batches), 3, 'linear'))
            out.append(runner.train_step(batch)['loss'])
        return onp.array(out)

    ours = curve(MXNetRunner(config, params, lr=0.01, clip_norm=0.5))
    port = curve(make_runner(framework, config, params, lr=0.01, clip_norm=0.5))
    unclipped = curve(MXNetRunner(config, params, lr=0.01))
    assert onp.abs(unclipped - ours).max() > 1e-3  # the clip changes the run
    assert (onp.abs(port - ours) / ours).max() < CURVE_TOL, (port, ours)


def test_mxnet_runner_predicts_masked_tokens(tiny):
    from gluon_bert.train.runners import MXNetRunner
    config, params, batch = tiny
    mlm, nsp = MXNetRunner(config, params).predict(batch)
    assert mlm.shape == batch['pred_positions'].shape + (VOCAB,) and nsp.shape == (4, 2)
    no_mlm, same_nsp = MXNetRunner(config, params).predict(
        {k: v for k, v in batch.items() if k != 'pred_positions'})
    assert no_mlm is None and onp.allclose(same_nsp, nsp, atol=1e-6)


def test_ports_refuse_mxnet_device_lists(tmp_path):
    from gluon_bert.config import TrainConfig
    from gluon_bert.errors import ConfigError
    TrainConfig(devices='cpu(0),cpu(1)', out_dir=str(tmp_path))
    with pytest.raises(ConfigError, match='--devices cpu.0.,cpu.1. is for MXNet'):
        TrainConfig(devices='cpu(0),cpu(1)', out_dir=str(tmp_path), framework='torch')


@pytest.mark.parametrize('framework', ['mxnet', *FRAMEWORKS])
@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_optimizer_state_round_trips_by_name(tiny, framework, task):
    """A runner restored from another's parameters and optimizer state takes the same next
    step: the state is keyed by parameter name, not by position."""
    config, params, batch = tiny
    if task == 'finetune':
        params = {n: a for n, a in params.items() if not n.startswith(('mlm.', 'nsp.'))}
        rng = onp.random.default_rng(5)
        params.update({'output.weight': rng.uniform(-.07, .07, (3, config.num_hiddens)).astype('float32'),
                       'output.bias': onp.zeros(3, 'float32')})
        batch = dict({k: batch[k] for k in FINETUNE_KEYS[:-1]},
                     labels=rng.integers(0, 3, len(batch['tokens'])).astype('int32'))
    a = make_runner(framework, config, params, task=task, lr=0.01)
    assert a.optimizer_state() == {}
    for step in range(2):
        a.train_step(batch, step)
    state = a.optimizer_state()
    assert {k.split('/', 1)[1] for k in state} == set(a.params())  # every parameter, by name
    assert all(int(state[k]) == 2 for k in state if k.startswith('t/'))
    b = make_runner(framework, config, a.params(), task=task, lr=0.01)
    b.load_optimizer_state(dict(reversed(list(state.items()))))  # order does not matter
    la, lb = a.train_step(batch, 2), b.train_step(batch, 2)
    assert la == lb
    pa, pb = a.params(), b.params()
    assert all(onp.array_equal(pa[n], pb[n]) for n in pa)
