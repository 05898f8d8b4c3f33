#!/usr/bin/env bash
# JAX-backend tests (tests/test_jax.py, and the backend-agnostic tests/test_pooling.py) on
# CPU with jax from PyPI.
#
# Creates (or updates) a virtual environment with keras_blpa's extras [jax], [test] and
# [tensorflow-cpu] (the cross-backend .keras test saves on one backend and loads on the
# other; the other tests block TensorFlow or do not need it), then runs the tests of
# this checkout (first on PYTHONPATH) with KERAS_BACKEND=jax.
#   JAX_VENV   environment path (default: ~/.cache/keras_blpa/venv-jax)
#   extra arguments go to pytest (e.g. -m "not slow")
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${JAX_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/keras_blpa/venv-jax}"
extras=".[jax,tensorflow-cpu,test]"
# Installed (editable, with build isolation: the op library built for .venv's TensorFlow
# is left alone) again when the extras or setup.py change.
installed="$extras $(sha256sum setup.py | cut -c1-16)"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if [ "$(cat "$venv/.keras_blpa_requirements" 2>/dev/null)" != "$installed" ]; then
  "$venv/bin/pip" install -q -e "$extras"
  echo "$installed" > "$venv/.keras_blpa_requirements"
fi
"$venv/bin/pip" check
export KERAS_BACKEND=jax PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TF_CPP_MIN_LOG_LEVEL=2
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_jax.py tests/test_pooling.py "$@"
