"""The parent side: inputs written once, one worker process per measurement, rounds, rows.

Every worker gets the same environment (the allocator setting `gluon-bert` itself runs
with, unless --allocator system, the same OMP_NUM_THREADS and OMP_WAIT_POLICY=PASSIVE unless
set), the same initial weights and the same batch, from files this process writes once per
workload.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from ..errors import ConfigError
from .flops import model_flops, packed_model_flops
from .suite import VARIANTS, Measurement, Workload, plan, resolve_variants, workloads_for

__all__ = ['DEFAULT_OUT', 'RESULTS_DIR', 'run_measurements', 'run_suite', 'run_bench',
           'worker_env', 'stats', 'WORKER']

RESULTS_DIR = os.path.join('experiments', 'results')
DEFAULT_OUT = os.path.join(RESULTS_DIR, 'bench.jsonl')
WORKER = (sys.executable, '-m', 'gluon_bert.bench.worker')
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ALLOCATORS = ('tuned', 'system')
# the variants that skip what nothing reads (MXNetRunner(packed=True)): FLOPs as executed
LEAN = ('ours-hybrid', 'ours-imperative')


def _commit():
    try:
        return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True,
                              text=True, timeout=5, cwd=_PACKAGE_ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def default_data_root():
    """../shared/data beside the checkout, where the project's machines keep the real data."""
    path = os.path.join(_PACKAGE_ROOT, '..', 'shared', 'data')
    return os.path.abspath(path) if os.path.isdir(path) else None


def default_allocator():
    return 'system' if os.environ.get('GLUON_BERT_MALLOC') == 'system' else 'tuned'


def worker_env(allocator='tuned'):
    """(environment, allocator label) for a worker, the same for all of them. 'tuned':
    glibc's allocator as
    `gluon-bert` sets it (cli.GLIBC_TUNABLES), unless the user chose an allocator of their
    own ('custom'); 'system': glibc's defaults."""
    from ..cli import GLIBC_TUNABLES
    if allocator not in ALLOCATORS:
        raise ConfigError(f'--allocator must be one of {", ".join(ALLOCATORS)}, got '
                          f'{allocator!r}')
    env = dict(os.environ)
    env.setdefault('OMP_NUM_THREADS', str(os.cpu_count() or 1))  # as `gluon-bert` does
    # Idle OpenMP threads sleep rather than spin (yours wins if set). On a shared 2-core
    # machine spinning threads made a tiny MXNet step 100x slower whenever another process
    # held a core (1,500 ms against 14 ms measured here), for every OpenMP framework.
    env.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    env['PYTHONPATH'] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get('PYTHONPATH')) if p)
    if allocator == 'system':
        env.pop('GLIBC_TUNABLES', None)
        env['GLUON_BERT_MALLOC'] = 'system'
        return env, 'system'
    own = env.get('GLIBC_TUNABLES') not in (None, GLIBC_TUNABLES) or 'LD_PRELOAD' in env
    if own:
        return env, 'custom'
    env['GLIBC_TUNABLES'] = GLIBC_TUNABLES
    env['GLUON_BERT_MALLOC'] = 'tuned'
    return env, 'tuned'


def stats(times):
    """Median and spread of per-step times (seconds)."""
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method='inclusive')
    else:
        q1 = q3 = times[0]
    return dict(median_step_s=statistics.median(times), min_step_s=min(times),
                max_step_s=max(times), q1_step_s=q1, q3_step_s=q3, iqr_step_s=q3 - q1,
                step_times_s=[round(t, 6) for t in times])


# -- inputs -----------------------------------------------------------------------------------

