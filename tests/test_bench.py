"""The benchmark harness: FLOP count, the quick suite end to end, targets, tables and plots,
workers that crash, time out or lack their framework. No timing is asserted."""
from __future__ import annotations

import json
import os
import sys

import numpy as onp
import pytest

from gluon_bert.bench import (Measurement, Workload, check_targets, format_targets,
                              model_flops, run_measurements, summarize, write_markdown,
                              write_plot)
from gluon_bert.bench import harness, suite
from gluon_bert.cli import GLIBC_TUNABLES, main
from gluon_bert.bench.flops import packed_model_flops
from gluon_bert.config import BERTConfig
from gluon_bert.ports.synthetic import SNLI_LENGTHS, WIKITEXT2_LENGTHS, synthetic_batch

TINY = Workload('tiny-pretrain', 'pretrain', 'tiny', 50, 4, 16, num_preds=3, steps=2, warmup=1)


def test_model_flops_by_hand():
    config = BERTConfig.from_preset('tiny', vocab_size=50)  # H 32, F 64, 2 blocks, 3 classes
    # one block, one sequence of 16: Q,K,V,O 4*16*32*32, scores and values 2*16*16*32,
    # FFN 2*16*32*64 multiply-adds
    block = 65536 + 16384 + 65536
    mlm = 3 * (32 * 32 + 32 * 50)  # 3 predictions: dense, then the decoder over 50 words
    nsp = 32 * 32 + 32 * 2
    per_sequence = 2 * block + mlm + nsp
    assert per_sequence == 303872
    assert model_flops(config, 'pretrain', 4, 16, 3, train=False) == 2 * 4 * per_sequence
    assert model_flops(config, 'pretrain', 4, 16, 3) == 3 * 2 * 4 * per_sequence
    classifier = 32 * 32 + 32 * 3
    assert model_flops(config, 'finetune', 4, 16, train=False) == 2 * 4 * (2 * block + classifier)
    with pytest.raises(ValueError):
        model_flops(config, 'nli', 4, 16)
    # the classifier's last block at <cls> only: keys and values for all 16 positions
    # (2*16*32*32), query and output projections (2*32*32), one query's scores and values
    # (2*16*32) and the FFN (2*32*64) for one row
    last_cls = 32768 + 2048 + 1024 + 4096
    assert model_flops(config, 'finetune', 4, 16, train=False, lean=True) == \
        2 * 4 * (block + last_cls + classifier)
    # packed: a batch without padding computes what the padded count says, but the last
    # block only keys and values at all 64 tokens; queries (over 16 keys each), output
    # projection and FFN at the 4 <cls> + 12 predicted rows
    full = synthetic_batch(onp.random.default_rng(0), config, 'pretrain', 4, 16, 3,
                           full_length=True)
    full['mlm_weights'][:] = 1.0
    last = 64 * 2 * 32 * 32 + 16 * (2 * 16 * 32) + 16 * (2 * 32 * 32 + 2 * 32 * 64)
    assert packed_model_flops(config, full, train=False) == \
        model_flops(config, 'pretrain', 4, 16, 3, train=False) - 2 * (4 * block - last)
    assert packed_model_flops(config, full) == 3 * packed_model_flops(config, full, False)
    # ... and one sequence of 8 tokens instead of 16 saves 8 tokens' projections and FFN
    # (K and V only in the last block; packed sizes go in steps of 8 tokens at least),
    # 16^2 - 8^2 query-key pairs of attention in the first block and 8 keys for each of
    # that sequence's 4 queries in the last
    short = {k: v.copy() for k, v in full.items()}
    short['valid_lens'][1] = 8
    short['pred_positions'][1] %= 8
    saved = 8 * (4 * 32 * 32 + 2 * 32 * 64) + 8 * 2 * 32 * 32 + 2 * 32 * (256 - 64) + \
        4 * 2 * 32 * 8
    assert packed_model_flops(config, short, train=False) == \
        packed_model_flops(config, full, train=False) - 2 * saved


def test_stats_median_and_spread():
    s = harness.stats([0.4, 0.1, 0.2, 0.3, 0.5])
    assert (s['median_step_s'], s['min_step_s'], s['max_step_s']) == (0.3, 0.1, 0.5)
    assert s['iqr_step_s'] == pytest.approx(0.2)


