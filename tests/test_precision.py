"""Mixed precision (`--dtype`): bfloat16 training of the MXNet model, checkpoints read back in
float32, the refusals, the PyTorch port under autocast, float16 loss scaling, AMX.

MXNet's `amp.init` changes the whole process for good, so every bfloat16 (or float16) MXNet
computation runs in a process of its own (tests/precision_runner.py, which prints JSON);
this pytest process stays float32 throughout.

Tolerances. bfloat16 keeps 8 significant bits (unit roundoff 2^-9 = 2e-3): the model's
outputs are themselves rounded to bfloat16, and errors add up over the layers. Measured on
these tiny models over several seeds: losses within 2e-3 of float32 (relative), outputs
within 1.2e-2 of the largest output. The tests allow 2e-2 for losses and 4e-2 for
outputs, 3x or more beyond what was seen. float16 keeps 11 bits (roundoff 4.9e-4): the
torch port's first losses were within 1.3e-4; 5e-3 is allowed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as onp
import pytest

from precision_runner import as_float32, make_case, run_steps

from gluon_bert.cli import main
from gluon_bert.config import TrainConfig
from gluon_bert.errors import ConfigError
from gluon_bert.train import precision

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'precision_runner.py')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

needs_bf16 = pytest.mark.skipif(
    not {'avx512_bf16', 'amx_bf16'} & precision.cpu_flags(),
    reason='this CPU has neither avx512_bf16 nor amx_bf16: MXNet cannot compute in '
           'bfloat16 on it (check_dtype refuses it)')
no_gpu = mx.context.num_gpus() == 0
cpu_only = pytest.mark.skipif(not no_gpu, reason='float16 is allowed where there are GPUs')

LOSS_RTOL = {'bfloat16': 2e-2, 'float16': 5e-3}  # of the first step's losses (see above)
OUT_RTOL = 4e-2  # bfloat16 outputs, relative to the largest output


def _env(**extra):
    env = dict(os.environ, **extra)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return env


def helper(command, env=None, timeout=240, **args):
    """tests/precision_runner.py COMMAND in a new process -> the JSON it printed last."""
    r = subprocess.run([sys.executable, RUNNER, command, json.dumps(args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=env or _env())
    assert r.returncode == 0, f'{command} failed:\n{r.stderr[-4000:]}'
    return json.loads(r.stdout.strip().splitlines()[-1])


def cli(*argv, timeout=240):
    """`gluon-bert ARGV` in a new process -> (exit code, stdout, stderr)."""
    r = subprocess.run([sys.executable, '-m', 'gluon_bert.cli', *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, env=_env())
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope='module')
def mxnet_runs():
    """{task: (float32 run in this process, bfloat16 run in its own)} of `run_steps`:
    the same weights and batch, 10 steps."""
    cache = {}

    def get(task):
        if task not in cache:
            cache[task] = (run_steps(task, 'float32', steps=10),
                           helper('steps', task=task, dtype='bfloat16', steps=10))
        return cache[task]
    return get


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
    """A float32 pretraining run on the shipped sample (4 steps, a checkpoint at the end)."""
    out = str(tmp_path_factory.mktemp('pre') / 'run')
    assert main(['pretrain', '--out-dir', out, '--preset', 'tiny', '--batch-size', '32',
                 '--max-len', '32', '--num-steps', '4', '--train-limit', '200',
                 '--log-interval', '2', '--no-progress']) == 0
    return out


def _scale(a):
    return float(onp.abs(a).max())


# -- MXNet in bfloat16 --------------------------------------------------------------------------

@needs_bf16
@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_bf16_training_learns_and_keeps_float32_weights(mxnet_runs, task):
    fp32, bf16 = mxnet_runs(task)
    assert bf16['active'] == 'bfloat16' and fp32['active'] == 'float32'
    losses = [r['loss'] for r in bf16['losses']]
    assert all(onp.isfinite(losses))
    assert losses[-1] < 0.7 * losses[0], losses  # fp32 falls by half over these 10 steps
    # weights, their gradients and Adam's moments stay float32; so do the weights read out
    assert bf16['dtypes'] == dict(params=['float32'], data=['float32'], numpy=['float32'],
                                  grads=['float32'], adam=['float32'])


@needs_bf16
@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_bf16_first_step_and_outputs_close_to_float32(mxnet_runs, task):
    fp32, bf16 = mxnet_runs(task)
    for key in ('loss', 'mlm', 'nsp') if task == 'pretrain' else ('loss',):
        ref, got = fp32['losses'][0][key], bf16['losses'][0][key]
        assert abs(got - ref) <= LOSS_RTOL['bfloat16'] * abs(ref), (key, got, ref)
    for key, ref in fp32['outputs'].items():
        ref, got = onp.array(ref), onp.array(bf16['outputs'][key])
        assert ref.shape == got.shape
        err = float(onp.abs(got - ref).max())
        assert err <= OUT_RTOL * _scale(ref), (key, err, _scale(ref))
        # and bfloat16 was really used: float32 would agree to ~1e-6
        assert err > 1e-4 * _scale(ref), f'{key}: bfloat16 gave float32 numbers'


@needs_bf16
@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
def test_bf16_predict_returns_float32_arrays(mxnet_runs, task):
    _, bf16 = mxnet_runs(task)
    assert set(bf16['predict_dtypes'].values()) == {'float32'}, bf16['predict_dtypes']


def test_as_float32_reads_mxnet_bfloat16_bits():
    # the helper the closeness tests rely on: bfloat16 is the upper 16 bits of a float32
    x = onp.array([1.0, -2.5, 3.140625, 0.0, 65280.0], dtype='float32')
    packed = (x.view(onp.uint32) >> 16).astype('<u2').view([('bfloat16', '<u2')])
    onp.testing.assert_array_equal(as_float32(packed), x)


def test_a_second_dtype_in_one_process_is_refused():
    r = helper('switch', first='bfloat16', second=['float16', 'float32'])
    assert r['active'] == 'bfloat16'  # the first stays
    for attempt in ('float16', 'float32', 'runner-float32'):
        assert r['errors'][attempt] is not None, attempt
        assert 'already computes in bfloat16' in r['errors'][attempt]
        assert 'new process' in r['errors'][attempt]


@needs_bf16
def test_bf16_finetune_checkpoint_loads_in_float32(pretrained_run, tmp_path):
    """`gluon-bert finetune --dtype bfloat16`: its checkpoint holds float32 weights that a
    float32 process reads and predicts with, close to the bfloat16 run's own predictions."""
    from gluon_bert.ports.convert import load_mxnet_file
    from gluon_bert.pretrained import load_classifier
    from gluon_bert.train import latest_checkpoint
    out = str(tmp_path / 'ft')
    rs = onp.random.RandomState(0)
    from gluon_bert.data import Vocab
    vocab_size = len(Vocab.load(latest_checkpoint(pretrained_run)))
    valid = rs.randint(4, 33, 24)
    batch = dict(tokens=rs.randint(1, vocab_size, (24, 32)).astype('int32'),
                 segments=(onp.arange(32) >= valid[:, None] // 2).astype('int32'),
                 valid_lens=valid.astype('float32'))
    onp.savez(tmp_path / 'batch.npz', **batch)
    r = helper('cli', argv=['finetune', '--init', pretrained_run, '--out-dir', out,
                            '--dtype', 'bfloat16', '--batch-size', '32', '--max-len', '32',
                            '--num-epochs', '1', '--train-limit', '96', '--lr', '1e-3',
                            '--log-interval', '1', '--no-progress'],
               batch=str(tmp_path / 'batch.npz'), out=str(tmp_path / 'bf16.npz'))
    assert r == dict(code=0, active='bfloat16')
    ckpt = latest_checkpoint(out)
    with open(os.path.join(ckpt, 'state.json')) as f:
        assert json.load(f)['train_config']['dtype'] == 'bfloat16'
    weights = load_mxnet_file(os.path.join(ckpt, 'model.params'))
    assert {str(a.dtype) for a in weights.values()} == {'float32'}
    # this process computes in float32
    assert precision.active_dtype() == 'float32'
    net, _, _ = load_classifier(out, [mx.cpu()])
    fp32 = net(*[mx.nd.array(batch[k], dtype=batch[k].dtype)
                 for k in ('tokens', 'segments', 'valid_lens')]).asnumpy()
    bf16 = as_float32(onp.load(tmp_path / 'bf16.npz')['logits'])
    assert fp32.dtype == onp.float32 and bf16.shape == fp32.shape == (24, 3)
    err = float(onp.abs(bf16 - fp32).max())
    assert err <= OUT_RTOL * _scale(fp32), (err, _scale(fp32))
    assert err > 1e-4 * _scale(fp32)  # the other process did compute in bfloat16


@needs_bf16
def test_resume_in_another_dtype_is_recorded(pretrained_run, tmp_path):
    run = str(tmp_path / 'run')
    shutil.copytree(pretrained_run, run)
    code, _, err = cli('pretrain', '--out-dir', run, '--resume', '--dtype', 'bfloat16',
                       '--num-steps', '6', '--no-progress')
    assert code == 0, err

    def state():
        from gluon_bert.train import latest_checkpoint
        with open(os.path.join(latest_checkpoint(run), 'state.json')) as f:
            return json.load(f)
    s = state()
    assert s['step'] == 6 and s['train_config']['dtype'] == 'bfloat16'
    assert s['resumes'] == [dict(step=4, changes=dict(dtype='bfloat16', num_steps=6))]
    # and back to float32, in this (float32) process
    assert main(['pretrain', '--out-dir', run, '--resume', '--dtype', 'float32',
                 '--num-steps', '8', '--no-progress']) == 0
    s = state()
    assert s['step'] == 8 and s['train_config']['dtype'] == 'float32'
    assert s['resumes'][1] == dict(step=6, changes=dict(dtype='float32', num_steps=8))
    rows = [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]
    assert [r['step'] for r in rows] == [2, 4, 6, 8]
    assert all(onp.isfinite(r['train_mlm']) for r in rows)


# -- refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def float16_refusals(pretrained_run, tmp_path_factory):
    """{command: (exit code, stderr, whether --out-dir exists)} of `--dtype float16` on
    the CPU, each in a process of its own."""
    base = tmp_path_factory.mktemp('f16')
    small = ['--batch-size', '32', '--max-len', '32', '--no-progress', '--dtype', 'float16']
    argvs = dict(pretrain=['pretrain', '--preset', 'tiny', '--num-steps', '2'],
                 finetune=['finetune', '--init', pretrained_run, '--num-epochs', '1'],
                 compare=['compare', 'pretrain', '--frameworks', 'mxnet', '--preset', 'tiny',
                          '--num-steps', '2'])
    cache = {}

    def get(command):
        if command not in cache:
            out = str(base / command)
            code, _, err = cli(*argvs[command], '--out-dir', out, *small)
            cache[command] = code, err, os.path.exists(out)
        return cache[command]
    return get


@cpu_only
@pytest.mark.parametrize('command', ['pretrain', 'finetune', 'compare'])
def test_float16_on_cpu_is_one_line_naming_gpus(float16_refusals, command):
    code, err, _ = float16_refusals(command)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f'gluon-bert {command}: error: --dtype float16 needs GPUs')
    assert 'bfloat16' in lines[0]  # what to use instead
    assert 'Traceback' not in err