def prepare_inputs(w: Workload, folder, seed=0):
    """The workload's config, initial weights and synthetic batch, written for the workers."""
    from ..config import BERTConfig
    from ..ports.synthetic import LENGTHS, synthetic_batch
    from .worker import initial_params
    config = BERTConfig.from_preset(w.preset, vocab_size=w.vocab_size)
    if w.seq_len > config.max_len:
        raise ConfigError(f'{w.name}: seq_len {w.seq_len} exceeds the {w.preset} preset\'s '
                          f'{config.max_len} positions')
    base = os.path.join(folder, w.name)
    params_path, batch_path = base + '.params.npz', base + '.batch.npz'
    np.savez(params_path, **initial_params(config, w.task, seed))
    # the book's WikiText-2 or SNLI lengths where the workload asks for them at their 64 or
    # 128 positions (a --quick workload is shorter: uniform lengths)
    counts = LENGTHS.get(w.lengths)
    if counts is not None and w.seq_len != len(counts) - 1:
        counts = None
    batch = synthetic_batch(np.random.default_rng(seed), config, w.task, w.batch_size,
                            w.seq_len, w.num_preds, length_counts=counts)
    np.savez(batch_path, **batch)
    packed = {mode: packed_model_flops(config, batch, train=mode == 'train', task=w.task)
              for mode in ('train', 'infer')}
    return dict(config=config, params=params_path, batch=batch_path,
                tokens=float(batch['valid_lens'].sum()), packed_flops=packed)


# -- workers --------------------------------------------------------------------------------

def run_worker(spec, env, timeout, folder, worker=WORKER):
    """Run one worker; its result dict, or {'error': ...} when it crashed or timed out."""
    name = f"{spec.get('id', 'peak')}"
    spec_path = os.path.join(folder, f'{name}.spec.json')
    result_path = os.path.join(folder, f'{name}.result.json')
    log_path = os.path.join(folder, f'{name}.log')
    with open(spec_path, 'w', encoding='utf-8') as f:
        json.dump(spec, f)
    start = time.perf_counter()
    with open(log_path, 'w+', encoding='utf-8') as log:
        try:
            proc = subprocess.run([*worker, spec_path, result_path], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=timeout, cwd=os.getcwd())
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
        log.seek(0)
        tail = [line.rstrip() for line in log.read().splitlines() if line.strip()][-3:]
    wall = time.perf_counter() - start
    if code is None:
        return dict(error=f'timed out after {timeout:g} s (worker killed)', worker_wall_s=wall)
    if code != 0 or not os.path.exists(result_path):
        last = tail[-1] if tail else 'no output'
        return dict(error=f'worker exited with code {code}: {last}', worker_wall_s=wall,
                    log_tail=tail)
    with open(result_path, encoding='utf-8') as f:
        result = json.load(f)
    result['worker_wall_s'] = wall
    return result


def _missing_modules(variant):
    return [m for m in VARIANTS[variant]['needs'] if importlib.util.find_spec(m) is None]


def _figures(m: Measurement, result, inputs, peak):
    """The row's derived figures: examples/s, tokens/s, ms/step, model FLOP/s, peak shares."""
    w, config = m.workload, inputs['config']
    out = {}
    if m.scope == 'step':
        out.update(stats(result.pop('times')))
        median = out['median_step_s']
        out['examples_per_sec'] = w.batch_size / median
        out['tokens_per_sec'] = inputs['tokens'] / median
    else:
        rate = result.get('rate')
        out['examples_per_sec'] = rate
        out['median_step_s'] = w.batch_size / rate if rate else None
        out['tokens_per_sec'] = None  # real lengths vary batch to batch
    if out.get('median_step_s'):
        out['ms_per_step'] = 1000 * out['median_step_s']
    # fine-tuning loops on real SNLI batches, bucketed or packed (ours): the synthetic
    # batch's count does not hold
    real_shapes = m.variant == 'ours-bucketed' or (
        m.scope == 'loop' and w.task == 'finetune' and m.variant in ('torch-eager', 'jax-jit',
                                                                      *LEAN))
    if out.get('median_step_s') and not real_shapes:  # the synthetic batch's count holds
        if m.variant in LEAN:
            # the packed step and forward skip the padding: count what they compute
            flops = inputs['packed_flops'][m.mode]
            out['packed'] = True
        else:  # the padded batch, every position, as the book computes
            flops = model_flops(config, w.task, w.batch_size, w.seq_len, w.num_preds,
                                train=m.mode == 'train')
        out['model_flops_per_step'] = flops
        out['model_gflops_per_sec'] = flops / out['median_step_s'] / 1e9
        for dt in ('float32', 'bfloat16'):
            gflops = (peak or {}).get(f'{dt}_gflops')
            key = 'share_fp32_peak' if dt == 'float32' else 'share_bf16_peak'
            out[key] = out['model_gflops_per_sec'] / gflops if gflops else None
    if w.task == 'pretrain' and out.get('examples_per_sec'):
        out['pairs_per_sec'] = out['examples_per_sec']
    return out


