"""Where training runs: the devices and the KVStore, chosen in this one place.

Single machine: every GPU that `try_all_gpus()` finds (CPU when there is none), or an
explicit list such as `cpu(0),cpu(1)`, which runs the multi-device path on a machine without
GPUs. Beyond one machine: MXNet's distributed KVStore (`dist_sync`, `dist_device_sync`),
started by MXNet's launcher, which sets the DMLC_* environment this module reads.
"""
from __future__ import annotations

import os
import re

import mxnet as mx

from ..errors import ConfigError

__all__ = ['try_all_gpus', 'parse_contexts', 'check_kvstore', 'make_kvstore', 'describe']

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
    if kind and kind.startswith('dist') and 'DMLC_ROLE' not in os.environ:
        raise ConfigError(f'--kvstore {kind} needs the DMLC_* environment of a distributed '
                          'launcher (scheduler, servers, workers); without one, leave '
                          '--kvstore out to train on this machine')
    if kind == 'none' and len(contexts) > 1:
        raise ConfigError(f'--kvstore none cannot reduce gradients across {len(contexts)} '
                          'devices: use device or local')


def make_kvstore(kind: str, contexts):
    """The KVStore that reduces gradients across `contexts` (None: no reduction needed).

    'device' reduces on the GPUs, 'local' on the CPU, 'dist_*' across machines.
    """
    check_kvstore(kind, contexts)
    if kind in ('none', None) or (len(contexts) == 1 and not kind.startswith('dist')):
        return None
    return mx.kv.create(kind)


def describe(contexts, kvstore) -> str:
    kv = 'none' if kvstore is None else kvstore.type
    return f'{",".join(map(str, contexts))} (kvstore: {kv})'
