"""Rows -> a summary over rounds, the issue's targets checked, a markdown table, a plot.

Ratios are computed within a round (every variant of a round ran back to back on the same
machine state) and then summarised as the median and range over rounds.
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

from .harness import row_key

__all__ = ['summarize', 'check_targets', 'TARGETS', 'write_markdown', 'write_plot',
           'format_rows', 'format_summary', 'format_targets']

PORTS = ('torch-eager', 'torch-compile', 'jax-jit', 'gluonnlp')
LOOP_PORTS = ('torch-eager', 'torch-compile', 'jax-jit')


def _ok(row):
    return 'error' not in row and 'skipped' not in row


def _spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return dict(median=statistics.median(values), min=min(values), max=max(values),
                n=len(values))


def summarize(rows):
    """One entry per measurement (workload, variant, mode, scope, dtype, allocator) with the
    median and range over rounds; skipped and failed measurements keep their reason."""
    groups = {}
    for r in rows:
        if r.get('workload') == 'matmul-peak':
            continue
        groups.setdefault(row_key(r), []).append(r)
    out = []
    for key, rs in groups.items():
        good = [r for r in rs if _ok(r)]
        first = rs[0]
        entry = dict(zip(('workload', 'variant', 'mode', 'scope', 'dtype', 'allocator'), key),
                     framework=first.get('framework'), task=first.get('task'),
                     preset=first.get('preset'), batch_size=first.get('batch_size'),
                     seq_len=first.get('seq_len'), rounds=len(good))
        if not good:
            reason = first.get('skipped') or first.get('error')
            entry['skipped' if 'skipped' in first else 'error'] = reason
            out.append(entry)
            continue
        for field in ('examples_per_sec', 'tokens_per_sec', 'ms_per_step', 'ratio_to_ours',
                      'model_gflops_per_sec', 'share_fp32_peak', 'share_bf16_peak',
                      'minor_faults_per_step', 'system_s_per_step', 'peak_rss_mb',
                      'iqr_step_s'):
            entry[field] = _spread([r.get(field) for r in good])
        errors = [r['error'] for r in rs if 'error' in r]
        if errors:
            entry['errors_in_rounds'] = errors
        notes = []
        for r in good:
            for n in r.get('notes') or []:
                if n not in notes:
                    notes.append(n)
        entry['notes'] = notes
        entry['device'] = good[0].get('device')
        out.append(entry)
    return out


# -- targets ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    threshold: float
    compute: Callable  # {key: row} of one round -> (value, detail) or (None, why)
    below: bool = False  # met when the value is below the threshold

    def met(self, value):
        return value < self.threshold if self.below else value >= self.threshold


def _rate(rows, workload, variant, mode='train', scope='step', dtype='float32',
          allocator=None):
    for (w, v, m, s, d, a), r in rows.items():
        if (w, v, m, s, d) == (workload, variant, mode, scope, dtype) and \
                (a == allocator if allocator else a in ('tuned', 'custom')):
            return r.get('examples_per_sec'), r
    return None, None


def _ours_rate(rows, workload, ours, mode='train', scope='step'):
    """(examples/s, label) of `ours` on `workload`: one variant, or a tuple of variants of
    which the fastest counts (the label then names it)."""
    if isinstance(ours, str):
        return _rate(rows, workload, ours, mode, scope)[0], ''
    rates = {v: _rate(rows, workload, v, mode, scope)[0] for v in ours}
    rates = {v: r for v, r in rates.items() if r}
    if not rates:
        return None, ''
    best = max(rates, key=rates.get)
    return rates[best], f' ({best})'


def _names(ours):
    return ours if isinstance(ours, str) else 'one of ' + ', '.join(ours)


def _ratio(workload, ours, other, scope='step', mode='train'):
    def compute(rows):
        a, which = _ours_rate(rows, workload, ours, mode, scope)
        b, _ = _rate(rows, workload, other, mode, scope)
        if not a or not b:
            return None, f'needs {_names(ours)} and {other} ({workload}, {mode} {scope})'
        return a / b, f'{a:.1f}{which} / {b:.1f} examples/s'
    return compute


def _ratio_to_fastest(workload, ours, others, scope='step', workloads=None):
    def compute(rows):
        for wl in workloads or (workload,):
            a, which = _ours_rate(rows, wl, ours, 'train', scope)
            rates = {o: _rate(rows, wl, o, 'train', scope)[0] for o in others}
            rates = {o: v for o, v in rates.items() if v}
            if a and rates:
                best = max(rates, key=rates.get)
                return a / rates[best], f'{wl}: {a:.1f}{which} / {rates[best]:.1f} ({best}, ' \
                                        f'fastest of {", ".join(sorted(rates))})'
        return None, f'needs {_names(ours)} and one of {", ".join(others)} ({scope})'
    return compute


# Our fine-tuning loop at its best: packed at the book's padding (ours-hybrid, the default
# `gluon-bert finetune`) or length-bucketed (ours-bucketed, `--pad-to longest --bucket`)
OURS_LOOPS = ('ours-hybrid', 'ours-bucketed')


def _first(workloads, compute_for):
    """The first of `workloads` for which the target can be computed."""
    def compute(rows):
        why = None
        for wl in workloads:
            value, detail = compute_for(wl)(rows)
            if value is not None:
                return value, f'{wl}: {detail}'
            why = why or detail
        return None, why
    return compute


def _peak_share(workloads):
    def compute(rows):
        best = None
        for wl in workloads:
            _, r = _rate(rows, wl, 'ours-hybrid')
            if r and r.get('share_fp32_peak') is not None:
                if best is None or r['share_fp32_peak'] > best[0]:
                    best = (r['share_fp32_peak'], f'{wl}: {r["model_gflops_per_sec"]:.1f} '
                            f'GFLOP/s of {r["matmul_peak"]["float32_gflops"]:.1f}')
        return best or (None, 'needs ours-hybrid train steps and the matmul peak')
    return compute


def _bf16(workload):
    def compute(rows):
        a, _ = _rate(rows, workload, 'ours-hybrid', dtype='bfloat16')
        b, _ = _rate(rows, workload, 'ours-hybrid')
        if not a or not b:
            return None, f'needs ours-hybrid in bfloat16 and float32 ({workload})'
        return a / b, f'{a:.1f} / {b:.1f} examples/s'
    return compute


def _loop_vs_step(workload):
    def compute(rows):
        a, _ = _rate(rows, workload, 'ours-hybrid', scope='loop')
        b, _ = _rate(rows, workload, 'ours-hybrid', scope='step')
        if not a or not b:
            return None, f'needs ours-hybrid loop and step ({workload})'
        return a / b, f'loop {a:.1f} / step {b:.1f} examples/s'
    return compute


# "Today's" page faults of issue 10: our pretraining step on stock glibc when the issue was
# filed (losses outside the static graph), 405,124 a step (experiments/RESULTS.md).
FAULTS_WHEN_FILED = 405_124


def _faults(workload):
    def compute(rows):
        _, tuned = _rate(rows, workload, 'ours-hybrid')
        _, stock = _rate(rows, workload, 'ours-hybrid', allocator='system')
        if not tuned or tuned.get('minor_faults_per_step') is None:
            return None, f'needs ours-hybrid train steps ({workload})'
        a = tuned['minor_faults_per_step']
        how = f'{a:,.0f} faults per step (as gluon-bert runs) / {FAULTS_WHEN_FILED:,}'
        if stock and stock.get('minor_faults_per_step') is not None:
            how += f"; on stock glibc {stock['minor_faults_per_step']:,.0f}"
        return a / FAULTS_WHEN_FILED, how
    return compute


FINETUNE_LOOPS = ('finetune-small-512', 'finetune-small-128')
TARGETS = (
    Target('pretrain-book step: ours / d2l-mxnet', 4.0,
           _ratio('pretrain-book', 'ours-hybrid', 'd2l-mxnet')),
    Target('pretrain-book step: ours / d2l-pytorch', 1.5,
           _ratio('pretrain-book', 'ours-hybrid', 'd2l-pytorch')),
    Target('pretrain-book step: ours / fastest of torch-eager, torch-compile, jax-jit, '
           'gluonnlp', 1.1, _ratio_to_fastest('pretrain-book', 'ours-hybrid', PORTS)),
    Target('fine-tune whole loop: ours (packed or bucketed) / d2l-mxnet (padded to 128)', 8.0,
           _first(FINETUNE_LOOPS, lambda wl: _ratio(wl, OURS_LOOPS, 'd2l-mxnet', 'loop'))),
    Target('fine-tune whole loop: ours (packed or bucketed) / fastest port (bucketed)', 1.25,
           _ratio_to_fastest(None, OURS_LOOPS, LOOP_PORTS, 'loop', FINETUNE_LOOPS)),
    Target('padded fine-tuning step: share of the fp32 matmul peak', 0.5,
           _peak_share(('finetune-small-128', 'finetune-small-512'))),
    Target('bf16 / fp32, ours, bert.small step (finetune-small-128)', 1.5,
           _bf16('finetune-small-128')),
    Target('bf16 / fp32, ours, bert.base step (finetune-base)', 1.5, _bf16('finetune-base')),
    Target('whole loop / step alone, ours, pretrain-book', 0.95, _loop_vs_step('pretrain-book')),
    Target('whole loop / step alone, ours, padded fine-tuning', 0.95,
           _first(FINETUNE_LOOPS, _loop_vs_step)),
    Target('minor page faults per step: ours / when issue 10 was filed, pretrain-book', 0.01,
           _faults('pretrain-book'), below=True),
)


def check_targets(rows, targets=TARGETS):
    """Each target's value per round, summarised (median, range); met = the median meets
    the threshold."""
    rounds = {}
    for r in rows:
        if r.get('workload') != 'matmul-peak' and _ok(r):
            rounds.setdefault(r.get('round', 1), {})[row_key(r)] = r
    out = []
    for t in targets:
        values, details, why = [], [], None
        for _, by_key in sorted(rounds.items()):
            value, detail = t.compute(by_key)
            if value is None:
                why = why or detail
            else:
                values.append(value)
                details.append(detail)
        entry = dict(target=t.name, threshold=t.threshold,
                     comparison='<' if t.below else '>=')
        if values:
            spread = _spread(values)
            entry.update(value=spread['median'], min=spread['min'], max=spread['max'],
                         rounds=len(values), met=t.met(spread['median']), detail=details[0])
        else:
            entry.update(value=None, met=None, detail=why or 'not measured')
        out.append(entry)
    return out


# -- text -------------------------------------------------------------------------------------

def _num(x, digits=1):
    if x is None:
        return '-'
    if abs(x) >= 1000:
        return f'{x:,.0f}'
    return f'{x:.{digits}f}'


def _med(entry, field, digits=1, scale=1.0):
    s = entry.get(field)
    return '-' if not s else _num(s['median'] * scale, digits)


def _ranged(entry, field, digits=1, scale=1.0):
    s = entry.get(field)
    if not s:
        return '-'
    text = _num(s['median'] * scale, digits)
    if s['n'] > 1:
        text += f' [{_num(s["min"] * scale, digits)}-{_num(s["max"] * scale, digits)}]'
    return text


def format_summary(summary):
    head = ('| workload | variant | mode | scope | dtype | allocator | examples/s | tokens/s | '
            'ms/step | IQR ms | ratio to ours | GFLOP/s | % fp32 peak | % bf16 peak | '
            'faults/step | sys s/step | peak RSS MB |')
    lines = [head, '|' + '---|' * 17]
    for e in summary:
        first = (f"| {e['workload']} | {e['variant']} | {e['mode']} | {e['scope']} | "
                 f"{e['dtype']} | {e['allocator']} |")
        if e.get('skipped') or e.get('error'):
            what = 'skipped' if e.get('skipped') else 'error'
            lines.append(first + f" {what}: {e.get('skipped') or e.get('error')} |" + ' |' * 10)
            continue
        lines.append(first + ' ' + ' | '.join([
            _ranged(e, 'examples_per_sec'), _med(e, 'tokens_per_sec', 0),
            _med(e, 'ms_per_step', 0), _med(e, 'iqr_step_s', 0, 1000),
            _ranged(e, 'ratio_to_ours', 2), _med(e, 'model_gflops_per_sec'),
            _med(e, 'share_fp32_peak', 1, 100), _med(e, 'share_bf16_peak', 1, 100),
            _med(e, 'minor_faults_per_step', 0), _med(e, 'system_s_per_step', 3),
            _med(e, 'peak_rss_mb', 0)]) + ' |')
    return '\n'.join(lines)


def format_targets(targets):
    lines = ['| target | measured (median [range]) | threshold | met | how |',
             '|---|---|---|---|---|']
    for t in targets:
        if t['value'] is None:
            value, met = 'not measured', '-'
        else:
            value = _num(t['value'], 3 if t['value'] < 0.1 else 2)
            if t.get('rounds', 1) > 1:
                value += f" [{_num(t['min'], 2)}-{_num(t['max'], 2)}]"
            met = 'met' if t['met'] else 'not met'
        lines.append(f"| {t['target']} | {value} | {t['comparison']} {t['threshold']:g} | "
                     f"{met} | {t['detail']} |")
    return '\n'.join(lines)


def write_markdown(path, rows, summary, targets, title='gluon-bert bench'):
    peaks = [r['matmul_peak'] for r in rows if r.get('workload') == 'matmul-peak'
             and r.get('matmul_peak')]
    meta = next((r for r in rows if _ok(r) and r.get('workload') != 'matmul-peak'), {})
    lines = [f'# {title}', '',
             f"{meta.get('date', '-')}, commit {meta.get('commit') or '-'}, "
             f"{meta.get('machine', '-')}, {meta.get('cpus', '-')} CPUs, "
             f"{meta.get('repeats', 1)} round(s) back to back.", '',
             f"Versions: {_kv(meta.get('versions') or {})}. Environment of every worker: "
             f"{_kv(meta.get('environment') or {}) or 'defaults'}.", '']
    if peaks:
        fp32 = [p.get('float32_gflops') for p in peaks]
        bf16 = [p.get('bfloat16_gflops') for p in peaks]
        lines += [f"Matmul peak (MXNet FullyConnected, {peaks[0]['size']}^3, best of "
                  f"repetitions, per round): fp32 {', '.join(_num(x) for x in fp32)} GFLOP/s; "
                  f"bf16 {', '.join(_num(x) for x in bf16)} GFLOP/s.", '']
    lines += ['## Targets', '', 'Ratios within each round, then the median and range over '
              'rounds; a target is met when the median meets it.', '',
              format_targets(targets), '', '## Measurements', '',
              'examples/s and ratio to ours (ours-hybrid in the same round, workload, mode '
              'and scope): median [min-max] over rounds. ms/step and IQR from the per-step '
              'times; loop rows: steady state (the second half of the run), batch building '
              'included. Model FLOPs are counted from the shape (`bench.flops`): padded for '
              'the others, as executed for ours (packed pretraining, the last block at the '
              'rows the heads read).', '',
              format_summary(summary), '']
    notes = [(e['workload'], e['variant'], n) for e in summary for n in e.get('notes') or []]
    if notes:
        lines += ['## Notes', '']
        seen = set()
        for wl, v, n in notes:
            if (v, n) not in seen:
                seen.add((v, n))
                lines.append(f'- {v}: {n}')
        lines.append('')
    with open(path, 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines))
    return path


def _kv(d):
    return ', '.join(f'{k}={v}' for k, v in sorted(d.items()))


def write_plot(path, summary, title='bench'):
    """examples/s bars per workload (one panel each) x variant, round range as error bars."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    entries = [e for e in summary if e.get('examples_per_sec')]
    workloads = list(dict.fromkeys(e['workload'] for e in entries))
    if not workloads:
        return None
    fig, axes = plt.subplots(len(workloads), 1, squeeze=False,
                             figsize=(9, 1.2 + 0.32 * max(
                                 sum(e['workload'] == w for e in entries) for w in workloads)
                                 * len(workloads)))
    for ax, wl in zip(axes[:, 0], workloads):
        es = [e for e in entries if e['workload'] == wl]
        labels = [f"{e['variant']} {e['mode']} {e['scope']}" +
                  (f" {e['dtype']}" if e['dtype'] != 'float32' else '') +
                  (f" ({e['allocator']})" if e['allocator'] == 'system' else '') for e in es]
        med = [e['examples_per_sec']['median'] for e in es]
        err = [[m - e['examples_per_sec']['min'] for m, e in zip(med, es)],
               [e['examples_per_sec']['max'] - m for m, e in zip(med, es)]]
        colors = ['tab:red' if e['variant'].startswith('ours') else
                  'tab:gray' if e['variant'].startswith('d2l') else 'tab:blue' for e in es]
        y = range(len(es))
        ax.barh(list(y), med, xerr=err, color=colors, capsize=3)
        ax.set_yticks(list(y))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(wl, fontsize=9)
        ax.set_xlabel('examples/s', fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_rows(rows):
    """The rows of one run, one line each (what `gluon-bert bench` prints without --suite)."""
    lines = ['| framework | round | mode | device | batch x len | median step (s) | IQR (s) | '
             'examples/s | tokens/s | % fp32 peak | faults/step | ratio to ours |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if r.get('workload') == 'matmul-peak':
            continue
        name = r.get('framework') or r.get('variant')
        if not _ok(r):
            what = 'skipped' if 'skipped' in r else 'error'
            lines.append(f"| {name} | {r.get('round', 1)} | {r.get('mode', '-')} | "
                         f"{what}: {r.get(what)} |" + ' |' * 8)
            continue
        share = r.get('share_fp32_peak')
        lines.append(
            f"| {name} | {r.get('round', 1)} | {r.get('mode')} | {r.get('device')} | "
            f"{r['batch_size']}x{r['seq_len']} | {r['median_step_s']:.3f} | "
            f"{r.get('iqr_step_s', 0):.3f} | {r['examples_per_sec']:.1f} | "
            f"{_num(r.get('tokens_per_sec'), 0)} | "
            f"{'-' if share is None else f'{100 * share:.1f}'} | "
            f"{_num(r.get('minor_faults_per_step'), 0)} | {_num(r.get('ratio_to_ours'), 2)} |")
    return '\n'.join(lines)
