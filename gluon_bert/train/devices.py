"""Where training runs: the devices, the KVStore and this process's place among the
workers of a job, chosen in this one place (`place`).

Single machine: every GPU that `try_all_gpus()` finds (CPU when there is none), or an
explicit list such as `cpu(0),cpu(1)`, which runs the multi-device path on a machine without
GPUs. Beyond one machine: MXNet's distributed KVStore (`dist_sync`, `dist_device_sync`) with
its parameter servers, or Horovod's allreduce (`horovod`), in processes that `gluon-bert
launch` starts (it sets the DMLC_* environment that the KVStore reads).

Data parallelism across workers works as across devices: every worker builds the same global
batch (the batch order is a pure function of the seed and the epoch, so they agree without
talking), takes its own contiguous slice of it, and normalises its losses by the whole
batch; the reduced gradients are then those of the global batch, whatever the number of
workers and devices. Metrics are summed across workers once per log interval.
"""
from __future__ import annotations

import dataclasses
import os
import re

import mxnet as mx
import numpy as onp

from ..errors import ConfigError

__all__ = ['try_all_gpus', 'parse_contexts', 'check_kvstore', 'make_kvstore', 'describe',
           'Placement', 'place', 'DISTRIBUTED']

# KVStores that reduce across processes (and machines)
DISTRIBUTED = ('dist_sync', 'dist_device_sync', 'horovod')

_CTX = re.compile(r'^\s*(cpu|gpu)\s*\(\s*(\d+)\s*\)\s*$|^\s*(cpu|gpu)\s*:?\s*(\d*)\s*$')


def try_all_gpus():
    """Every GPU MXNet can see, or [cpu()] when there is none (as the book's helper)."""
    return [mx.gpu(i) for i in range(mx.context.num_gpus())] or [mx.cpu()]


def parse_contexts(spec: str | None):
    """'auto' / None -> try_all_gpus(); 'cpu(0),cpu(1)', 'gpu0,gpu1', 'cpu' -> contexts."""
    if spec is None or spec.strip() in ('', 'auto'):
        return try_all_gpus()
    contexts = []
    for part in spec.split(','):
        m = _CTX.match(part)
        if not m:
            raise ConfigError(f'cannot read device {part.strip()!r}: use cpu(0), gpu(1), '
                             'a comma-separated list, or auto')
        kind = m.group(1) or m.group(3)
        index = int(m.group(2) or m.group(4) or 0)
        if kind == 'gpu' and index >= mx.context.num_gpus():
            raise ConfigError(f'gpu({index}) requested but MXNet sees '
                             f'{mx.context.num_gpus()} GPU(s)')
        contexts.append(mx.gpu(index) if kind == 'gpu' else mx.cpu(index))
    if len(set(map(str, contexts))) != len(contexts):
        raise ConfigError(f'device listed twice in {spec!r}')
    return contexts


def check_kvstore(kind: str | None, contexts) -> None:
    """Refuse a KVStore that cannot run here, before anything else happens."""
    if os.environ.get('DMLC_ROLE') == 'worker' and kind not in DISTRIBUTED:
        raise ConfigError(f'this process is a worker of a distributed job (DMLC_ROLE is '
                          f'set), but --kvstore is {kind}: pass --kvstore dist_sync')
    if kind and kind.startswith('dist') and 'DMLC_ROLE' not in os.environ:
        raise ConfigError(f'--kvstore {kind} needs the DMLC_* environment of a distributed '
                          'launcher: run it under `gluon-bert launch -n WORKERS -- ...`, or '
                          'leave --kvstore out to train on this machine')
    if kind == 'horovod':
        try:
            import horovod.mxnet  # noqa: F401
        except ImportError as err:
            raise ConfigError(f'--kvstore horovod needs Horovod built with MXNet ({err}); '
                              'install it with `bash scripts/setup.sh horovod`') from None
    if kind == 'none' and len(contexts) > 1:
        raise ConfigError(f'--kvstore none cannot reduce gradients across {len(contexts)} '
                          'devices: use device or local')


def make_kvstore(kind: str, contexts):
    """The KVStore that reduces gradients across `contexts` (None: no reduction needed).

    'device' reduces on the GPUs, 'local' on the CPU, 'dist_*' across machines.
    """
    check_kvstore(kind, contexts)
    if kind in ('none', 'horovod', None) or (len(contexts) == 1 and not kind.startswith('dist')):
        return None
    return mx.kv.create(kind)


_METRICS_KEY = 100_000  # int keys (as the Trainer's) above any parameter's; ps-lite refuses huge ones


@dataclasses.dataclass
class Placement:
    """This process's devices, the KVStore that reduces gradients across them (and across
    workers), and its rank among the `num_workers` workers of the job."""
    contexts: list
    kvstore: object = None      # an mx.kv.KVStore, or None (one device, or Horovod)
    kind: str = 'none'          # the --kvstore it was made from
    rank: int = 0
    num_workers: int = 1
    # the metric keys this process has initialised in the KVStore
    _keys: set = dataclasses.field(default_factory=set, init=False, repr=False)

    @property
    def is_chief(self) -> bool:
        """Rank 0 writes the run folder: checkpoints, metrics, plots."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.kind in DISTRIBUTED

    def allreduce(self, values) -> onp.ndarray:
        """Sum a host array of floats over every worker (one round trip; every worker must
        call it at the same point of the run)."""
        values = onp.asarray(values, dtype='float64')
        if not self.distributed or self.num_workers == 1:
            return values
        flat = mx.nd.array(values.reshape(-1), dtype='float64')   # (n,)
        if self.kind == 'horovod':
            import horovod.mxnet as hvd
            return hvd.allreduce(flat, average=False).asnumpy().reshape(values.shape)
        key = _METRICS_KEY + flat.size  # one key per length, initialised once
        if key not in self._keys:
            self.kvstore.init(key, mx.nd.zeros(flat.shape, dtype='float64'))
            self._keys.add(key)
        out = mx.nd.zeros(flat.shape, dtype='float64')
        self.kvstore.push(key, flat.copy())  # push overwrites its input with the sum
        self.kvstore.pull(key, out=out)
        return out.asnumpy().reshape(values.shape)


def place(devices: str | None, kind: str | None) -> Placement:
    """The Placement of this process for `--devices` and `--kvstore`."""
    contexts = parse_contexts(devices)
    kvstore = make_kvstore(kind, contexts)
    if kind == 'horovod':
        import horovod.mxnet as hvd
        hvd.init()
        return Placement(contexts, None, kind, hvd.rank(), hvd.size())
    if kind in DISTRIBUTED:
        return Placement(contexts, kvstore, kind, kvstore.rank, kvstore.num_workers)
    return Placement(contexts, kvstore, kind or 'none')


def describe(contexts, kvstore) -> str:
    kv = 'none' if kvstore is None else kvstore.type
    return f'{",".join(map(str, contexts))} (kvstore: {kv})'
