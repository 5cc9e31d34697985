#!/usr/bin/env bash
# Set up .venv with gluon-bert, the CPU build of MXNet, the test tools and the book's d2l.
# Extra arguments are extras to add, e.g. `bash scripts/setup.sh torch jax`; `horovod`
# builds Horovod with MXNet and Gloo support.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="cpu,test"
horovod=0
for e in "$@"; do
  if [ "$e" = horovod ]; then horovod=1; else extras="$extras,$e"; fi
done
.venv/bin/python -m pip install -q -e ".[${extras}]"
# d2l==1.0.3 pins releases that do not install on Python 3.11; its MXNet module only needs
# what the 'test' extra installed, so take it without its pins.
.venv/bin/python -m pip install -q --no-deps "d2l==1.0.3"
if [ "$horovod" = 1 ]; then
  # Horovod builds against the installed mxnet (so no isolated build), with Gloo and
  # without MPI, TensorFlow or PyTorch: about 2 minutes on 2 cores.
  .venv/bin/python -m pip install -q wheel
  HOROVOD_WITH_MXNET=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
    HOROVOD_WITHOUT_PYTORCH=1 MAKEFLAGS=-j"$(nproc)" \
    .venv/bin/python -m pip install -q --no-cache-dir --no-build-isolation horovod==0.28.1
  .venv/bin/python -c "import horovod.mxnet as hvd; print('horovod', hvd.__version__ if hasattr(hvd, '__version__') else 'ok')"
fi
.venv/bin/python -c "import mxnet, gluon_bert; print('mxnet', mxnet.__version__, 'gluon_bert', gluon_bert.__version__)"
# gluon-bert's CPU kernels: compiled once for this machine (about 15 s), then cached
.venv/bin/python -c "import gluon_bert.model, gluon_bert.kernels as k; print('kernels', k.status()['reason'])"