@cpu_only
@pytest.mark.parametrize('command', ['pretrain', 'finetune'])
def test_float16_on_cpu_leaves_no_run_folder(float16_refusals, command):
    assert float16_refusals(command)[2] is False


@cpu_only
def test_float16_compare_leaves_no_folder(float16_refusals):
    assert float16_refusals('compare')[2] is False


def test_float64_and_jax_low_precision_are_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(['pretrain', '--dtype', 'float64', '--out-dir', str(tmp_path / 'x')])
    assert exit_.value.code == 2
    assert "argument --dtype: invalid choice: 'float64'" in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()
    with pytest.raises(ConfigError, match=r"dtype must be one of float32, bfloat16, float16, "
                                          r"got 'float64' \(--dtype\)"):
        TrainConfig(dtype='float64')
    with pytest.raises(ConfigError, match='JAX port trains in float32'):
        TrainConfig(framework='jax', dtype='bfloat16')
    with pytest.raises(ConfigError, match='JAX port'):
        TrainConfig(framework='jax', dtype='float16')
    for framework in ('mxnet', 'torch'):  # allowed by the config (devices decide later)
        for dtype in precision.DTYPES:
            assert TrainConfig(framework=framework, dtype=dtype).dtype == dtype
    # 'dtype' may change on resume; the model may not
    cfg, changes = TrainConfig(dtype='bfloat16').resumed_with({'dtype': 'float32'})
    assert cfg.dtype == 'float32' and changes == {'dtype': 'float32'}


