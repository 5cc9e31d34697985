"""One measurement in a process of its own:

    python -m gluon_bert.bench.worker SPEC.json RESULT.json

SPEC names the measurement (variant, workload, mode, scope, dtype) and the files the parent
wrote once for every variant: the initial weights (`params.npz`, MXNet names) and the batch
(`batch.npz`). RESULT receives the per-step times and the process's own figures
(getrusage over the timed steps: minor page faults, system time; peak RSS), or
{'skipped': why}. Anything else that goes wrong is a crash: a traceback on stderr and a
non-zero exit, which the parent turns into an `error` row.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time

import numpy as np

__all__ = ['main', 'time_steps', 'matmul_peak', 'initial_params', 'versions', 'environment']

# what moves these numbers, recorded with every row
ENV_KEYS = ('GLIBC_TUNABLES', 'MALLOC_CONF', 'LD_PRELOAD', 'OMP_NUM_THREADS',
            'OMP_WAIT_POLICY', 'GLUON_BERT_MALLOC', 'MXNET_EXEC_BULK_EXEC_TRAIN',
            'MXNET_ENGINE_TYPE', 'XLA_FLAGS', 'CUDA_VISIBLE_DEVICES', 'DNNL_MAX_CPU_ISA',
            'ONEDNN_MAX_CPU_ISA', 'GLUON_BERT_AMX', 'OPENBLAS_CORETYPE', 'GLUON_BERT_OPENBLAS',
            'GLUON_BERT_KERNELS')


def environment():
    return {k: os.environ[k] for k in ENV_KEYS if k in os.environ}


def versions():
    out = {'python': platform.python_version()}
    for mod in ('mxnet', 'torch', 'jax', 'numpy', 'gluonnlp', 'd2l'):
        module = sys.modules.get(mod)
        if module is not None:
            out[mod] = getattr(module, '__version__', None)
    return out


def _usage(before, after, steps):
    return dict(minor_faults_per_step=(after.ru_minflt - before.ru_minflt) / steps,
                system_s_per_step=(after.ru_stime - before.ru_stime) / steps,
                user_s_per_step=(after.ru_utime - before.ru_utime) / steps,
                peak_rss_mb=after.ru_maxrss / 1024)


def time_steps(step, sync, steps, warmup):
    """(per-step wall times, usage): `warmup` untimed steps, then `steps` steps each ended
    by `sync()` before its timer stops; getrusage around the timed steps only."""
    for _ in range(warmup):
        step()
    sync()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return times, _usage(before, after, steps)


def matmul_peak(size=2048, reps=5, calls=3):
    """GFLOP/s of MXNet's FullyConnected (oneDNN) at size^3, float32 and bfloat16, best of
    `reps` rounds of `calls` products each."""
    import mxnet as mx
    from mxnet.contrib.amp.amp import bfloat16
    x = mx.nd.random.uniform(shape=(size, size))
    w = mx.nd.random.uniform(shape=(size, size))
    out = {'size': size}
    for name in ('float32', 'bfloat16'):
        try:
            a, b = (x, w) if name == 'float32' else (mx.nd.amp_cast(x, dtype=bfloat16),
                                                     mx.nd.amp_cast(w, dtype=bfloat16))
            mx.nd.FullyConnected(a, b, no_bias=True, num_hidden=size).wait_to_read()
            best = float('inf')
            for _ in range(reps):
                start = time.perf_counter()
                for _ in range(calls):
                    y = mx.nd.FullyConnected(a, b, no_bias=True, num_hidden=size)
                y.wait_to_read()
                mx.nd.waitall()
                best = min(best, (time.perf_counter() - start) / calls)
            out[f'{name}_gflops'] = 2 * size ** 3 / best / 1e9
        except mx.base.MXNetError as err:  # no kernel for this type here
            out[f'{name}_gflops'] = None
            out[f'{name}_error'] = str(err).splitlines()[0][:200]
    return out


def initial_params(config, task, seed):
    """This package's initial weights (Xavier, seeded), by MXNet name."""
    import mxnet as mx
    from mxnet import init
    from ..model import BERTClassifier, BERTModel
    from ..ports.convert import mxnet_params
    mx.random.seed(seed)
    net = BERTModel(config) if task == 'pretrain' else BERTClassifier(config)
    net.initialize(init.Xavier())
    return mxnet_params(net)


def _load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def measure(spec):
    from ..config import BERTConfig
    from .suite import Workload
    from .variants import build
    if spec.get('kind') == 'peak':
        return dict(matmul_peak=matmul_peak(spec.get('size', 2048), spec.get('reps', 5)))
    w = Workload.from_dict(spec['workload'])
    config = BERTConfig.from_dict(spec['config'])
    params = _load(spec['params'])
    notes = []
    if spec['scope'] == 'loop':
        from .loops import run_loop
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        result = run_loop(spec, w, config, params, notes)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        result.update(_usage(before, after, max(result.get('steps') or 1, 1)),
                      loop_wall_s=seconds, notes=notes, device=spec.get('devices') or 'cpu')
        notes.append('page faults and system time over the whole run (data building and '
                     'warm-up included)')
        return result
    batch = _load(spec['batch'])
    impl = build(spec['variant'], config, params, batch, w.task, spec.get('dtype', 'float32'),
                 spec.get('devices'))
    try:
        fn = impl.train if spec['mode'] == 'train' else impl.infer
        times, usage = time_steps(fn, impl.sync, w.steps, w.warmup)
    finally:
        impl.close()
    return dict(times=times, device=impl.device, notes=impl.notes + notes, **usage)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print('usage: python -m gluon_bert.bench.worker SPEC.json RESULT.json', file=sys.stderr)
        return 2
    with open(argv[0], encoding='utf-8') as f:
        spec = json.load(f)
    from .variants import Skip
    try:
        result = measure(spec)
    except Skip as why:
        result = {'skipped': str(why)}
    except ImportError as err:
        result = {'skipped': f'not installed: {err}'}
    result.update(versions=versions(), environment=environment(), pid=os.getpid())
    if 'gluon_bert.model' in sys.modules:  # this package's model ran: were its kernels in?
        from .. import kernels
        result['kernels'] = kernels.status()['reason']
    with open(argv[1], 'w', encoding='utf-8') as f:
        json.dump(result, f)
    return 0


if __name__ == '__main__':
    sys.exit(main())
