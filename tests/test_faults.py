"""Fault injection: runs killed (SIGKILL at chosen moments, inside checkpoint writes too),
interrupted (SIGINT, twice in a row, during evaluation and during a save) and stopped
(SIGTERM), for pretraining and fine-tuning, on one and two devices, in MXNet, PyTorch and
JAX. Every one is resumed with `--resume` until it finishes; its final weights and every
logged row must equal those of a run that was never interrupted, and nothing temporary
may remain in the run folder.

Every run is a fresh `gluon-bert` process (tests/fault_runner.py injects the fault), with
the same thread settings, so the uninterrupted and the resumed runs compute alike."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as onp
import pytest

from gluon_bert.ports.convert import load_mxnet_file
from gluon_bert.train import latest_checkpoint

RUNNER = os.path.join(os.path.dirname(__file__), 'fault_runner.py')
ENV = dict(os.environ, OMP_NUM_THREADS='2', OMP_WAIT_POLICY='PASSIVE')
# 8 batches an epoch, rows at steps 3, 6, 9, 12, 14, checkpoints every 2 steps: most
# checkpoints fall inside a log interval and one run crosses an epoch.
PRE = ['--preset', 'tiny', '--batch-size', '32', '--max-len', '32', '--lr', '2e-3',
       '--log-interval', '3', '--train-limit', '256', '--num-steps', '14',
       '--checkpoint-interval', '2', '--no-progress']
# 3 batches an epoch, 3 epochs, an evaluation after each
FT = ['--batch-size', '64', '--max-len', '40', '--lr', '1e-3', '--train-limit', '192',
      '--num-epochs', '3', '--checkpoint-interval', '2', '--no-progress']
TIMING = ('pairs_per_sec', 'examples_per_sec')


def cli(fault, task, args, timeout=300):
    return subprocess.run([sys.executable, RUNNER, fault, task, *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def rows(run):
    with open(os.path.join(run, 'metrics.jsonl'), encoding='utf-8') as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def final_params(run):
    return load_mxnet_file(os.path.join(latest_checkpoint(run), 'model.params'))


def leftovers(run):
    return sorted(n for n in os.listdir(run) if n.startswith(('.tmp-ckpt-', '.latest.tmp'))
                  or n in ('.lock',) or n.endswith('.tmp'))


def assert_same_run(run, ref):
    assert rows(run) == rows(ref)
    got, want = final_params(run), final_params(ref)
    assert sorted(got) == sorted(want)
    for name in want:
        assert onp.array_equal(got[name], want[name]), name
    assert leftovers(run) == []


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp('faults')


@pytest.fixture(scope='module')
def references(runs):
    """Uninterrupted runs, made once each when first asked for."""
    made = {}

    def get(task, framework, devices):
        key = (task, framework, devices)
        if key not in made:
            out = str(runs / f'ref-{task}-{framework}-{devices or "one"}')
            r = cli('none', task, args_for(task, framework, devices, out, get))
            assert r.returncode == 0, r.stderr
            made[key] = out
        return made[key]
    return get


def args_for(task, framework, devices, out, references):
    args = ['--out-dir', out, '--framework', framework, *(PRE if task == 'pretrain' else FT)]
    if task == 'finetune':
        args += ['--init', references('pretrain', 'mxnet', None)]
    if devices:
        args += ['--devices', devices]
    return args


KILLED, INTERRUPTED = -signal.SIGKILL, 128 + signal.SIGINT
SCENARIOS = [
    # (task, framework, devices, faults of the runs before the one that finishes)
    ('pretrain', 'mxnet', None, ['kill-params@2', 'kill-fsync@2', 'kill-fsync@6']),
    ('pretrain', 'mxnet', 'cpu(0),cpu(1)', ['kill-fsync@4', 'sigint-save@1']),
    ('finetune', 'mxnet', None, ['kill-fsync@3', 'sigint-eval@1', 'kill-params@1']),
    ('finetune', 'mxnet', 'cpu(0),cpu(1)', ['kill-params@2']),
    ('pretrain', 'torch', None, ['kill-fsync@5', 'sigint-save@1']),
    ('finetune', 'torch', None, ['kill-params@3', 'sigint-eval@1']),
    ('pretrain', 'jax', None, ['kill-params@1', 'kill-fsync@8']),
    ('finetune', 'jax', None, ['sigint-eval@2']),
]


@pytest.mark.parametrize('task,framework,devices,faults', SCENARIOS,
                         ids=[f'{t}-{f}-{"2dev" if d else "1dev"}' for t, f, d, _ in SCENARIOS])
def test_killed_and_interrupted_runs_resume_exactly(runs, references, task, framework,
                                                    devices, faults):
    if framework != 'mxnet':
        pytest.importorskip(framework)
    ref = references(task, framework, devices)
    out = str(runs / f'faulted-{task}-{framework}-{devices or "one"}')
    args = args_for(task, framework, devices, out, references)
    for i, fault in enumerate(faults):
        r = cli(fault, task, args + (['--resume'] if i else []))
        if fault.startswith('kill'):
            assert r.returncode == KILLED, (fault, r.stderr[-2000:])
        else:  # two SIGINTs in a row: the save still completes, and says how to go on
            assert r.returncode == INTERRUPTED, (fault, r.stderr[-2000:])
            assert 'continue with --resume' in r.stderr.splitlines()[-1]
            assert 'Traceback' not in r.stderr
            assert leftovers(out) == []
    r = cli('none', task, args + ['--resume'])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(out, ref)
    # the record of the run says where it was resumed
    state = json.load(open(os.path.join(latest_checkpoint(out), 'state.json')))
    assert state['framework'] == framework and len(state['resumes']) >= 1


def test_sigterm_and_a_kill_at_any_moment(runs, references):
    """SIGTERM (what batch schedulers send) saves like Ctrl-C; a SIGKILL at an arbitrary
    moment loses at most the steps since the last checkpoint."""
    ref = references('pretrain', 'mxnet', None)
    out = str(runs / 'sigterm')
    args = args_for('pretrain', 'mxnet', None, out, references)
    args[args.index('--num-steps') + 1] = '40'  # long enough to be caught mid-run
    args[args.index('--checkpoint-interval') + 1] = '5'

    def start(extra=()):
        return subprocess.Popen([sys.executable, RUNNER, 'none', 'pretrain', *args, *extra],
                                env=ENV, stderr=subprocess.PIPE, text=True)

    def wait_for_rows(n, proc):
        metrics = os.path.join(out, 'metrics.jsonl')
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= n:
                return
            time.sleep(0.05)
        raise AssertionError('the run logged too few rows')

    proc = start()
    wait_for_rows(1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert 'SIGTERM: stopped; state saved in' in err.splitlines()[-1]
    proc = start(['--resume'])
    wait_for_rows(5, proc)
    time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=60)
    r = cli('none', 'pretrain', args + ['--resume'])
    assert r.returncode == 0, r.stderr[-2000:]
    # the first 12 steps are the reference run's (same seed, data and schedule): same rows
    assert rows(out)[:4] == rows(ref)[:4]
    assert [r['step'] for r in rows(out)] == [3 * i for i in range(1, 14)] + [40]
    assert leftovers(out) == []