def test_every_worker_gets_the_same_allocator_setting(monkeypatch):
    monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
    monkeypatch.delenv('LD_PRELOAD', raising=False)
    env, label = harness.worker_env('tuned')
    assert label == 'tuned' and env['GLIBC_TUNABLES'] == GLIBC_TUNABLES
    assert env['OMP_NUM_THREADS'] and env['OMP_WAIT_POLICY']
    env, label = harness.worker_env('system')
    assert label == 'system' and 'GLIBC_TUNABLES' not in env
    monkeypatch.setenv('LD_PRELOAD', '/usr/lib/libjemalloc.so.2')  # the user's own choice
    assert harness.worker_env('tuned')[1] == 'custom'


def _rows(rates, faults=None, round_=1, workload='pretrain-book', scope='step', dtype='float32',
          allocator='tuned', mode='train'):
    return [dict(round=round_, workload=workload, variant=v, mode=mode, scope=scope,
                 dtype=dtype, allocator=allocator, examples_per_sec=rate,
                 minor_faults_per_step=(faults or {}).get(v), batch_size=512, seq_len=64,
                 task='pretrain', preset='d2l.pretrain')
            for v, rate in rates.items()]


def _synthetic_rounds():
    rows = []
    for r, scale in ((1, 1.0), (2, 1.1), (3, 0.9)):
        rows += _rows({'ours-hybrid': 100 * scale, 'd2l-mxnet': 20, 'd2l-pytorch': 80,
                       'torch-eager': 70, 'jax-jit': 95}, {'ours-hybrid': 2}, r)
        rows += _rows({'ours-hybrid': 10}, {'ours-hybrid': 400_000}, r, allocator='system')
        rows += _rows({'ours-hybrid': 60 * scale}, round_=r, scope='loop')
    return rows


def test_targets_met_and_not_met_from_ratios_within_rounds():
    targets = {t['target']: t for t in check_targets(_synthetic_rounds())}
    book = targets['pretrain-book step: ours / d2l-mxnet']
    assert book['met'] and book['value'] == pytest.approx(5.0)
    assert (book['min'], book['max'], book['rounds']) == (pytest.approx(4.5), pytest.approx(5.5), 3)
    torch_book = targets['pretrain-book step: ours / d2l-pytorch']
    assert torch_book['met'] is False and torch_book['value'] == pytest.approx(1.25)
    fastest = next(t for name, t in targets.items() if 'fastest of torch-eager' in name)
    assert fastest['value'] == pytest.approx(100 / 95) and not fastest['met']
    assert 'jax-jit' in fastest['detail']
    faults = next(t for name, t in targets.items() if 'page faults' in name)
    assert faults['met'] and faults['comparison'] == '<'
    loop = targets['whole loop / step alone, ours, pretrain-book']
    assert loop['value'] == pytest.approx(0.6) and loop['met'] is False
    # what was not run is said, not guessed
    bf16 = targets['bf16 / fp32, ours, bert.base step (finetune-base)']
    assert bf16['value'] is None and bf16['met'] is None and 'bfloat16' in bf16['detail']
    table = format_targets(list(targets.values()))
    assert '| not met |' in table and '| met |' in table and 'not measured' in table


def test_markdown_table_and_plot(tmp_path):
    rows = _synthetic_rounds()
    rows.append(dict(round=1, workload='pretrain-book', variant='gluonnlp', mode='train',
                     scope='step', dtype='float32', allocator='tuned',
                     skipped='not installed: gluonnlp'))
    harness.add_ratios(rows)
    summary = summarize(rows)
    ours = next(e for e in summary if e['variant'] == 'ours-hybrid' and e['scope'] == 'step'
                and e['allocator'] == 'tuned')
    assert ours['examples_per_sec']['median'] == 100 and ours['rounds'] == 3
    d2l = next(e for e in summary if e['variant'] == 'd2l-mxnet')
    assert d2l['ratio_to_ours']['median'] == pytest.approx(0.2)
    md = write_markdown(str(tmp_path / 'bench.md'), rows, summary, check_targets(rows))
    text = open(md).read()
    assert '## Targets' in text and '| pretrain-book | d2l-mxnet | train | step |' in text
    assert 'skipped: not installed: gluonnlp' in text
    png = write_plot(str(tmp_path / 'bench.png'), summary)
    with open(png, 'rb') as f:
        assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def _worker_script(tmp_path, body):
    path = tmp_path / 'worker.py'
    path.write_text(body)
    return (sys.executable, str(path))


