"""Pieces the training loop shares with the rest of the package: signals, reproducible
dropout, timing."""
from __future__ import annotations

import signal
import threading
import time

__all__ = ['seed_step', 'Throughput', 'TrainingInterrupted', 'StopSignals']


class TrainingInterrupted(Exception):
    """Raised after SIGINT (Ctrl-C) or SIGTERM once the run's state has been saved."""

    def __init__(self, checkpoint, signum=signal.SIGINT):
        name = signal.Signals(signum).name
        super().__init__(f'{name}: stopped; saved {checkpoint}')
        self.checkpoint, self.signum = checkpoint, signum


class StopSignals:
    """While active, SIGINT and SIGTERM only ask the loop to stop: it finishes the step (or
    the evaluation) it is in, saves a checkpoint and returns. Batch schedulers send SIGTERM
    before they kill a job, so it is treated as Ctrl-C is. Signals that come while the
    checkpoint is written change nothing, so a second Ctrl-C cannot lose the save.
    Outside the main thread (where Python cannot take signals) it does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        from .logs import get_logger
        if self.received is None:
            self.received = signum
            get_logger().warning(f'{signal.Signals(signum).name}: finishing this step, then '
                                 'saving a checkpoint and stopping')
        else:
            get_logger().warning(f'{signal.Signals(signum).name}: already stopping; the '
                                 'checkpoint is being written')

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False


def seed_step(seed: int, step: int):
    """Dropout masks as a pure function of (seed, step): a resumed run draws the same ones.
    (MXNet cannot save its generator state, so it is re-seeded before every update.)"""
    import mxnet as mx
    from .runners import step_seed
    mx.random.seed(step_seed(seed, step), ctx='all')


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
        """Examples per second, or None before any timed step."""
        return self.examples / self.seconds if self.seconds and self.examples else None
