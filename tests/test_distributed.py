"""Distributed training on 127.0.0.1: MXNet's parameter-server KVStore (`dist_sync`) with one
and two servers, started by `gluon-bert launch`, against one process with the same global
batch; a worker killed mid-run stops the whole job fast, and the job resumes; Horovod when
its extra is installed.

Every process binds the loopback interface only (the launcher's local default)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as onp
import pytest

from gluon_bert.ports.convert import load_mxnet_file
from gluon_bert.train import latest_checkpoint

HERE = os.path.dirname(__file__)
RUNNER = os.path.join(HERE, 'fault_runner.py')
ENV = dict(os.environ, OMP_NUM_THREADS='1', OMP_WAIT_POLICY='PASSIVE')
LR = 1e-3
# 3 batches of 64 an epoch; every worker takes 32 of each
FT = ['--batch-size', '64', '--max-len', '40', '--lr', str(LR), '--train-limit', '192',
      '--no-progress']


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp('dist')
    pre = str(root / 'pre')
    r = subprocess.run([sys.executable, '-m', 'gluon_bert.cli', 'pretrain', '--out-dir', pre,
                        '--preset', 'tiny', '--batch-size', '32', '--max-len', '40',
                        '--num-steps', '4', '--train-limit', '128', '--no-progress'],
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # Fine-tune it without dropout: masks are drawn per device, so with dropout a batch cut in
    # two trains differently from the whole batch. (A folder in the book's layout with a
    # config.json, which --init reads as such.)
    ckpt = latest_checkpoint(pre)
    init = root / 'init'
    init.mkdir()
    config = json.load(open(os.path.join(ckpt, 'config.json')))
    (init / 'config.json').write_text(json.dumps(dict(config, dropout=0.0)))
    for src, dst in (('vocab.json', 'vocab.json'), ('model.params', 'pretrained.params')):
        (init / dst).write_bytes(open(os.path.join(ckpt, src), 'rb').read())
    return root, str(init)


def launch(n, servers, args, dump=None, timeout=300, kvstore='dist_sync', **popen):
    """`gluon-bert launch` of fine-tuning workers (`servers` None: Horovod)."""
    env = dict(ENV, GLUON_BERT_TEST_DUMP=dump) if dump else ENV
    how = ['--launcher', 'horovod'] if servers is None else ['-s', str(servers)]
    cmd = [sys.executable, '-m', 'gluon_bert.cli', 'launch', '-n', str(n), *how,
           '--timeout', str(timeout), '--', sys.executable, RUNNER, 'none', 'finetune',
           '--kvstore', kvstore, *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def rows(run):
    return [json.loads(line) for line in open(os.path.join(run, 'metrics.jsonl'))]


def close(a, b, name, steps):
    """Equal within float tolerance. The key bias of attention has a gradient of exactly
    zero in theory (softmax ignores a shift shared by all keys): its float noise depends on
    how the batch was split, and Adam turns noise into steps of up to lr each."""
    atol = 2 * LR * steps if name.endswith('attention.W_k.bias') else 2e-5
    onp.testing.assert_allclose(a, b, rtol=1e-4, atol=atol, err_msg=name)


def _horovod():
    # find_spec, not import: horovod.mxnet loaded before torch makes torch's import crash
    # (a segmentation fault, seen with horovod 0.28.1 and torch 2.13.0), and the ports'
    # tests import torch later in the same process
    import importlib.util
    return importlib.util.find_spec('horovod') is not None


@pytest.mark.parametrize('kvstore,servers', [
    ('dist_sync', 1), ('dist_sync', 2),
    pytest.param('horovod', None, marks=pytest.mark.skipif(
        not _horovod(), reason='Horovod is not installed: bash scripts/setup.sh horovod'))],
    ids=['dist_sync-1-server', 'dist_sync-2-servers', 'horovod'])
def test_two_workers_agree_with_one_process(work, kvstore, servers):
    root, pre = work
    args = FT + ['--init', pre, '--num-epochs', '2']
    single = str(root / f'single-{kvstore}-{servers}')
    r = subprocess.run([sys.executable, RUNNER, 'none', 'finetune', '--out-dir', single,
                        *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    dist, dump = str(root / f'dist-{kvstore}-{servers}'), str(root / f'dump-{kvstore}-{servers}')
    proc = launch(2, servers, ['--out-dir', dist, *args], dump=dump, kvstore=kvstore)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert 'global batch 64 (32 per worker)' in err
    summary = json.loads(out)  # rank 0 alone prints the summary
    assert summary['workers'] == 2 and summary['rank'] == 0
    # both workers end with the same parameters ...
    a, b = onp.load(os.path.join(dump, 'rank-0.npz')), onp.load(os.path.join(dump, 'rank-1.npz'))
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        assert onp.array_equal(a[name], b[name]), name
    # ... which rank 0 checkpointed, and which are those of one process on the same batches
    ours = load_mxnet_file(os.path.join(latest_checkpoint(dist), 'model.params'))
    theirs = load_mxnet_file(os.path.join(latest_checkpoint(single), 'model.params'))
    for name in ours:
        assert onp.array_equal(ours[name], a[name]), name
        close(ours[name], theirs[name], name, steps=6)
    for got, want in zip(rows(dist), rows(single)):
        assert got['step'] == want['step']
        for key in ('train_loss', 'train_acc', 'eval_acc'):
            assert abs(got[key] - want[key]) < 1e-4, (key, got, want)


def long_job(work, name):
    """A 40-epoch job of 2 workers, once it has written a checkpoint -> (launcher, run
    folder, its arguments, the pid of worker 1)."""
    root, pre = work
    out = str(root / name)
    args = ['--out-dir', out, *FT, '--init', pre, '--num-epochs', '40',
            '--checkpoint-interval', '2']
    proc = launch(2, 1, args)
    # the launcher names every process and its pid on its first line
    pid = int(re.search(r'worker 1 pid (\d+)', proc.stderr.readline()).group(1))
    deadline = time.time() + 200
    while time.time() < deadline and not (os.path.isdir(out) and
                                          latest_checkpoint(out) is not None):
        time.sleep(0.1)
    assert latest_checkpoint(out) is not None
    return proc, out, args, pid


def test_a_killed_worker_stops_the_job_and_it_resumes(work):
    proc, out, args, pid = long_job(work, 'killed')
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    _, err = proc.communicate(timeout=60)
    assert time.time() - killed < 10  # every other process is stopped within seconds
    assert proc.returncode != 0
    assert f'worker 1 (pid {pid}) killed by SIGKILL; stopping the job' in err
    good = latest_checkpoint(out, verify=True)
    assert good is not None
    done = json.load(open(os.path.join(good, 'state.json')))['step']
    # resume, for two more epochs than the checkpoint holds
    epochs = done // 3 + 2
    args[args.index('--num-epochs') + 1] = str(epochs)
    proc = launch(2, 1, args + ['--resume'])
    stdout, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert json.loads(stdout)['step'] == epochs * 3
    assert [r['epoch'] for r in rows(out)] == list(range(1, epochs + 1))


def test_ctrl_c_stops_the_job_with_its_checkpoint(work):
    proc, out, _, _ = long_job(work, 'ctrl-c')
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the launcher in a terminal
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert 'stopped on request' in err
    good = latest_checkpoint(out, verify=True)
    step = json.load(open(os.path.join(good, 'state.json')))['step']
    assert 0 < step < 120
    assert not [n for n in os.listdir(out) if n.startswith(('.tmp-ckpt-', '.lock'))]


def test_launcher_plans_and_bad_arguments(tmp_path):
    from gluon_bert.errors import ConfigError
    from gluon_bert.launch import launch as run_launch, plan_horovod, plan_ssh, read_hostfile
    hosts = tmp_path / 'hosts'
    hosts.write_text('# the job\nnode-a:2\nnode-b\n\n')
    assert read_hostfile(str(hosts)) == ['node-a', 'node-a', 'node-b']
    plan = plan_ssh(['python', '-m', 'gluon_bert.cli', 'pretrain', '--out-dir', 'runs/a b'],
                    workers=3, servers=1, hosts=read_hostfile(str(hosts)), port=9300,
                    cwd='/shared/job')
    assert [p.name for p in plan] == ['scheduler@node-a', 'server 0@node-a', 'worker 0@node-a',
                                      'worker 1@node-a', 'worker 2@node-b']
    worker = plan[-1].argv
    assert worker[:4] == ['ssh', '-o', 'BatchMode=yes', 'node-b']
    assert worker[4].startswith('cd /shared/job && env DMLC_ROLE=worker DMLC_PS_ROOT_URI=node-a '
                                'DMLC_PS_ROOT_PORT=9300 DMLC_NUM_SERVER=1 DMLC_NUM_WORKER=3 '
                                'DMLC_NODE_HOST=node-b ')
    assert worker[4].endswith("--out-dir 'runs/a b'")  # quoted for the remote shell
    assert [p.name for p in plan_horovod(['python', 'x.py'], 2)] == ['worker 0', 'worker 1']
    hvd = plan_horovod(['python', 'x.py'], 3, read_hostfile(str(hosts)))[0].argv
    assert os.path.basename(hvd[0]) == 'horovodrun'
    assert hvd[1:] == ['--gloo', '-np', '3', '-H', 'node-a:2,node-b:1',
                   '--network-interface', 'lo', 'python', 'x.py']
    bad = tmp_path / 'bad'
    bad.write_text('node-a:x\n')
    for call, message in [
            (lambda: read_hostfile(str(bad)), "line 1: expected host or host:N, got 'node-a:x'"),
            (lambda: read_hostfile(str(tmp_path / 'none')), 'No such file'),
            (lambda: run_launch([], 2), 'give the command to run after --'),
            (lambda: run_launch(['--', 'true'], 0), '-n must be at least 1'),
            (lambda: run_launch(['true'], 2, servers=0), '-s must be at least 1'),
            (lambda: run_launch(['true'], 2, launcher='ssh'), 'needs --hostfile'),
            (lambda: run_launch(['true'], 2, timeout=-1), '--timeout must be positive')]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            call()


def test_a_job_that_cannot_start_and_a_timeout(tmp_path, capsys):
    from gluon_bert.launch import launch as run_launch
    assert run_launch([str(tmp_path / 'no-such-program')], 1) == 2
    assert 'cannot start worker 0' in capsys.readouterr().err
    started = time.time()
    assert run_launch([sys.executable, '-c', 'import time; time.sleep(60)'], 1,
                      timeout=2) == 124
    assert time.time() - started < 15
    assert 'ran past --timeout 2 s' in capsys.readouterr().err