def _progress(enabled, text):
    if enabled:
        print(text, file=sys.stderr, flush=True)


def _describe(m: Measurement):
    extra = ''.join(f' {x}' for x in (m.dtype if m.dtype != 'float32' else '',
                                      f'allocator={m.allocator}' if m.allocator != 'tuned'
                                      else '') if x)
    return f'{m.workload.name} {m.variant} {m.mode} {m.scope}{extra}'


def run_measurements(rounds_plan, repeats=1, out=DEFAULT_OUT, timeout=1800, devices=None,
                     seed=0, data_root=None, progress=True, worker=WORKER, peak_size=2048,
                     peak_reps=5, suite=None, names=None):
    """Run `rounds_plan` (a list of Measurement) `repeats` times back to back; returns the
    rows (one per measurement and round), each also appended to `out` as a JSON line."""
    common = dict(date=datetime.datetime.now().isoformat(timespec='seconds'),
                  machine=platform.platform(), processor=platform.processor() or None,
                  cpus=os.cpu_count(), commit=_commit(), suite=suite, repeats=repeats)
    rows = []
    skips = sum(1 for m in rounds_plan if m.skipped or _missing_modules(m.variant))
    total = (len(rounds_plan) - skips) * repeats + skips
    done = 0
    with tempfile.TemporaryDirectory(prefix='gluon-bert-bench-') as folder:
        inputs = {}
        for m in rounds_plan:
            if m.workload.name not in inputs and not m.skipped:
                inputs[m.workload.name] = prepare_inputs(m.workload, folder, seed)
        for r in range(1, repeats + 1):
            env, label = worker_env('tuned')
            peak_spec = dict(kind='peak', id=f'peak-{r}', size=peak_size, reps=peak_reps)
            peak_result = run_worker(peak_spec, env, timeout, folder, worker)
            peak = peak_result.get('matmul_peak')
            peak_row = dict(common, round=r, workload='matmul-peak', variant='mxnet-fc',
                            allocator=label, environment=peak_result.get('environment'),
                            versions=peak_result.get('versions'), matmul_peak=peak,
                            error=peak_result.get('error'))
            _write(out, peak_row)
            if peak:
                _progress(progress, f'[round {r}/{repeats}] matmul peak at {peak["size"]}^3: '
                          f'fp32 {_fmt(peak.get("float32_gflops"))} GFLOP/s, bf16 '
                          f'{_fmt(peak.get("bfloat16_gflops"))} GFLOP/s')
            else:
                _progress(progress, f'[round {r}/{repeats}] matmul peak: '
                          f'{peak_result.get("error") or peak_result.get("skipped")}')
            for i, m in enumerate(rounds_plan):
                w = m.workload
                row = dict(common, round=r, workload=w.name, variant=m.variant, mode=m.mode,
                           scope=m.scope, dtype=m.dtype, task=w.task, preset=w.preset,
                           vocab_size=w.vocab_size, batch_size=w.batch_size, seq_len=w.seq_len,
                           num_preds=w.num_preds, steps=w.steps, warmup=w.warmup,
                           loop_steps=w.loop_steps if m.scope == 'loop' else None,
                           framework=(names or {}).get(m.variant, m.variant))
                if m.skipped or _missing_modules(m.variant):
                    if r > 1:
                        continue  # a skip is said once
                    done += 1
                    missing = _missing_modules(m.variant)
                    row['skipped'] = m.skipped or f'not installed: {", ".join(missing)}'
                    row['allocator'] = m.allocator
                    _progress(progress, f'[{done}/{total}] {_describe(m)}: skipped '
                              f'({row["skipped"]})')
                    rows.append(row)
                    _write(out, row)
                    continue
                done += 1
                env, label = worker_env(m.allocator)
                row['allocator'] = label
                spec = dict(id=f'r{r}-{i}', variant=m.variant, mode=m.mode, scope=m.scope,
                            dtype=m.dtype, workload=w.to_dict(),
                            config=inputs[w.name]['config'].to_dict(),
                            params=inputs[w.name]['params'], batch=inputs[w.name]['batch'],
                            devices=devices, seed=seed, data_root=data_root)
                _progress(progress, f'[{done}/{total}] {_describe(m)} ...')
                result = run_worker(spec, env, timeout, folder, worker)
                if 'pid' in result:
                    row['worker_pid'] = result['pid']
                if 'error' not in result and 'skipped' not in result:
                    row.update(_figures(m, result, inputs[w.name], peak))
                    row['matmul_peak'] = peak
                for key in ('error', 'skipped', 'device', 'notes', 'versions', 'environment',
                            'minor_faults_per_step', 'system_s_per_step', 'user_s_per_step',
                            'peak_rss_mb', 'worker_wall_s', 'log_tail', 'data', 'intervals',
                            'first_rate', 'examples', 'loop_wall_s'):
                    if key in result:
                        row[key] = result[key]
                rows.append(row)
                _write(out, row)
                _progress(progress, f'[{done}/{total}] {_describe(m)}: {_outcome(row)}')
    add_ratios(rows)
    return rows


