"""The CPU settings of gluon_bert.cpu: OpenBLAS's core type, chosen before MXNet loads."""
import json
import os
import subprocess
import sys

import pytest

from gluon_bert import cpu

AVX512 = {'avx512f', 'avx512bw', 'avx512dq', 'avx512vl'}


@pytest.fixture
def no_mxnet_loaded(monkeypatch):
    """As if MXNet were not imported yet (pytest has it loaded)."""
    monkeypatch.delitem(sys.modules, 'mxnet', raising=False)


@pytest.mark.parametrize('flags, expected', [
    (AVX512 | {'avx512_bf16'}, 'SkylakeX'),          # what OpenBLAS takes for a Cooper Lake
    (AVX512, None),                                  # Skylake-X itself: detected right
    ({'avx2', 'avx512_bf16'}, None),                 # never SkylakeX kernels without AVX-512
    (set(), None),
])
def test_openblas_core_type_follows_the_cpu(monkeypatch, no_mxnet_loaded, flags, expected):
    monkeypatch.setattr(cpu, 'cpu_flags', lambda: set(flags))
    monkeypatch.setattr(cpu.platform, 'machine', lambda: 'x86_64')
    env = {}
    assert cpu.tune_openblas(env) == expected
    assert env.get('OPENBLAS_CORETYPE') == expected


def test_openblas_core_type_leaves_the_users_choice(monkeypatch, no_mxnet_loaded):
    monkeypatch.setattr(cpu, 'cpu_flags', lambda: AVX512 | {'avx512_bf16'})
    monkeypatch.setattr(cpu.platform, 'machine', lambda: 'x86_64')
    env = {'OPENBLAS_CORETYPE': 'Haswell'}
    assert cpu.tune_openblas(env) is None and env == {'OPENBLAS_CORETYPE': 'Haswell'}
    env = {'GLUON_BERT_OPENBLAS': 'system'}
    assert cpu.tune_openblas(env) is None and 'OPENBLAS_CORETYPE' not in env


def test_openblas_core_type_is_not_set_once_mxnet_is_loaded(monkeypatch):
    import mxnet  # noqa: F401  (loaded: OpenBLAS has read its environment already)
    monkeypatch.setattr(cpu, 'cpu_flags', lambda: AVX512 | {'avx512_bf16'})
    env = {}
    assert cpu.tune_openblas(env) is None and env == {}


def test_importing_gluon_bert_first_sets_it_before_mxnet_loads():
    """In a fresh process: `import gluon_bert` then `import mxnet` sees the setting (where
    this CPU calls for it), and MXNet's products still compute the right numbers."""
    code = ('import os, json, gluon_bert, numpy as np, mxnet as mx\n'
            'a = np.random.default_rng(0).normal(size=(3, 40, 24)).astype("float32")\n'
            'b = np.random.default_rng(1).normal(size=(3, 24, 16)).astype("float32")\n'
            'got = mx.nd.batch_dot(mx.nd.array(a), mx.nd.array(b)).asnumpy()\n'
            'err = float(np.abs(got - a @ b).max())\n'
            'print(json.dumps(dict(core=os.environ.get("OPENBLAS_CORETYPE"), err=err)))\n')
    env = {k: v for k, v in os.environ.items()
           if k not in ('OPENBLAS_CORETYPE', 'GLUON_BERT_OPENBLAS')}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    flags = cpu.cpu_flags()
    wanted = 'SkylakeX' if 'avx512_bf16' in flags and AVX512 <= flags else None
    assert result['core'] == wanted
    assert result['err'] < 1e-4
