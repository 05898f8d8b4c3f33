#!/usr/bin/env bash
# Sets up keras_blpa in ./.venv: the package with the extras [tensorflow-cpu] (or
# [tensorflow] if the full GPU wheel is already there), [examples] and [test], its
# native ops (compiled against that TensorFlow), and, where the platform provides it
# (Debian/Ubuntu as root), the offline copy of Fashion-MNIST. Extra Debian packages can
# be asked for with EXTRA_APT="...".
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || echo "warning: apt-get update failed" >&2
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends dataset-fashion-mnist ${EXTRA_APT:-} >/dev/null \
    || echo "warning: could not install dataset-fashion-mnist ${EXTRA_APT:-}" >&2
fi

python -m pip install -q --upgrade pip setuptools wheel
# The backend extra: the full TensorFlow wheel if it is there, else the CPU one.
backend=tensorflow-cpu
if python -c "import importlib.metadata as m; m.version('tensorflow')" 2>/dev/null; then
  backend=tensorflow
fi
# The requirements first, then the package again: setup.py compiles the ops against
# the TensorFlow now installed.
KERAS_BLPA_NATIVE=0 python -m pip install -q --no-build-isolation -e ".[$backend,examples,test]"
python -m pip install -q --no-build-isolation --no-deps -e .
# keras-hub, whose models the tests convert: without its declared dependencies
# (tensorflow-text would replace tensorflow-cpu); its import needs regex and tokenizers.
python -m pip install -q --no-deps "keras-hub==0.32.0"
python -m pip install -q regex tokenizers
python -c "import keras_blpa; print('keras_blpa ready; native ops:', keras_blpa.native_ops_available())"