def test_a_crashing_worker_gives_an_error_row_and_the_rest_continue(tmp_path):
    # crashes for the book's variant, delegates to the real worker otherwise
    worker = _worker_script(tmp_path, (
        'import json, sys\n'
        'spec = json.load(open(sys.argv[1]))\n'
        'if spec.get("variant") == "d2l-mxnet":\n'
        '    raise SystemExit("boom: the worker died")\n'
        'from gluon_bert.bench.worker import main\n'
        'sys.exit(main(sys.argv[1:]))\n'))
    plan = [Measurement(TINY, 'd2l-mxnet'), Measurement(TINY, 'ours-hybrid')]
    out = tmp_path / 'bench.jsonl'
    rows = run_measurements(plan, out=str(out), worker=worker, progress=False, peak_size=64,
                            peak_reps=1)
    crashed, ours = rows
    assert 'boom: the worker died' in crashed['error'] and 'examples_per_sec' not in crashed
    assert ours['examples_per_sec'] > 0 and 'error' not in ours
    # ours packs its pretraining step: the FLOPs it computes, fewer than the padded batch's
    config = BERTConfig.from_preset('tiny', vocab_size=50)
    batch = synthetic_batch(onp.random.default_rng(0), config, 'pretrain', 4, 16, 3)  # seed 0
    assert ours['packed'] and ours['model_flops_per_step'] == packed_model_flops(config, batch)
    assert ours['model_flops_per_step'] < model_flops(config, 'pretrain', 4, 16, 3)
    assert ours['minor_faults_per_step'] >= 0 and ours['peak_rss_mb'] > 0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert [l['workload'] for l in lines] == ['matmul-peak', 'tiny-pretrain', 'tiny-pretrain']


def test_a_worker_past_its_timeout_is_killed(tmp_path):
    worker = _worker_script(tmp_path, 'import time\ntime.sleep(60)\n')
    rows = run_measurements([Measurement(TINY, 'ours-hybrid')], out=None, worker=worker,
                            timeout=1, progress=False)
    assert 'timed out after 1 s' in rows[0]['error']


def test_frameworks_not_installed_are_skipped_not_crashed(tmp_path, monkeypatch):
    monkeypatch.setitem(suite.VARIANTS['jax-jit'], 'needs', ('no_such_framework_here',))
    worker = _worker_script(tmp_path, 'raise SystemExit("no worker may start for it")\n')
    rows = run_measurements([Measurement(TINY, 'jax-jit')], out=None, worker=worker,
                            progress=False)
    assert rows[0]['skipped'] == 'not installed: no_such_framework_here'


def test_the_books_classes_skip_shapes_they_cannot_build():
    from gluon_bert.bench import run_bench
    rows = run_bench(frameworks=('d2l',), task='finetune', preset='tiny.bert', vocab_size=60,
                     batch_size=4, seq_len=16, steps=1, warmup=1, out=None)
    assert "book's architecture only" in rows[0]['skipped']


def test_unknown_names_are_one_line_errors(capsys):
    assert main(['bench', '--frameworks', 'mxnet,nope']) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and "unknown variant(s) nope" in err
    assert main(['bench', '--suite', 'issue10', '--workloads', 'pretrain-huge']) == 2
    assert 'unknown workload(s) pretrain-huge' in capsys.readouterr().err
    assert main(['bench', '--workloads', 'pretrain-book']) == 2  # only within a suite
    assert main(['bench', '--repeats', '0']) == 2
    assert main(['bench', '--modes', 'train,fly']) == 2


