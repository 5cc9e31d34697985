"""Mixed precision: `--dtype float32|bfloat16|float16` for the MXNet runner.

    check_dtype('bfloat16', contexts)   # refuses what this machine cannot run, in one line
    use_mixed_precision('bfloat16')     # once per process, before the model is built

How it works. MXNet 1.9.1's `amp` rewrites the legacy operators of a graph: with
`amp.init(target_dtype=...)` every `FullyConnected` (and `Convolution`) computes in the low
precision, with casts inserted before it; everything else (softmax, LayerNorm, dropout, the
losses) stays in float32, and so do the parameters, their gradients and Adam's state.
Checkpoints therefore hold float32 weights whatever the run's dtype, and load anywhere.

- bfloat16 runs on CPUs with avx512_bf16 (and many times faster with AMX, which
  `import gluon_bert` enables: `cpu.enable_amx`) and on GPUs; it has float32's range, so it needs no loss scaling.
- float16 needs a GPU: MXNet 1.9.1 has no float16 `FullyConnected` on the CPU. Its small
  range needs loss scaling (`LossScale`), which costs one read-back per step.

`amp.init` patches MXNet's operator modules for the whole process and cannot be undone, so
a process trains in one dtype: `use_mixed_precision` refuses a second, different one.
"""
from __future__ import annotations

from ..config import DTYPES
from ..cpu import cpu_flags
from ..errors import ConfigError

__all__ = ['DTYPES', 'check_dtype', 'use_mixed_precision', 'active_dtype', 'LossScale']

_active = None  # the dtype amp was initialised with in this process


def check_dtype(dtype: str, contexts=None) -> None:
    """Refuse a dtype that these devices cannot train in, with what to use instead."""
    if dtype not in DTYPES:
        raise ConfigError(f'--dtype must be one of {", ".join(DTYPES)}, got {dtype!r}')
    if dtype == 'float32':
        return
    on_gpu = bool(contexts) and all(getattr(c, 'device_type', 'cpu') == 'gpu' for c in contexts)
    if dtype == 'float16' and not on_gpu:
        raise ConfigError('--dtype float16 needs GPUs: MXNet 1.9.1 has no float16 matrix '
                          'product on the CPU; use --dtype bfloat16 there')
    if dtype == 'bfloat16' and not on_gpu and not {'avx512_bf16', 'amx_bf16'} & cpu_flags():
        raise ConfigError('--dtype bfloat16 needs a CPU with avx512_bf16 or AMX (this one has '
                          'neither); use --dtype float32')


def active_dtype() -> str:
    """The dtype this process computes in: 'float32' until `use_mixed_precision`."""
    return _active or 'float32'


def use_mixed_precision(dtype: str) -> None:
    """Switch this process to `dtype` (idempotent; float32 is a no-op before any other).

    Must run before the model is built: amp rewrites operators as graphs are made."""
    global _active
    if dtype == active_dtype():
        return
    if _active is not None or dtype == 'float32':
        raise ConfigError(f'this process already computes in {active_dtype()} (MXNet\'s amp '
                          f'cannot be switched off or changed); run {dtype} in a new process')
    from mxnet.contrib import amp
    from .. import kernels
    kernels.load()  # first: loading an operator library would undo amp's patches
    amp.init(target_dtype=dtype)
    kernels.set_cast_inputs(True)
    _active = dtype


class LossScale:
    """Dynamic loss scaling for float16: losses are multiplied by `scale` before backward
    and gradients divided by it; a step whose gradients overflow is skipped and halves the
    scale, and every `window` clean steps double it (up to 2^24).

    The overflow check reads one flag back per step: the only synchronisation a float16
    step has, and the reason float16 is for GPUs, where it pays for itself."""

    def __init__(self, scale: float = 2.0 ** 16, window: int = 2000):
        self.scale, self.window, self._clean = float(scale), window, 0

    def overflowed(self, grads) -> bool:
        """Whether any gradient is inf/NaN; updates the scale for the next step."""
        import mxnet as mx
        flag = mx.nd.ones((1,), ctx=grads[0].context)
        for i in range(0, len(grads), 200):
            chunk = grads[i:i + 200]
            mx.nd.multi_all_finite(*chunk, num_arrays=len(chunk), init_output=False, out=flag)
        bad = not bool(flag.asscalar())
        if bad:
            self.scale, self._clean = max(self.scale / 2, 1.0), 0
        else:
            self._clean += 1
            if self._clean == self.window:
                self.scale, self._clean = min(self.scale * 2, 2.0 ** 24), 0
        return bad
