"""What this CPU can do, and the settings of MXNet's libraries that make use of it.

Both must be in place before the libraries load or run their first kernel, so they are
environment variables set when `gluon_bert` is imported: `tune_openblas` (if MXNet is not
loaded yet) and `enable_amx`. Each leaves a user's own setting alone and has an opt-out;
`gluon-bert bench` records what was in effect.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import sys

__all__ = ['cpu_flags', 'enable_amx', 'tune_openblas']


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux), e.g. {'avx512_bf16', 'amx_bf16', ...}; read once."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('flags'):
                    return frozenset(line.split(':', 1)[1].split())
    except OSError:
        pass
    return frozenset()


def tune_openblas(environ=None) -> str | None:
    """Choose OpenBLAS's SkylakeX kernels on AVX-512 CPUs that also have avx512_bf16.

    MXNet 1.9.1's wheel computes `dot` and `batch_dot` (BERT's attention products) with its
    bundled OpenBLAS, which takes such CPUs for a Cooper Lake and then runs float32 products
    at a third of the speed of its SkylakeX kernels: a 2048^3 `dot` took 645 ms against 249
    ms with `OPENBLAS_CORETYPE=SkylakeX` (measured here, Sapphire Rapids). OpenBLAS reads
    the variable when it is loaded, i.e. at `import mxnet`; afterwards this does nothing.
    A user's own `OPENBLAS_CORETYPE`, or `GLUON_BERT_OPENBLAS=system`, is left alone.
    Returns the core type set, or None."""
    environ = os.environ if environ is None else environ
    if 'OPENBLAS_CORETYPE' in environ or environ.get('GLUON_BERT_OPENBLAS') == 'system':
        return None
    if 'mxnet' in sys.modules or platform.machine() not in ('x86_64', 'AMD64'):
        return None
    flags = cpu_flags()
    if 'avx512_bf16' in flags and {'avx512f', 'avx512bw', 'avx512dq', 'avx512vl'} <= flags:
        environ['OPENBLAS_CORETYPE'] = 'SkylakeX'
        return 'SkylakeX'
    return None


def enable_amx() -> bool:
    """Let MXNet's oneDNN use AMX for bfloat16 matrix products, where the CPU has it.

    MXNet 1.9.1 ships oneDNN 2.4.4, which can use AMX only when told to
    (`DNNL_MAX_CPU_ISA=AVX512_CORE_AMX`) and does not itself ask Linux for the permission
    to use AMX's tile registers (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`);
    without that permission its AMX kernels die with SIGILL. This asks for the permission
    and sets the variable only when it was granted. Measured here (2 threads, 2048^3):
    bfloat16 `FullyConnected` at about 80 GFLOP/s without AMX, 615 with it; float32 at 145.

    float32 results are bit for bit the same with it (AMX computes no float32), and the
    book's float32 pretraining step was faster with it here all the same (1.96-1.98 s
    against 2.16-2.41 s, 4 runs each alternating), so it is asked for at import, for every
    dtype. Forked processes inherit the permission; an exec'd child that inherits the
    variable must ask again (importing `gluon_bert` does). Call it before MXNet runs its
    first oneDNN primitive: oneDNN fixes its instruction set then. The user's own
    `DNNL_MAX_CPU_ISA` / `ONEDNN_MAX_CPU_ISA`, or `GLUON_BERT_AMX=0`, are left alone.
    Returns whether AMX is enabled."""
    if os.environ.get('GLUON_BERT_AMX', '1') == '0':
        return False
    if 'amx_bf16' not in cpu_flags() or platform.system() != 'Linux':
        return False
    set_by_user = os.environ.get('DNNL_MAX_CPU_ISA') or os.environ.get('ONEDNN_MAX_CPU_ISA')
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        arch_prctl, req_xcomp_perm, xtiledata = 158, 0x1023, 18  # x86-64 Linux
        granted = libc.syscall(arch_prctl, req_xcomp_perm, xtiledata) == 0
    except (OSError, AttributeError):
        granted = False
    if not granted:
        return False
    if not set_by_user:
        os.environ['DNNL_MAX_CPU_ISA'] = 'AVX512_CORE_AMX'
    return (os.environ.get('DNNL_MAX_CPU_ISA') or os.environ.get('ONEDNN_MAX_CPU_ISA')) \
        == 'AVX512_CORE_AMX'
