#!/usr/bin/env bash
# The newcomer path, as CI runs it: a fresh venv with NO TensorFlow preinstalled,
# plain `pip install ".[tensorflow-cpu]"` with build isolation (the op library is then
# compiled at first use into a fresh per-user cache), a few model.fit steps on the
# native ops with peak memory asserted lower for 4-bit than for exact; then the sdist
# and the editable install (`pip install -e .`) in the same venv, each loading native
# ops; last, JAX only: another fresh venv with `pip install ".[jax]"` and no TensorFlow
# at all, where the package trains and measures its compiled step on KERAS_BACKEND=jax
# and keras_blpa.datasets imports and, used, names the extra to install.
# Usage: bash tests/fresh_install.sh   (from anywhere; takes a few minutes)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KERAS_BLPA_CACHE="$work/cache" TF_CPP_MIN_LOG_LEVEL=2
"${PYTHON:-python3}" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip

echo "== pip install .[tensorflow-cpu] (build isolation, no TensorFlow preinstalled)"
"$py" -m pip install -q "$repo[tensorflow-cpu]"
cd "$work"  # import the installed package, not the checkout
start=$(date +%s)
"$py" -m keras_blpa.info --require-native
echo "first use (import + compile of the native ops): $(( $(date +%s) - start )) s"
# As on an AVX2-only CPU: oneDNN off, so memory statistics rely on keras_blpa's import.
TF_ENABLE_ONEDNN_OPTS=0 KERAS_BLPA_CPU_ISA=avx2 "$py" "$repo/tests/fresh_install_check.py"

echo "== pip install <sdist>"
"$py" -m pip install -q build
"$py" -m build -q --sdist --outdir "$work/dist" "$repo" >/dev/null
"$py" -m pip install -q --no-deps --force-reinstall "$work"/dist/keras_blpa-*.tar.gz
"$py" -m keras_blpa.info --require-native | grep -E "^(kernels|origin)"

echo "== pip install -e . (build isolation)"
"$py" -m pip install -q --no-deps -e "$repo"
"$py" -m keras_blpa.info --require-native | grep -E "^(kernels|origin|library)"

echo "== JAX only: pip install .[jax] (no TensorFlow)"
"${PYTHON:-python3}" -m venv "$work/venv-jax"
jpy="$work/venv-jax/bin/python"
"$jpy" -m pip install -q --upgrade pip
"$jpy" -m pip install -q "$repo[jax]"
KERAS_BACKEND=jax "$jpy" - <<'PY'
import importlib.util
import keras, numpy as np
import keras_blpa
from keras_blpa import datasets, memory

assert importlib.util.find_spec("tensorflow") is None, "TensorFlow is installed here"
try:
    datasets.make_dataset("cifar10", "test", 8)
    raise AssertionError("make_dataset ran without TensorFlow Datasets")
except ImportError as error:
    assert 'pip install "keras_blpa[examples]"' in str(error), error
model = keras_blpa.resnet(20, 10, (16, 16, 3), bits=4)
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
x = np.random.default_rng(0).normal(size=(8, 16, 16, 3)).astype("float32")
y = np.arange(8) % 10
losses = [float(model.train_on_batch(x, y)) for _ in range(3)]
assert np.all(np.isfinite(losses)), losses
print("JAX-only fit losses", [round(v, 4) for v in losses],
      "compiled step peak at batch 64: %.1f MiB" % memory.compiled_step_memory(
          model, np.zeros((64, 16, 16, 3), "float32"), np.zeros(64, "int32")).peak_mib)
PY
echo "== fresh install OK"