def test_check_dtype_by_device(monkeypatch):
    cpu, gpus = [mx.cpu()], [mx.gpu(0), mx.gpu(1)]
    precision.check_dtype('float32', cpu)
    precision.check_dtype('float16', gpus)  # no GPU is touched: contexts are names
    for contexts in (cpu, [mx.cpu(), mx.gpu(0)], None, []):
        with pytest.raises(ConfigError, match='float16 needs GPUs'):
            precision.check_dtype('float16', contexts)
    with pytest.raises(ConfigError, match="got 'int8'"):
        precision.check_dtype('int8', cpu)
    monkeypatch.setattr(precision, 'cpu_flags', lambda: {'avx512f', 'avx2'})
    with pytest.raises(ConfigError, match='avx512_bf16 or AMX'):
        precision.check_dtype('bfloat16', cpu)
    precision.check_dtype('bfloat16', gpus)
    for flags in ({'avx512_bf16'}, {'amx_bf16'}):
        monkeypatch.setattr(precision, 'cpu_flags', lambda flags=flags: flags)
        precision.check_dtype('bfloat16', cpu)
    # none of this switched this process's precision
    assert precision.active_dtype() == 'float32'


# -- the PyTorch port under autocast -------------------------------------------------------------

@pytest.mark.parametrize('task', ['pretrain', 'finetune'])
@pytest.mark.parametrize('dtype', [
    'bfloat16', 'float16'])
