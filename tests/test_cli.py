"""Every command on the shipped sample, bad input, and a run killed mid-checkpoint."""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import signal
import subprocess
import sys
import time

import mxnet as mx
import numpy as onp
import pytest

from data_fixtures import local_server, zip_folder

from gluon_bert.cli import main
from gluon_bert.config import BERTConfig, TrainConfig
from gluon_bert.data import sample_dir, sha1_file
from gluon_bert.model import BERTClassifier, BERTModel
from gluon_bert.train import finetune, latest_checkpoint, pretrain

PRE = ['--preset', 'tiny', '--batch-size', '64', '--max-len', '32', '--lr', '2e-3',
       '--log-interval', '5', '--no-progress']


@pytest.fixture(scope='module')
def pretrained_run(tmp_path_factory):
    """A small pretraining run on the shipped sample, shared by the fine-tuning tests."""
    out = str(tmp_path_factory.mktemp('runs') / 'pre')
    assert main(['pretrain', '--out-dir', out, '--num-steps', '30', *PRE]) == 0
    return out


def test_pretrain_command_writes_run(pretrained_run):
    rows = [json.loads(l) for l in open(os.path.join(pretrained_run, 'metrics.jsonl'))]
    assert [r['step'] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert rows[-1]['train_mlm'] < rows[0]['train_mlm']  # the losses fall
    assert os.path.isfile(os.path.join(pretrained_run, 'loss.png'))
    assert latest_checkpoint(pretrained_run).endswith('ckpt-0000030')


def test_finetune_learns_and_leaves_pretraining_heads_untouched(pretrained_run, tmp_path):
    from gluon_bert.ports.convert import load_mxnet_file
    cfg = TrainConfig.for_task('finetune', init=pretrained_run, out_dir=str(tmp_path / 'ft'),
                               batch_size=64, max_len=48, lr=3e-3, num_epochs=5,
                               pad_to='longest', bucket=True)
    bert_file = os.path.join(latest_checkpoint(pretrained_run), 'model.params')
    bert_sha1 = sha1_file(bert_file)
    result = finetune(cfg, progress=False)
    assert result['eval_acc'] > 0.5  # 3 balanced classes: chance is 1/3
    # the classifier is the encoder, `hidden` and the new output layer; the pretraining
    # heads are not part of it (no update, optimizer state or weight decay reaches them)
    before = load_mxnet_file(bert_file)
    after = load_mxnet_file(os.path.join(result['checkpoint'], 'model.params'))
    assert not any(n.startswith(('mlm.', 'nsp.')) for n in after)
    assert {'output.weight', 'output.bias'} <= set(after)
    assert set(after) - {'output.weight', 'output.bias'} < set(before)
    assert any(not onp.array_equal(before[n], after[n]) for n in after if n.startswith('encoder.'))
    assert sha1_file(bert_file) == bert_sha1  # the pretraining run is left as it was
    # evaluate and predict read the run
    assert main(['evaluate', cfg.out_dir, '--max-len', '48']) == 0
    pairs = tmp_path / 'pairs.tsv'
    pairs.write_text('a b c .\td e .\nf g .\th i .\n')
    assert main(['predict', cfg.out_dir, '--file', str(pairs)]) == 0
    # typed text is split as SNLI's parses split it, so it reads as the training text did
    from gluon_bert.predict import predict_pairs
    typed, parsed = predict_pairs(cfg.out_dir, [
        ("A man isn't walking on the street.", 'A man walks.'),
        ("a man is n't walking on the street .", 'a man walks .')])
    assert typed['probabilities'] == parsed['probabilities']


def test_bad_input_is_one_clear_line(tmp_path, capsys, pretrained_run):
    assert main(['pretrain', '--batch-size', '0', '--out-dir', str(tmp_path / 'a')]) == 2
    assert 'batch_size must be a positive integer' in capsys.readouterr().err
    assert main(['finetune', '--init', 'no-such-model', '--out-dir', str(tmp_path / 'b')]) == 2
    assert 'no-such-model' in capsys.readouterr().err
    assert main(['pretrain', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'c')]) == 2
    assert 'wiki.train.tokens' in capsys.readouterr().err
    # a checkpoint made for another model
    assert main(['pretrain', '--out-dir', pretrained_run, '--resume', '--preset', 'd2l.pretrain',
                 '--num-steps', '31', '--no-progress']) == 2
    assert '--preset d2l.pretrain conflicts with the run being resumed' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(['pretrain', '--devices'])


