"""`gluon-bert compare`: one experiment in MXNet, PyTorch and JAX, side by side.

Every framework starts from the same initial weights (made once, in MXNet, and converted)
and sees the same batches in the same order; the table gives final losses, accuracy and
examples/sec, the plot overlays the loss curves.
"""
from __future__ import annotations

import datetime
import json
import os
import platform

from .config import TrainConfig

__all__ = ['compare', 'FRAMEWORKS']

FRAMEWORKS = ('mxnet', 'torch', 'jax')


def _available(framework):
    if framework == 'mxnet':
        return None
    try:
        __import__(framework)
    except ImportError as err:
        return f'{framework} is not installed ({err}); `bash scripts/setup.sh {framework}`'
    return None


def compare(task, frameworks=FRAMEWORKS, out_dir='runs/compare', progress=None, **settings):
    from .train.loop import check_devices, initial_state, train
    cfg = TrainConfig.for_task(task, out_dir=out_dir, **settings)
    for fw in frameworks:  # refuse before anything runs, not after the first framework
        # the settings for that framework, then its devices, KVStore and dtype
        check_devices(cfg.replace(framework=fw))
    start = initial_state(cfg)
    results, skipped = {}, {}
    for fw in frameworks:
        why = _available(fw)
        if why:
            skipped[fw] = why
            continue
        run_cfg = cfg.replace(framework=fw, out_dir=os.path.join(out_dir, fw))
        results[fw] = train(run_cfg, progress=progress, start=start)
    if not results:
        raise ValueError('no framework could run: ' + '; '.join(skipped.values()))
    summary = dict(task=task, date=datetime.date.today().isoformat(),
                   machine=platform.platform(), cpus=os.cpu_count(), config=cfg.to_dict(),
                   results={fw: {k: v for k, v in r.items() if k != 'history'}
                            for fw, r in results.items()},
                   skipped=skipped)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'compare.json'), 'w', encoding='utf-8') as f:
        json.dump(summary, f, indent=2, default=str)
    text = _table(summary)
    with open(os.path.join(out_dir, 'COMPARE.md'), 'w', encoding='utf-8') as f:
        f.write(text)
    _plot({fw: r['history'] for fw, r in results.items()}, task,
          os.path.join(out_dir, 'compare.png'))
    return dict(summary, table=text)


def _table(s):
    keys = ['train_mlm', 'train_nsp'] if s['task'] == 'pretrain' else ['train_loss', 'eval_acc']
    head = '| framework | ' + ' | '.join(keys) + ' | examples/s | ratio to mxnet |'
    lines = [f"# compare: {s['task']} ({s['date']}, {s['machine']}, {s['cpus']} CPUs)", '',
             head, '|' + '---|' * (len(keys) + 3)]
    base = s['results'].get('mxnet', {}).get('examples_per_sec')
    for fw, r in s['results'].items():
        rate = r.get('examples_per_sec')
        vals = ' | '.join('-' if r.get(k) is None else f'{r[k]:.4f}' for k in keys)
        ratio = f'{rate / base:.2f}' if rate and base else '-'
        lines.append(f"| {fw} | {vals} | {'-' if rate is None else f'{rate:.1f}'} | {ratio} |")
    for fw, why in s['skipped'].items():
        lines.append(f'\n{fw}: skipped, {why}')
    return '\n'.join(lines) + '\n'


def _plot(histories, task, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    keys = ['train_mlm', 'train_nsp'] if task == 'pretrain' else ['train_loss']
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for fw, hist in histories.items():
            pts = [(r['step'], r[key]) for r in hist if key in r]
            if pts:
                ax.plot(*zip(*pts), marker='o', markersize=3, label=fw)
        ax.set_title(key)
        ax.set_xlabel('step')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
