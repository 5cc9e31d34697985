"""What a run tells people and tools: log lines, one JSON line per interval, a plot."""
from __future__ import annotations

import json
import logging
import os
import sys

__all__ = ['RunLog', 'plot_history', 'get_logger', 'progress_bar']

logger = logging.getLogger('gluon_bert')


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and notebooks swap it)."""

    def emit(self, record):
        self.stream = sys.stderr
        super().emit(record)


def get_logger():
    if not logger.handlers:
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def progress_bar(total, initial=0, desc='', enabled=None):
    """A tqdm bar on a terminal (or when asked), nothing in CI logs."""
    from tqdm.auto import tqdm
    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(total=total, initial=initial, desc=desc, disable=disable, leave=False,
                dynamic_ncols=True)


class RunLog:
    """Appends one JSON object per logged interval to `<run_dir>/metrics.jsonl`.

    Keys are prefixed `train_` and `eval_`; `history` keeps them for the plot and for
    checkpoints (so a resumed run's plot covers the whole run).
    """

    def __init__(self, run_dir, history=None, write=True):
        self.enabled = write  # False on the workers of a job other than rank 0
        self.path = os.path.join(run_dir, 'metrics.jsonl')
        self.history = list(history or [])
        self.log = get_logger()
        # A resumed run rewrites the file from its checkpoint's history, so that lines
        # logged after the last checkpoint (and then lost) do not appear twice; a fresh
        # run starts it with its first row (a failed start leaves no empty file).
        if not self.enabled:
            pass
        elif self.history:
            tmp = self.path + '.tmp'
            with open(tmp, 'w', encoding='utf-8') as f:
                for row in self.history:
                    f.write(json.dumps(row, sort_keys=True, allow_nan=False) + '\n')
            os.replace(tmp, self.path)
        elif os.path.exists(self.path):
            os.remove(self.path)

    def write(self, row: dict):
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        line = json.dumps(row, sort_keys=True, allow_nan=False)  # NaN is not JSON
        self.history.append(row)
        if self.enabled:
            with open(self.path, 'a', encoding='utf-8') as f:
                f.write(line + '\n')
        self.log.info(' '.join(f'{k} {v}' for k, v in row.items()))


def plot_history(history, path, x_key, series, title=''):
    """Save a PNG with one panel per group of series: {panel title: [metric keys]}."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(name, keys) for name, keys in series.items()
              if any(k in row for row in history for k in keys)]
    if not panels:
        return None
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            pts = [(row[x_key], row[key]) for row in history if key in row]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker='o' if len(pts) < 30 else None, label=key)
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are whole
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = path + '.tmp.png'
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