def _fmt(x, digits=1):
    return '-' if x is None else f'{x:.{digits}f}'


def _outcome(row):
    if 'error' in row:
        return f'error: {row["error"]}'
    if 'skipped' in row:
        return f'skipped ({row["skipped"]})'
    ms = row.get('ms_per_step')
    return (f'{_fmt(row.get("examples_per_sec"))} examples/s, {_fmt(ms, 0)} ms/step '
            f'[{row.get("worker_wall_s", 0):.0f} s]')


def _write(out, row):
    if not out:
        return
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    with open(out, 'a', encoding='utf-8') as f:
        f.write(json.dumps(row, sort_keys=True, default=str) + '\n')


def row_key(row):
    return (row.get('workload'), row.get('variant'), row.get('mode'), row.get('scope'),
            row.get('dtype'), row.get('allocator'))


def add_ratios(rows):
    """ratio_to_ours: examples/s over ours-hybrid's (fp32, tuned allocator) in the same
    round, workload, mode and scope."""
    ref = {}
    for r in rows:
        if r.get('variant') == 'ours-hybrid' and r.get('dtype') == 'float32' \
                and r.get('allocator') in ('tuned', 'custom') and r.get('examples_per_sec'):
            ref[(r['round'], r['workload'], r['mode'], r['scope'])] = r['examples_per_sec']
    for r in rows:
        base = ref.get((r.get('round'), r.get('workload'), r.get('mode'), r.get('scope')))
        if base and r.get('examples_per_sec'):
            r['ratio_to_ours'] = r['examples_per_sec'] / base
    return rows


# -- entry points --------------------------------------------------------------------------