def test_torch_autocast_trains_close_to_float32(task, dtype):
    torch = pytest.importorskip('torch')
    from gluon_bert.train.runners import TorchRunner
    config, params, batch = make_case(task, 0)
    runs = {}
    for dt in ('float32', dtype):
        runner = TorchRunner(config, params, task=task, lr=5e-3, seed=0, device='cpu',
                             dtype=dt)
        runs[dt] = runner.read_metrics([runner.train_step_async(batch, s) for s in range(8)])
        # weights (and so checkpoints) stay float32
        assert {p.dtype for p in runner.model.parameters()} == {torch.float32}
        assert {a.dtype for a in runner.params().values()} == {onp.dtype('float32')}
        assert (runner._scaler is not None) == (dt == 'float16')
        if dt == 'float16':
            assert 1.0 <= runner._scaler.get_scale() <= 2.0 ** 24
    ref, got = runs['float32'], runs[dtype]
    keys = ('loss', 'mlm', 'nsp') if task == 'pretrain' else ('loss',)
    for key in keys:
        assert abs(got[0][key] - ref[0][key]) <= LOSS_RTOL[dtype] * abs(ref[0][key]), key
    assert any(got[0][k] != ref[0][k] for k in keys), 'autocast changed nothing'
    losses = [r['loss'] for r in got]
    assert all(onp.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses


def test_torch_runner_refuses_other_dtypes():
    pytest.importorskip('torch')
    from gluon_bert.train.runners import TorchRunner
    config, params, _ = make_case('finetune', 0)
    with pytest.raises(ConfigError, match='float32, bfloat16 or float16'):
        TorchRunner(config, params, task='finetune', device='cpu', dtype='float64')


# -- float16 loss scaling ------------------------------------------------------------------------

def _grads(*values):
    return [mx.nd.array(v, dtype='float32') for v in values]


def test_loss_scale_halves_on_overflow_and_doubles_after_a_clean_window():
    scale = precision.LossScale(scale=2.0 ** 10, window=3)
    finite = _grads([1.0, -2.0], [[3.0e4]], [0.0])
    for bad in (onp.inf, -onp.inf, onp.nan):
        before = scale.scale
        assert scale.overflowed(_grads([1.0, bad], [[2.0]], [0.0])) is True
        assert scale.scale == before / 2
    assert scale.scale == 2.0 ** 7
    # clean steps: doubled after every `window` of them, counted from the last overflow
    seen = []
    for _ in range(7):
        assert scale.overflowed(finite) is False
        seen.append(scale.scale)
    assert seen == [2.0 ** 7, 2.0 ** 7, 2.0 ** 8, 2.0 ** 8, 2.0 ** 8, 2.0 ** 9, 2.0 ** 9]
    # an overflow restarts the count
    assert scale.overflowed(_grads([onp.nan])) is True and scale.scale == 2.0 ** 8
    seen = []
    for _ in range(3):
        assert scale.overflowed(finite) is False
        seen.append(scale.scale)
    assert seen == [2.0 ** 8, 2.0 ** 8, 2.0 ** 9]


def test_loss_scale_bounds_and_many_arrays():
    top = precision.LossScale(scale=2.0 ** 24, window=1)
    assert top.overflowed(_grads([1.0])) is False and top.scale == 2.0 ** 24  # capped
    bottom = precision.LossScale(scale=1.0, window=1)
    assert bottom.overflowed(_grads([onp.inf])) is True and bottom.scale == 1.0  # floored
    # more arrays than one multi_all_finite call takes (200): an overflow in any chunk counts
    for where in (0, 199, 200, 449):
        grads = _grads(*[[float(i)] for i in range(450)])
        grads[where][:] = onp.inf
        s = precision.LossScale(scale=64.0, window=100)
        assert s.overflowed(grads) is True, where
        assert s.scale == 32.0
    s = precision.LossScale(scale=64.0, window=100)
    assert s.overflowed(_grads(*[[float(i)] for i in range(450)])) is False
    assert s.scale == 64.0


def test_loss_scale_defaults():
    s = precision.LossScale()
    assert s.scale == 2.0 ** 16 and s.window == 2000


# -- AMX -----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def amx_cases():
    """enable_amx in one new process (it sets the process's variables and asks Linux for
    AMX), case by case; the machine may or may not have AMX."""
    return helper('amx', cases=[dict(GLUON_BERT_AMX='0'),
                                dict(DNNL_MAX_CPU_ISA='AVX2'),
                                dict(ONEDNN_MAX_CPU_ISA='AVX512_CORE'),
                                dict(GLUON_BERT_AMX='0', DNNL_MAX_CPU_ISA='AVX512_CORE_AMX'),
                                dict()])


def test_enable_amx_respects_the_users_settings(amx_cases):
    off, dnnl, onednn, off_but_set, default = amx_cases
    assert off == dict(enabled=False, DNNL_MAX_CPU_ISA=None, ONEDNN_MAX_CPU_ISA=None)
    assert dnnl == dict(enabled=False, DNNL_MAX_CPU_ISA='AVX2', ONEDNN_MAX_CPU_ISA=None)
    assert onednn == dict(enabled=False, DNNL_MAX_CPU_ISA=None, ONEDNN_MAX_CPU_ISA='AVX512_CORE')
    # GLUON_BERT_AMX=0 wins (reported as off) and touches nothing
    assert off_but_set == dict(enabled=False, DNNL_MAX_CPU_ISA='AVX512_CORE_AMX',
                               ONEDNN_MAX_CPU_ISA=None)
    # by default: AMX exactly where the CPU has it and Linux granted it
    assert default['enabled'] == (default['DNNL_MAX_CPU_ISA'] == 'AVX512_CORE_AMX')
    assert default['ONEDNN_MAX_CPU_ISA'] is None
    if 'amx_bf16' not in precision.cpu_flags():
        assert default == dict(enabled=False, DNNL_MAX_CPU_ISA=None, ONEDNN_MAX_CPU_ISA=None)


@needs_bf16
def test_a_bf16_run_reaches_onednn_with_amx_enabled(amx_cases):
    """enable_amx only works before oneDNN's first primitive: a run as the loop makes it
    (weights initialised, then the runner) must still get there in time."""
    if not amx_cases[-1]['enabled']:
        pytest.skip('no AMX on this machine (or Linux refused it)')
    env = _env(DNNL_VERBOSE='1')
    for name in ('GLUON_BERT_AMX', 'DNNL_MAX_CPU_ISA', 'ONEDNN_MAX_CPU_ISA'):
        env.pop(name, None)
    r = subprocess.run([sys.executable, RUNNER, 'isa', '{}'], cwd=ROOT, capture_output=True,
                       text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    isa = [line for line in r.stdout.splitlines() if line.startswith('dnnl_verbose,info,cpu,isa')]
    assert len(isa) == 1 and 'AMX' in isa[0], isa


# -- GPU -----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(no_gpu, reason='no GPU')
def test_float16_on_gpu_trains_with_loss_scaling():
    r = helper('steps', task='pretrain', dtype='float16', steps=10, devices='gpu(0)')
    assert r['active'] == 'float16'
    losses = [row['loss'] for row in r['losses']]
    assert all(onp.isfinite(losses)) and losses[-1] < 0.7 * losses[0], losses
    assert 1.0 <= r['loss_scale'] <= 2.0 ** 24
    assert r['dtypes']['params'] == ['float32'] and r['dtypes']['adam'] == ['float32']
    ref = run_steps('pretrain', 'float32', steps=1)
    for key in ('loss', 'mlm', 'nsp'):
        assert abs(r['losses'][0][key] - ref['losses'][0][key]) <= \
            LOSS_RTOL['float16'] * abs(ref['losses'][0][key]), key
