#!/usr/bin/env bash
# Set up .venv with gluon-bert, the CPU build of MXNet, the test tools and the book's d2l.
# Extra arguments are extras to add, e.g. `bash scripts/setup.sh torch jax`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
extras="cpu,test"
for e in "$@"; do extras="$extras,$e"; done
.venv/bin/python -m pip install -q -e ".[${extras}]"
# d2l==1.0.3 pins releases that do not install on Python 3.11; its MXNet module only needs
# what the 'test' extra installed, so take it without its pins.
.venv/bin/python -m pip install -q --no-deps "d2l==1.0.3"
.venv/bin/python -c "import mxnet, gluon_bert; print('mxnet', mxnet.__version__, 'gluon_bert', gluon_bert.__version__)"