def run_suite(suite='issue10', quick=False, variants=None, workloads=None, repeats=None,
              allocator=None, dtype='float32', modes=('train', 'infer'),
              scopes=('step', 'loop'), out=DEFAULT_OUT, results_dir=RESULTS_DIR, timeout=None,
              devices=None, seed=0, data_root='auto', base_batch_size=None, steps=None,
              warmup=None, loop_steps=None, progress=True, worker=WORKER, plot=True):
    """Run a suite (`issue10`: every workload, variant, mode and scope, plus our bf16 and
    stock-allocator runs the targets need) and write its markdown table and plot; returns
    {'rows', 'summary', 'targets', 'markdown', 'plot'}."""
    from .report import summarize, check_targets, write_markdown, write_plot
    chosen = resolve_variants(variants) if variants else list(VARIANTS)
    ws = workloads_for(suite, quick, base_batch_size, steps, warmup, loop_steps, workloads)
    allocator = allocator or default_allocator()
    repeats = repeats or (1 if quick else 3)
    if data_root == 'auto':
        data_root = None if quick else default_data_root()
    extras = []
    if suite == 'issue10':
        # the targets' own runs: bf16 against fp32, and glibc's stock allocator
        extras = [('finetune-small-128', 'ours-hybrid', 'train', 'step', 'bfloat16', allocator),
                  ('finetune-base', 'ours-hybrid', 'train', 'step', 'bfloat16', allocator),
                  ('pretrain-book', 'ours-hybrid', 'train', 'step', 'float32', 'system')]
        extras = [e for e in extras if (e[4], e[5]) != (dtype, allocator)]
    measurements = [Measurement(m.workload, m.variant, m.mode, m.scope, m.dtype, allocator,
                                m.skipped)
                    for m in plan(ws, chosen, modes, scopes, dtype)]
    measurements += [Measurement(w, v, mode, scope, dt, alloc)
                     for w in ws for name, v, mode, scope, dt, alloc in extras
                     if name == w.name and v in chosen and mode in modes and scope in scopes]
    measurements.sort(key=lambda m: [w.name for w in ws].index(m.workload.name))
    if not measurements:
        raise ConfigError('nothing to measure: the variants chosen have no measurement in '
                          'these workloads')
    timeout = timeout or (600 if quick else 3600)
    _progress(progress, f'gluon-bert bench --suite {suite}{" --quick" if quick else ""}: '
              f'{len(measurements)} measurements x {repeats} round(s), allocator {allocator}, '
              f'data {data_root or "shipped sample"}')
    rows = run_measurements(measurements, repeats, out, timeout, devices, seed, data_root,
                            progress, worker, peak_size=512 if quick else 2048,
                            peak_reps=2 if quick else 5, suite=suite + ('-quick' if quick else ''))
    summary = summarize(rows)
    targets = check_targets(rows)
    name = suite + ('-quick' if quick else '')
    md = png = None
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        md = write_markdown(os.path.join(results_dir, f'bench_{name}.md'), rows, summary,
                            targets, title=f'gluon-bert bench --suite {suite}'
                            f'{" --quick" if quick else ""}')
        if plot:
            png = write_plot(os.path.join(results_dir, f'bench_{name}.png'), summary,
                             title=f'bench {name}: examples/s (median, range over rounds)')
    return dict(rows=rows, summary=summary, targets=targets, markdown=md, plot=png)


def run_bench(frameworks=('mxnet', 'd2l', 'torch', 'jax'), task='pretrain',
              preset='d2l.pretrain', vocab_size=20256, batch_size=512, seq_len=64,
              num_preds=10, lengths='wikitext-2', steps=10, warmup=2, devices=None, seed=0,
              out=DEFAULT_OUT,
              modes=('train',), repeats=1, allocator=None, dtype='float32', timeout=1800,
              progress=False, worker=WORKER):
    """One workload of your own, each variant (or framework name of the first harness:
    mxnet, d2l, torch, torch.compile, jax) in its own worker; returns the rows, whose
    'framework' is the name asked for. `lengths`: 'wikitext-2' or 'snli' (the book's
    pretraining or fine-tuning lengths, where the shape is the book's) or 'uniform'."""
    names = {}
    for fw in frameworks:
        names.setdefault(resolve_variants([fw])[0], fw)
    w = Workload('custom', task, preset, vocab_size, batch_size, seq_len,
                 num_preds if task == 'pretrain' else 0, steps, warmup,
                 lengths=lengths if lengths != 'uniform' else '')
    allocator = allocator or default_allocator()
    measurements = [Measurement(m.workload, m.variant, m.mode, m.scope, m.dtype, allocator,
                                m.skipped)
                    for m in plan([w], list(names), modes, ('step',), dtype)]
    return run_measurements(measurements, repeats, out, timeout, devices, seed, None,
                            progress, worker, peak_size=512, peak_reps=2, names=names)
