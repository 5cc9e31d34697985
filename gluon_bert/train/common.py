"""Pieces both training loops share: devices, resume, reproducible dropout, timing."""
from __future__ import annotations

import os
import time

import mxnet as mx

from .checkpoint import latest_checkpoint, read_state, CheckpointError
from .devices import make_kvstore, parse_contexts

__all__ = ['setup_devices', 'seed_step', 'find_resume', 'Throughput', 'TrainingInterrupted']


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C once the run's state has been saved."""

    def __init__(self, checkpoint):
        super().__init__(f'interrupted; saved {checkpoint}')
        self.checkpoint = checkpoint


def setup_devices(cfg):
    contexts = parse_contexts(cfg.devices)
    return contexts, make_kvstore(cfg.kvstore, contexts)


def seed_step(seed: int, step: int):
    """Dropout masks as a pure function of (seed, step): a resumed run draws the same ones.
    (MXNet cannot save its generator state, so it is re-seeded before every update.)"""
    mx.random.seed((seed * 1_000_003 + step) % (2 ** 31), ctx='all')


def find_resume(cfg, resume: bool):
    """The checkpoint to continue from, or None. Refuses to silently overwrite a run."""
    ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is None:
        return None
    if not resume:
        raise CheckpointError(f'{cfg.out_dir} already holds a run ({os.path.basename(ckpt)}); '
                              'pass --resume to continue it or choose another --out-dir')
    state = read_state(ckpt)
    if state.get('task') != cfg.task:
        raise CheckpointError(f'{ckpt} is a {state.get("task")} checkpoint, not {cfg.task}')
    return ckpt


class Throughput:
    """Examples per second over the timed steps (the first step, which builds the static
    graph, is left out as warm-up). Stopping the clock needs a sync: callers stop it only
    where they read metrics back anyway."""

    def __init__(self):
        self.examples = 0
        self.seconds = 0.0
        self._start = None
        self._pending = 0

    def start(self):
        self._start = time.perf_counter()

    def add(self, n):
        self._pending += n

    def stop(self):
        """Call right after a device sync."""
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.examples += self._pending
        self._start, self._pending = None, 0

    @property
    def rate(self):
        return self.examples / self.seconds if self.seconds else float('nan')
