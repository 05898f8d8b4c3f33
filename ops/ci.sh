#!/usr/bin/env bash
# keras_blpa CI for the native ops (called from .ci/run): compile and load
# checks of every build route on a machine without a GPU.
#   1. nvcc compiles the CUDA sources (when a CUDA toolkit is on PATH);
#   2. pip builds keras_blpa/_blpa_ops.so (editable, in place) and a regular
#      install into a temporary target; both load into TensorFlow;
#   3. Bazel (Debian's bazel-bootstrap, installed if missing) builds the op
#      library and the standalone cc/ test offline; the cc/ test runs and the
#      Bazel-built library passes the native-op tests.
# Usage: ops/ci.sh        (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

load_check() {  # $1: library path
  KERAS_BLPA_OPS_LIBRARY="$1" "$PY" -W error::RuntimeWarning -c \
    "import keras_blpa; assert keras_blpa.native_ops_available(), 'not loaded'; print('loaded', '$1')"
}

echo "== nvcc compile check"
if command -v nvcc >/dev/null; then
  tmp=$(mktemp -d)
  nice nvcc -c -O3 -std=c++17 -fmad=false -Xcompiler -fPIC \
    -gencode=arch=compute_75,code=sm_75 -gencode=arch=compute_90,code=sm_90 \
    -I. cc/blpa_quant_cuda.cu -o "$tmp/blpa_quant_cuda.o"
  rm -rf "$tmp"
else
  echo "nvcc not found: CUDA compile check skipped"
fi

echo "== pip build (editable, in place)"
KERAS_BLPA_NATIVE=1 nice "$PY" -m pip install -q --no-build-isolation --no-deps -e .
load_check "$PWD/keras_blpa/_blpa_ops.so"

echo "== pip build (regular install into a temporary target)"
target=$(mktemp -d)
KERAS_BLPA_NATIVE=1 nice "$PY" -m pip install -q --no-build-isolation --no-deps --target "$target" .
load_check "$target/keras_blpa/_blpa_ops.so"
rm -rf "$target"

echo "== bazel build"
if ! command -v bazel >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends bazel-bootstrap
fi
nice bazel build //:_blpa_ops.so //:blpa_quant_test
./bazel-bin/blpa_quant_test --quick
load_check "$PWD/bazel-bin/_blpa_ops.so"
KERAS_BLPA_OPS_LIBRARY="$PWD/bazel-bin/_blpa_ops.so" KERAS_BLPA_REQUIRE_NATIVE=1 \
  nice "$PY" -m pytest -q -p no:cacheprovider tests/test_native.py -k "bit_identical or grad_kernels or errors or exports"
bazel shutdown
echo "== native ops CI OK"