def test_the_quick_suite_end_to_end(tmp_path, capsys):
    """`gluon-bert bench --quick`, cut to three variants and one workload for CI time: a
    step, the whole loop padded and bucketed, the book's loop, the targets they allow."""
    out, results = tmp_path / 'bench.jsonl', tmp_path / 'results'
    assert main(['bench', '--quick', '--frameworks', 'ours-hybrid,ours-bucketed,d2l-mxnet',
                 '--workloads', 'finetune-small-512', '--modes', 'train', '--out', str(out),
                 '--results-dir', str(results)]) == 0
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    peak = rows[0]['matmul_peak']
    assert rows[0]['workload'] == 'matmul-peak' and peak['float32_gflops'] > 0
    measured = {(r['variant'], r['scope']): r for r in rows[1:]}
    assert set(measured) == {('ours-hybrid', 'step'), ('ours-hybrid', 'loop'),
                             ('ours-bucketed', 'loop'), ('d2l-mxnet', 'step'),
                             ('d2l-mxnet', 'loop')}
    for r in measured.values():
        assert 'error' not in r, r
        assert r['examples_per_sec'] > 0 and r['preset'] == 'tiny' and r['round'] == 1
        assert r['environment']['GLIBC_TUNABLES'] == GLIBC_TUNABLES
        assert r['commit'] is None or isinstance(r['commit'], str)
    step = measured[('ours-hybrid', 'step')]
    assert step['tokens_per_sec'] > 0 and step['share_fp32_peak'] is not None
    assert step['min_step_s'] <= step['median_step_s'] <= step['max_step_s']
    assert 'shipped sample' in measured[('ours-bucketed', 'loop')]['data']
    text = (results / 'bench_issue10-quick.md').read_text()
    assert 'ours (packed or bucketed) / d2l-mxnet' in text
    assert (results / 'bench_issue10-quick.png').stat().st_size > 0
    printed = capsys.readouterr()
    assert '| target |' in printed.out
    assert '[1/5] finetune-small-512 ours-hybrid train step' in printed.err


def test_the_book_lengths_batch_follows_wikitext2_and_the_15_percent_rule():
    """pretrain-book's step batch: lengths drawn from the book's WikiText-2 examples (72% of
    the positions real on average, none shorter than 5), predictions max(1, round(15%))."""
    config = BERTConfig.from_preset('d2l.pretrain', vocab_size=20256)
    batch = synthetic_batch(onp.random.default_rng(0), config, 'pretrain', 512, 64, 10,
                            length_counts=WIKITEXT2_LENGTHS)
    lengths = batch['valid_lens'].astype(int)
    assert lengths.min() >= 5 and lengths[0] == 64
    assert abs(lengths.mean() / 64 - 0.72) < 0.03
    onp.testing.assert_array_equal((batch['mlm_weights'] != 0).sum(1),
                                   onp.minimum(onp.maximum(1, onp.round(0.15 * lengths)), 10))
    assert (batch['pred_positions'] < lengths[:, None]).all()
    assert suite.WORKLOADS['pretrain-book'].lengths == 'wikitext-2'
    with pytest.raises(ValueError, match='length_counts'):
        synthetic_batch(onp.random.default_rng(0), config, 'pretrain', 4, 16, 3,
                        length_counts=WIKITEXT2_LENGTHS)


def test_the_book_finetuning_batch_has_snli_lengths_and_ours_packs_it():
    """The fine-tuning workloads' batch: padded to 128 as the book pads, at the lengths of
    real SNLI pairs (about 21% of the positions real, 26.5 tokens); ours computes the real
    tokens only, fewer FLOPs than the lean padded count and far fewer than the book's."""
    config = BERTConfig.from_preset('bert.small', vocab_size=20256)
    assert len(SNLI_LENGTHS) == 129 and sum(SNLI_LENGTHS) == 9842
    batch = synthetic_batch(onp.random.default_rng(0), config, 'finetune', 512, 128,
                            length_counts=SNLI_LENGTHS)
    lengths = batch['valid_lens'].astype(int)
    assert lengths.min() >= 9 and lengths[0] == 128
    assert abs(lengths.mean() - 26.5) < 2
    for name in ('finetune-small-128', 'finetune-small-512', 'finetune-base'):
        assert suite.WORKLOADS[name].lengths == 'snli'
    packed = packed_model_flops(config, batch)
    assert packed == 3 * packed_model_flops(config, batch, train=False)
    lean = model_flops(config, 'finetune', 512, 128, lean=True)
    assert packed < 0.4 * lean < 0.4 * model_flops(config, 'finetune', 512, 128)
    # a full-length batch: the packed count is the lean padded one
    full = synthetic_batch(onp.random.default_rng(0), config, 'finetune', 4, 16,
                           full_length=True)
    assert packed_model_flops(config, full) == model_flops(config, 'finetune', 4, 16,
                                                           lean=True)
