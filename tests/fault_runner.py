"""`python tests/fault_runner.py FAULT gluon-bert-args...`: the CLI with one fault injected.

FAULT is `none`, or `<where>@<n>`, acting at the n-th time the run reaches <where>:
    kill-params@n    SIGKILL right after model.params of a checkpoint is written (mid-write)
    kill-fsync@n     SIGKILL at the n-th directory fsync of checkpoint writing; there are
                     three per checkpoint: files written, folder renamed, `latest` updated
    sigint-eval@n    two SIGINTs to itself at the start of the n-th evaluation
    sigint-save@n    two SIGINTs to itself while the n-th checkpoint is being written
The fault hooks wrap the package's own functions; nothing in the package knows of them.
With GLUON_BERT_TEST_DUMP=DIR, every MXNet worker also writes the last parameters it
checkpointed to DIR/rank-<rank>.npz (so a test can compare the workers of a job).
"""
from __future__ import annotations

import os
import signal
import sys


def _at(n, action):
    """A counter that runs `action` on its n-th call."""
    calls = [0]

    def tick():
        calls[0] += 1
        if calls[0] == n:
            action()
    return tick


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def _two_sigints():
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)


def install(fault: str) -> None:
    if fault == 'none':
        return
    where, n = fault.split('@')
    from gluon_bert.train import checkpoint, runners
    if where in ('kill-params', 'sigint-save'):
        tick = _at(int(n), _kill if where == 'kill-params' else _two_sigints)
        original = checkpoint.save_params

        def save_params(path, params):
            original(path, params)
            tick()
        checkpoint.save_params = save_params
    elif where == 'kill-fsync':
        tick = _at(int(n), _kill)
        original_fsync = checkpoint._fsync_dir

        def fsync_dir(path):
            original_fsync(path)
            tick()
        checkpoint._fsync_dir = fsync_dir
    elif where == 'sigint-eval':
        tick = _at(int(n), _two_sigints)
        for cls in (runners.MXNetRunner, runners.TorchRunner, runners.JaxRunner):
            def evaluate(self, loader, _original=cls.evaluate):
                tick()
                return _original(self, loader)
            cls.evaluate = evaluate
    else:
        raise SystemExit(f'unknown fault {fault!r}')


def dump_params(folder: str) -> None:
    import numpy as np
    from gluon_bert.train import runners
    original = runners.MXNetRunner.params

    def params(self):
        values = original(self)
        os.makedirs(folder, exist_ok=True)
        np.savez(os.path.join(folder, f'rank-{self.placement.rank}.npz'), **values)
        return values
    runners.MXNetRunner.params = params


if __name__ == '__main__':
    install(sys.argv[1])
    if os.environ.get('GLUON_BERT_TEST_DUMP'):
        dump_params(os.environ['GLUON_BERT_TEST_DUMP'])
    from gluon_bert.cli import main
    sys.exit(main(sys.argv[2:]))