def test_sigkill_mid_checkpoint_resumes_from_last_good(tmp_path):
    out = str(tmp_path / 'killed')
    cmd = [sys.executable, '-m', 'gluon_bert.cli', 'pretrain', '--out-dir', out,
           '--num-steps', '400', '--checkpoint-interval', '1', *PRE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        # kill while it writes checkpoints every step: some moment of some write
        while time.time() < deadline and not (os.path.isdir(out) and
                                              len(os.listdir(out)) >= 3):
            time.sleep(0.05)
        time.sleep(0.37)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    good = latest_checkpoint(out)
    assert good is not None
    done = json.load(open(os.path.join(good, 'state.json')))['step']
    cfg = TrainConfig.for_task('pretrain', preset='tiny', batch_size=64, max_len=32, lr=2e-3,
                               log_interval=5, out_dir=out, num_steps=done + 2)
    result = pretrain(cfg, resume=True, progress=False)
    assert result['step'] == done + 2


def test_compare_runs_every_framework_from_the_same_start(tmp_path, capsys):
    pytest.importorskip('torch')
    pytest.importorskip('jax')
    out = str(tmp_path / 'cmp')
    assert main(['compare', 'pretrain', '--out-dir', out, '--num-steps', '6', '--preset', 'tiny',
                 '--batch-size', '32', '--max-len', '32', '--log-interval', '3',
                 '--no-progress', '--train-limit', '256']) == 0
    summary = json.load(open(os.path.join(out, 'compare.json')))
    assert set(summary['results']) == {'mxnet', 'torch', 'jax'}
    rows = {fw: [json.loads(l) for l in open(os.path.join(out, fw, 'metrics.jsonl'))]
            for fw in summary['results']}
    # same weights, same batches: the first interval's losses agree closely (dropout differs)
    mlm = [rows[fw][0]['train_mlm'] for fw in rows]
    assert max(mlm) - min(mlm) < 0.05 * max(mlm), mlm
    assert os.path.isfile(os.path.join(out, 'compare.png'))
    assert '| mxnet |' in capsys.readouterr().out


def test_pretrain_with_another_framework_writes_our_checkpoint(tmp_path):
    pytest.importorskip('torch')
    out = str(tmp_path / 'torch-run')
    assert main(['pretrain', '--framework', 'torch', '--out-dir', out, '--num-steps', '4',
                 '--preset', 'tiny', '--batch-size', '32', '--max-len', '32',
                 '--log-interval', '2', '--no-progress', '--train-limit', '128']) == 0
    ckpt = latest_checkpoint(out)
    assert json.load(open(os.path.join(ckpt, 'state.json')))['framework'] == 'torch'
    net = BERTModel(BERTConfig.load(os.path.join(ckpt, 'config.json')))
    net.load_parameters(os.path.join(ckpt, 'model.params'))  # strict: every name, every shape


@pytest.mark.parametrize('framework', ['torch', 'jax'])
def test_finetune_with_a_port_evaluates_and_writes_our_checkpoint(pretrained_run, tmp_path,
                                                                 framework):
    pytest.importorskip(framework)
    out = str(tmp_path / f'{framework}-ft')
    assert main(['finetune', '--framework', framework, '--init', pretrained_run, '--out-dir',
                 out, '--num-epochs', '1', '--batch-size', '64', '--max-len', '48',
                 '--train-limit', '256', '--warmup-steps', '2', '--schedule', 'linear',
                 '--clip-norm', '1.0', '--no-progress']) == 0
    rows = [json.loads(l) for l in open(os.path.join(out, 'metrics.jsonl'))]
    assert rows[-1]['step'] == 4 and 0.0 < rows[-1]['eval_acc'] < 1.0
    ckpt = latest_checkpoint(out)
    state = json.load(open(os.path.join(ckpt, 'state.json')))
    assert state['framework'] == framework and state['task'] == 'finetune'
    net = BERTClassifier(BERTConfig.load(os.path.join(ckpt, 'config.json')))
    net.load_parameters(os.path.join(ckpt, 'model.params'))  # strict: every name, every shape


def test_bench_times_ours_and_the_books_step(tmp_path, capsys):
    out = tmp_path / 'bench.jsonl'
    assert main(['bench', '--frameworks', 'mxnet,d2l', '--preset', 'tiny', '--vocab-size', '50',
                 '--batch-size', '8', '--seq-len', '16', '--steps', '2', '--warmup', '1',
                 '--out', str(out)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    peak = [r for r in rows if r['workload'] == 'matmul-peak']
    rows = [r for r in rows if r['workload'] != 'matmul-peak']
    assert [r['framework'] for r in rows] == ['mxnet', 'd2l']
    assert [r['variant'] for r in rows] == ['ours-hybrid', 'd2l-mxnet']
    assert all(r['examples_per_sec'] > 0 and r['versions']['mxnet'] == '1.9.1' for r in rows)
    pids = {r['worker_pid'] for r in rows}  # each variant in a process of its own
    assert len(pids) == 2 and os.getpid() not in pids
    assert peak and peak[0]['matmul_peak']['float32_gflops'] > 0
    assert not mx.util.is_np_array()  # the book's numpy mode stays in its own process
    assert '| d2l |' in capsys.readouterr().out


def test_ctrl_c_saves_before_exiting(tmp_path):
    out = str(tmp_path / 'interrupted')
    cmd = [sys.executable, '-m', 'gluon_bert.cli', 'pretrain', '--out-dir', out,
           '--num-steps', '100000', *PRE]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = os.path.join(out, 'metrics.jsonl')
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert 'continue with --resume' in err
    ckpt = latest_checkpoint(out)
    assert json.load(open(os.path.join(ckpt, 'state.json')))['step'] >= 5


def _step_counts(rows):
    """Updates covered by each logged row (rows log the mean since the previous one)."""
    steps = [r['step'] for r in rows]
    return [b - a for a, b in zip([0] + steps, steps)]


def test_reproduce_writes_a_report(tmp_path, capsys):
    out = str(tmp_path / 'repro')
    assert main(['reproduce', '--out-dir', out, '--pretrain-steps', '6',
                 '--finetune-epochs', '1', '--no-progress']) == 0
    report = json.load(open(os.path.join(out, 'report.json')))
    assert report['recipe'] == 'sample' and report['pretrain']['steps'] == 6
    # the report holds what the runs logged: the averaged losses, the last epoch's accuracy
    pre = [json.loads(l) for l in open(os.path.join(out, 'pretrain', 'metrics.jsonl'))]
    ft = [json.loads(l) for l in open(os.path.join(out, 'finetune', 'metrics.jsonl'))]
    assert report['pretrain']['mlm'] == pytest.approx(
        sum(r['train_mlm'] * n for r, n in zip(pre, _step_counts(pre))) / 6)
    assert report['finetune']['eval_acc'] == ft[-1]['eval_acc'] and len(ft) == 1
    assert report['finetune']['examples_per_sec'] > 0
    text = capsys.readouterr().out
    assert '| pretrain (6 steps) |' in text and '7.292' in text
    assert os.path.isfile(os.path.join(out, 'REPORT.md'))


def test_download_command_and_download_flag(tmp_path, capsys, monkeypatch):
    """`download` fetches the official archives into the cache; `--download` trains on them.
    The archives are the shipped sample in the official layouts, served on 127.0.0.1."""
    hub = importlib.import_module('gluon_bert.data.download')
    monkeypatch.setattr(hub, 'DATA_HUB', dict(hub.DATA_HUB))
    monkeypatch.setenv('GLUON_BERT_HOME', str(tmp_path / 'cache'))
    monkeypatch.delenv('GLUON_BERT_OFFLINE', raising=False)
    wiki = zip_folder(sample_dir('wikitext-2'), 'wikitext-2')
    snli = zip_folder(sample_dir('snli'), 'snli_1.0')
    with local_server() as server:
        server.routes['/wikitext-2-v1.zip'] = ('bytes', wiki)
        server.routes['/snli_1.0.zip'] = ('bytes', snli)
        hub.register('wikitext-2', server.url + '/wikitext-2-v1.zip', hashlib.sha1(wiki).hexdigest(),
                     folder='wikitext-2', files={'wiki.train.tokens': sha1_file(
                         os.path.join(sample_dir('wikitext-2'), 'wiki.train.tokens'))})
        hub.register('SNLI', server.url + '/snli_1.0.zip', hashlib.sha1(snli).hexdigest(),
                     folder='snli_1.0')
        assert main(['download', 'wikitext-2', 'SNLI']) == 0
        folders = dict(line.split('\t') for line in capsys.readouterr().out.splitlines())
        assert folders == {'wikitext-2': str(tmp_path / 'cache' / 'wikitext-2-v1' / 'wikitext-2'),
                           'SNLI': str(tmp_path / 'cache' / 'snli_1.0' / 'snli_1.0')}
        assert sorted(os.listdir(folders['SNLI'])) == sorted(os.listdir(sample_dir('snli')))
        fetched = len(server.requests)
        out = str(tmp_path / 'pre')
        assert main(['pretrain', '--download', '--out-dir', out, '--num-steps', '2',
                     *PRE]) == 0
        assert len(server.requests) == fetched  # the cache answers, no new request
    state = json.load(open(os.path.join(latest_checkpoint(out), 'state.json')))
    assert state['train_config']['data_dir'] == folders['wikitext-2']
    assert main(['download', 'no-such-set']) == 2
    assert 'unknown name(s) no-such-set' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source of data, not two
        main(['pretrain', '--download', '--data-dir', str(tmp_path)])


@pytest.mark.parametrize('malloc', ['tuned', 'system'])
def test_the_command_tunes_glibcs_allocator_unless_told_not_to(tmp_path, malloc):
    """`gluon-bert` restarts itself once with GLIBC_TUNABLES (one arena that keeps its
    memory); GLUON_BERT_MALLOC=system keeps glibc's defaults. The bench row records which
    ran, with the page faults per step that the setting removes."""
    out = tmp_path / 'bench.jsonl'
    env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', 'LD_PRELOAD')}
    env['GLUON_BERT_MALLOC'] = malloc
    cli = os.path.join(os.path.dirname(sys.executable), 'gluon-bert')
    r = subprocess.run([cli, 'bench', '--frameworks', 'mxnet', '--preset', 'tiny',
                        '--vocab-size', '50', '--batch-size', '8', '--seq-len', '16',
                        '--steps', '2', '--warmup', '1', '--out', str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = [json.loads(l) for l in out.read_text().splitlines()][-1]  # after the matmul peak
    assert row['variant'] == 'ours-hybrid' and row['allocator'] == malloc
    from gluon_bert.cli import GLIBC_TUNABLES
    assert row['environment'].get('GLIBC_TUNABLES') == (GLIBC_TUNABLES if malloc == 'tuned'
                                                        else None)
    assert row['minor_faults_per_step'] >= 0 and row['peak_rss_mb'] > 0
