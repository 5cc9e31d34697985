"""Bad settings, busy or broken run folders, broken checkpoints, a full disk, divergence:
each is exit code 2 and one line `gluon-bert <command>: error: ...`, without a traceback,
and leaves nothing that a later run would trip on."""
from __future__ import annotations

import errno
import json
import os

import numpy as onp
import pytest

from gluon_bert.cli import main
from gluon_bert.train import latest_checkpoint
from gluon_bert.train.runfolder import RunFolder

TINY = ['--preset', 'tiny', '--batch-size', '32', '--max-len', '32', '--lr', '2e-3',
        '--log-interval', '2', '--train-limit', '128', '--no-progress']


def one_error_line(capsys, command, alone=True):
    """The error line. `alone`: nothing else was printed (a run that fails after it
    started has logged its progress before)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert 'Traceback' not in '\n'.join(err), err
    assert err and err[-1].startswith(f'gluon-bert {command}: error: '), err
    assert sum(': error: ' in line for line in err) == 1, err
    assert len(err) == 1 or not alone, err
    return err[-1]


@pytest.mark.parametrize('flags,message', [
    (['--lr', 'nan'], 'lr must be a positive finite number, got nan (--lr)'),
    (['--lr', 'inf'], 'lr must be a positive finite number, got inf (--lr)'),
    (['--lr', '-1'], 'lr must be a positive finite number'),
    (['--clip-norm', '-1'], 'clip_norm must be a positive finite number'),
    (['--clip-norm', 'nan'], 'clip_norm must be a positive finite number'),
    (['--warmup-steps', '-1'], 'warmup_steps must be a non-negative integer'),
    (['--checkpoint-interval', '-5'], 'checkpoint_interval must be a non-negative integer'),
    (['--train-limit', '-1'], 'train_limit must be a non-negative integer'),
    (['--log-interval', '0'], 'log_interval must be a positive integer'),
    (['--kvstore', 'nccl2'], 'kvstore must be one of device, local, none, dist_sync'),
    (['--kvstore', 'dist_async'], 'use dist_sync'),
    (['--framework', 'jax', '--kvstore', 'dist_sync'], 'the jax port trains in one process'),
    (['--kvstore', 'dist_sync'], 'needs the DMLC_* environment of a distributed launcher'),
    (['--devices', 'tpu(0)'], "cannot read device 'tpu(0)'"),
    (['--devices', 'cpu(0),cpu(1)', '--kvstore', 'none'], 'cannot reduce gradients across 2'),
    (['--max-len', '100'], "--max-len 100 exceeds the model's 64 positions"),
    (['--framework', 'torch', '--devices', 'cpu(0),cpu(1)'], 'is for MXNet'),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, flags, message):
    out = tmp_path / 'run'
    assert main(['pretrain', '--out-dir', str(out), *TINY, *flags]) == 2
    assert message in one_error_line(capsys, 'pretrain')
    assert not out.exists()  # a failed start leaves no folder behind


def test_a_run_folder_is_held_by_one_run(tmp_path, capsys):
    out = str(tmp_path / 'run')
    with RunFolder(out):
        assert main(['pretrain', '--out-dir', out, *TINY, '--num-steps', '2']) == 2
        assert f'{out} is in use by another run (pid {os.getpid()})' in one_error_line(
            capsys, 'pretrain')
    assert not os.path.exists(out)  # the holder made the folder and left nothing in it
    # a lock left by a killed run (a file nobody holds) does not block
    os.makedirs(out)
    with open(os.path.join(out, '.lock'), 'w') as f:
        f.write('999999\n')
    assert main(['pretrain', '--out-dir', out, *TINY, '--num-steps', '2']) == 0
    assert not os.path.exists(os.path.join(out, '.lock'))


def test_an_unusable_out_dir_is_one_line(tmp_path, capsys):
    a_file = tmp_path / 'file'
    a_file.write_text('not a folder')
    assert main(['pretrain', '--out-dir', str(a_file), *TINY]) == 2
    assert 'is a file, not a folder' in one_error_line(capsys, 'pretrain')
    # /proc takes no new folders, even for root
    assert main(['pretrain', '--out-dir', '/proc/gluon-bert-run', *TINY]) == 2
    assert 'cannot use --out-dir /proc/gluon-bert-run' in one_error_line(capsys, 'pretrain')


@pytest.fixture
def finished_run(tmp_path):
    out = str(tmp_path / 'run')
    assert main(['pretrain', '--out-dir', out, *TINY, '--num-steps', '6',
                 '--checkpoint-interval', '2']) == 0
    return out


def test_resume_keeps_the_runs_settings(finished_run, capsys):
    capsys.readouterr()
    # a setting that would change what was trained is refused ...
    assert main(['pretrain', '--out-dir', finished_run, '--resume', '--batch-size', '16',
                 '--num-steps', '8', '--no-progress']) == 2
    assert ('--batch-size 16 conflicts with the run being resumed (batch_size 32)'
            in one_error_line(capsys, 'pretrain'))
    # ... flags left out come from the checkpoint, more steps are taken and recorded
    assert main(['pretrain', '--out-dir', finished_run, '--resume', '--num-steps', '8',
                 '--no-progress']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['step'] == 8
    state = json.load(open(os.path.join(latest_checkpoint(finished_run), 'state.json')))
    assert state['train_config']['batch_size'] == 32 and state['train_config']['num_steps'] == 8
    assert state['resumes'] == [{'step': 6, 'changes': {'num_steps': 8}}]
    # resuming a finished run trains nothing and reports the run's own speed, not NaN
    assert main(['pretrain', '--out-dir', finished_run, '--resume', '--no-progress']) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary['step'] == 8 and summary['pairs_per_sec'] > 0


def test_a_run_is_not_overwritten_without_resume(finished_run, capsys):
    capsys.readouterr()
    assert main(['pretrain', '--out-dir', finished_run, *TINY, '--num-steps', '6']) == 2
    assert 'pass --resume to continue it' in one_error_line(capsys, 'pretrain')


def _corrupt(path):
    """Flip bytes in the middle of a file, keeping its size."""
    data = bytearray(open(path, 'rb').read())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    open(path, 'wb').write(bytes(data))


def test_a_corrupt_checkpoint_falls_back_to_the_one_before(finished_run, capsys):
    newest = latest_checkpoint(finished_run)
    assert newest.endswith('ckpt-0000006')
    _corrupt(os.path.join(newest, 'model.params'))
    assert main(['pretrain', '--out-dir', finished_run, '--resume', '--no-progress']) == 0
    err = capsys.readouterr().err
    assert f'skipping checkpoint {newest}: model.params does not match its SHA-1' in err
    assert 'resuming from' in err and 'ckpt-0000004' in err
    # steps 5 and 6 were trained again and saved over the corrupt copy
    state = json.load(open(os.path.join(latest_checkpoint(finished_run, verify=True),
                                        'state.json')))
    assert state['step'] == 6
    # with every checkpoint broken, resume says so instead of starting over
    for ckpt in ('ckpt-0000004', 'ckpt-0000006'):
        with open(os.path.join(finished_run, ckpt, 'state.json'), 'w') as f:
            f.write('{"step": ')
    assert main(['pretrain', '--out-dir', finished_run, '--resume', '--no-progress']) == 2
    line = one_error_line(capsys, 'pretrain')
    assert f'no usable checkpoint in {finished_run}' in line and 'state.json' in line


def test_a_full_disk_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    from gluon_bert.train import checkpoint
    original, calls = checkpoint.save_params, []

    def save_params(path, params):
        calls.append(path)
        if len(calls) == 2:
            original(path, params)  # half a checkpoint is on disk when the space runs out
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(path, params)
    monkeypatch.setattr(checkpoint, 'save_params', save_params)
    out = str(tmp_path / 'run')
    assert main(['pretrain', '--out-dir', out, *TINY, '--num-steps', '6',
                 '--checkpoint-interval', '2']) == 2
    line = one_error_line(capsys, 'pretrain', alone=False)
    assert 'cannot write checkpoint ckpt-0000004' in line and 'No space left on device' in line
    assert sorted(n for n in os.listdir(out) if not n.endswith(('.jsonl',))) == [
        'ckpt-0000002', 'latest']  # no temporary folder, no lock, the good checkpoint
    monkeypatch.setattr(checkpoint, 'save_params', original)
    assert main(['pretrain', '--out-dir', out, '--resume', '--no-progress']) == 0


def test_a_loss_that_turns_nan_stops_the_run(tmp_path, capsys):
    out = str(tmp_path / 'run')
    # Adam at lr 1e30 overflows the weights within two steps
    assert main(['pretrain', '--out-dir', out, *TINY, '--lr', '1e30', '--num-steps', '20',
                 '--checkpoint-interval', '1']) == 2
    line = one_error_line(capsys, 'pretrain', alone=False)
    assert 'training diverged at step' in line and 'not finite' in line
    good = latest_checkpoint(out)
    assert good is not None and good in line
    from gluon_bert.ports.convert import load_mxnet_file
    assert all(onp.isfinite(a).all() for a in load_mxnet_file(
        os.path.join(good, 'model.params')).values())
    metrics = os.path.join(out, 'metrics.jsonl')
    if os.path.exists(metrics):  # only finite rows, and valid JSON
        for row in map(json.loads, open(metrics)):
            assert all(onp.isfinite(v) for k, v in row.items() if k.startswith('train_'))


def test_evaluate_predict_and_finetune_refuse_a_max_len_above_the_models(tmp_path, capsys):
    pre = str(tmp_path / 'pre')
    ft = str(tmp_path / 'ft')
    assert main(['pretrain', '--out-dir', pre, *TINY, '--num-steps', '2']) == 0
    assert main(['finetune', '--init', pre, '--out-dir', ft, '--batch-size', '64',
                 '--max-len', '32', '--train-limit', '64', '--num-epochs', '1',
                 '--no-progress']) == 0
    capsys.readouterr()
    assert main(['evaluate', ft, '--max-len', '65']) == 2
    assert "--max-len 65 exceeds the model's 64 positions" in one_error_line(capsys, 'evaluate')
    assert main(['predict', ft, 'a man .', 'a woman .', '--max-len', '65']) == 2
    assert "--max-len 65 exceeds the model's 64 positions" in one_error_line(capsys, 'predict')
    assert main(['finetune', '--init', pre, '--out-dir', str(tmp_path / 'ft2'),
                 '--max-len', '65', '--no-progress']) == 2
    assert "--max-len 65 exceeds the model's 64" in one_error_line(capsys, 'finetune')
    assert not os.path.exists(tmp_path / 'ft2')


def test_download_names_what_it_knows(capsys):
    assert main(['download', 'gluonnlp:bert_99_1_1_nowhere']) == 2
    assert "unknown GluonNLP BERT 'bert_99_1_1_nowhere'" in one_error_line(capsys, 'download')
    assert main(['download', 'hf:../etc']) == 2
    assert 'not a Hugging Face model name' in one_error_line(capsys, 'download')
    assert main(['download', 'bert.tiny.nowhere']) == 2
    line = one_error_line(capsys, 'download')
    assert 'unknown name(s) bert.tiny.nowhere' in line and 'hf:<hub name>' in line
