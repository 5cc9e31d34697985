"""gluon-bert's own CPU kernels for six operations that MXNet 1.9.1 is slow at or lacks.

    from gluon_bert import kernels
    kernels.load()          # at `import gluon_bert.model`: builds once, then loads the cache
    kernels.status()        # {'loaded': True, 'path': ..., 'reason': ...}: recorded by bench
    kernels.use_here(x)     # inside hybrid_forward: take the kernels for this graph?

What they are (`cpu_ops.cc`, whose header has the measurements): `gb_bmm`, the attention
products; `gb_layer_norm`; `gb_softmax_ce`, the cross-entropy of the MLM head over its
vocabulary; `gb_dropout`; `gb_attention`, the whole self-attention of a packed pretraining
batch (`gluon_bert.data.packing`: each sequence's real tokens only, no padding or mask), or
its queries at given rows only (`query_rows`: the last block, whose heads read few rows);
`gb_adam_update`, Adam's update (`train.optimizer.Adam`, the same bits as MXNet's
`adam_update`). Each has its forward (and, but Adam, its backward) and is registered as an MXNet
operator through MXNet's extension-library interface (`mx.library.load`), so they go into
hybridized, `static_alloc` graphs like any operator. At the book's pretraining shapes on
this project's 2-vCPU machine (AVX-512), forward + backward: MXNet's `batch_dot` 16-19 ms a
product at (1024, 64, 64), ours 3.5-5.6 ms (PyTorch's `bmm` 3.4-7.3); MXNet's `LayerNorm`
150-170 ms at (32768, 128), ours 11-15 ms (PyTorch 10.6); cross-entropy 225 against about
100 ms a step; dropout 225 against 21 ms a step.
On an AVX2 CPU (AMD EPYC, 2 vCPUs), where the products and the cross-entropy used to have
only loops that GCC did not vectorise, their AVX2 paths took the book's pretraining step
from 237-277 to 346-356 pairs/s (experiments/RESULTS.md, third round).

How they are built. The wheel ships the extension interface (`mxnet/include`,
`mxnet/src/lib_api.cc`), so the first `load()` compiles `cpu_ops.cc` with the system's C++
compiler for this CPU (`-march=native`, about 15 s, once) into the cache
(`$GLUON_BERT_CACHE`, else `$XDG_CACHE_HOME/gluon-bert`, else `~/.cache/gluon-bert`),
under a name that changes with the source, MXNet's version, the compiler and the CPU, so a
changed source or a home shared by different machines gets a fresh build. Concurrent first
builds are safe (each writes its own file and renames it into place).

When they are used. Only on the CPU (there is no GPU build): the model's top-level block
notes the device of its inputs (`device_scope`), and the attention, LayerNorm and dropout
blocks and the step's losses take the kernels when it is a CPU and the library is loaded,
else MXNet's own operators, with the same parameters and the same results within float32
rounding. `GLUON_BERT_KERNELS=0` turns
them off; a machine without a compiler falls back with one warning that says so.

Order matters: `mx.library.load` regenerates MXNet's operator modules, which would undo
`amp.init`'s patches, so the library is loaded when `gluon_bert.model` is imported, and
`train.precision.use_mixed_precision` loads it (if it is not yet) before `amp.init`.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

__all__ = ['load', 'status', 'use_here', 'device_scope', 'build', 'cache_dir', 'float32',
           'set_cast_inputs']

_SOURCE = Path(__file__).with_name('cpu_ops.cc')
# -Bsymbolic: the library's own C++ (lib_api.cc's strings and containers) binds to itself.
# Without it, in a process that has also loaded Horovod's MXNet library, one of its
# symbols resolved to another library's copy and every call aborted with
# "free(): invalid pointer" (in lib_api.cc's _opCallFCompute).
_FLAGS = ['-O3', '-march=native', '-fopenmp', '-fPIC', '-shared', '-std=c++14', '-Wl,-Bsymbolic']

_state = {'loaded': False, 'tried': False, 'path': None, 'reason': 'not loaded yet'}
# The device type of the graph being built or run: set by the top-level block's call.
_device = contextvars.ContextVar('gluon_bert_kernel_device', default='cpu')
_cast_inputs = False  # mixed precision: inputs may come in bfloat16/float16


def cache_dir() -> Path:
    """Where built kernels are kept."""
    root = os.environ.get('GLUON_BERT_CACHE')
    if not root:
        xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        root = os.path.join(xdg, 'gluon-bert')
    return Path(root) / 'kernels'


def _compiler() -> str | None:
    return os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')


def _mxnet_dir() -> Path:
    import mxnet
    return Path(mxnet.__file__).parent


def _build_key(cxx: str) -> str:
    """What the built library depends on. The compiler enters by its resolved path, size and
    time (a stat, not a run of `--version`: this is computed at every import)."""
    import mxnet
    from ..cpu import cpu_flags
    try:
        found = os.path.realpath(shutil.which(cxx) or cxx)
        info = os.stat(found)
        compiler = f'{found} {info.st_size} {info.st_mtime_ns}'
    except OSError:
        compiler = cxx
    parts = [_SOURCE.read_bytes(), mxnet.__version__.encode(), compiler.encode(),
             ' '.join(sorted(cpu_flags())).encode(), ' '.join(_FLAGS).encode()]
    return hashlib.sha1(b'\0'.join(parts)).hexdigest()[:16]


def build(force: bool = False, quiet: bool = False) -> Path:
    """Compile `cpu_ops.cc` for this machine into the cache (unless it is there); its path.

    Raises RuntimeError, with the compiler's message, when it cannot be built."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError('no C++ compiler found (install g++, or set CXX)')
    mxdir = _mxnet_dir()
    if not (mxdir / 'include' / 'mxnet' / 'lib_api.h').exists():
        raise RuntimeError(f'this MXNet ({mxdir}) ships no extension headers')
    target = cache_dir() / f'gb_cpu_ops_{_build_key(cxx)}.so'
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f'gluon-bert: building its CPU kernels for this machine, once (about 15 s): '
              f'{target}', file=sys.stderr, flush=True)
    fd, tmp = tempfile.mkstemp(suffix='.so', dir=target.parent)
    os.close(fd)
    cmd = [cxx, *_FLAGS, str(_SOURCE), str(mxdir / 'src' / 'lib_api.cc'),
           f'-I{mxdir / "include"}', '-o', tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            errors = [ln for ln in lines if 'error' in ln] or lines[-3:]
            tail = ' '.join(errors[:3])
            raise RuntimeError(f'{Path(cxx).name} failed: {tail}')
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load() -> bool:
    """Build (once) and load the kernels into this process; whether they are available.

    Never raises: a machine that cannot build them runs MXNet's own operators, and says so
    once (`status()['reason']`)."""
    if _state['tried']:
        return _state['loaded']
    _state['tried'] = True
    if os.environ.get('GLUON_BERT_KERNELS', '1') == '0':
        _state['reason'] = 'off (GLUON_BERT_KERNELS=0)'
        return False
    if sys.platform != 'linux':
        _state['reason'] = f'not built on {sys.platform} (Linux only)'
        return False
    try:
        import mxnet as mx
        path = build()
        mx.library.load(str(path), verbose=False)
    except Exception as err:  # noqa: BLE001: any failure means the stock operators
        _state['reason'] = f'unavailable: {err}'
        warnings.warn(f"gluon-bert: its CPU kernels are {_state['reason']}; using MXNet's "
                      f'own batch_dot and LayerNorm (slower on the CPU)', RuntimeWarning,
                      stacklevel=2)
        return False
    _state.update(loaded=True, path=str(path), reason='loaded')
    return True


def status() -> dict:
    """What `load()` did: {'loaded', 'path', 'reason'}."""
    return {k: _state[k] for k in ('loaded', 'path', 'reason')}


@contextlib.contextmanager
def device_scope(device_type: str):
    """The device type ('cpu', 'gpu') that the graph built or run inside is for."""
    token = _device.set(device_type)
    try:
        yield
    finally:
        _device.reset(token)


def current_device() -> str:
    return _device.get()


def use_here(array=None) -> bool:
    """Whether to take gluon-bert's kernels: loaded, and on a CPU. The device is `array`'s
    when it is an NDArray (imperative code), else that of the graph being built."""
    if not _state['loaded']:
        return False
    device = getattr(getattr(array, 'context', None), 'device_type', None) or _device.get()
    return device == 'cpu'


def set_cast_inputs(on: bool) -> None:
    """Mixed precision is on: cast the kernels' inputs to float32 (they are float32-only)."""
    global _cast_inputs
    _cast_inputs = bool(on)


def float32(F, x):
    """`x` as float32 for a kernel.

    In a graph (F is mx.sym) always an `amp_cast`: it runs in place when `x` is float32
    already, and it lets `amp.convert_symbol` convert our graphs, which refuses operators
    it does not know in its `fp32_ops`. Imperatively only under mixed precision."""
    import mxnet as mx
    if _cast_inputs or F is not mx.nd:
        return F.amp_cast(x, dtype='float32')
    return x
