#!/usr/bin/env bash
# keras_blpa CI for the native ops (called from tests/run.sh, which .ci/run
# runs): compile and load checks of every build route on a machine without a
# GPU.
#   1. nvcc compiles the CUDA sources (when a CUDA toolkit is on PATH);
#   2. pip builds keras_blpa/_blpa_ops.so (editable, in place) and a regular
#      install into a temporary target; both load into TensorFlow;
#   3. Bazel (Debian's bazel-bootstrap, installed if missing) builds the op
#      library and the standalone cc/ test offline; the cc/ test runs and the
#      Bazel-built library passes the op tests of tests/test_native.py (bit
#      identity, gradients, errors, exports).
# Usage: ops/ci.sh        (from the repository root)
# Python: $PYTHON, else the python on PATH (tests/run.sh activates .venv first,
# which is also what Bazel's repository rule finds as python3 on PATH).
# The in-place library of step 2 (keras_blpa/_blpa_ops.so and its stamp) is
# removed at exit if it was not there before.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

inplace=keras_blpa/_blpa_ops.so
if [ ! -e "$inplace" ]; then
  trap 'rm -f keras_blpa/_blpa_ops.so keras_blpa/_blpa_ops.json' EXIT
fi

load_check() {  # $1: library path
  KERAS_BLPA_OPS_LIBRARY="$1" "$PY" -W error::RuntimeWarning -c \
    "import keras_blpa; assert keras_blpa.native_ops_available(), 'not loaded'; print('loaded', '$1')"
}

sources_bzl() {  # $1: a list of ops/bazel/sources.bzl -> its items, space separated
  "$PY" -c 'import ast, sys
lists = {n.targets[0].id: ast.literal_eval(n.value)
         for n in ast.parse(open("ops/bazel/sources.bzl").read()).body if isinstance(n, ast.Assign)}
print(" ".join(lists[sys.argv[1]]))' "$1"
}

echo "== nvcc compile check"
if command -v nvcc >/dev/null; then
  # Flags and sources from ops/bazel/sources.bzl, as Bazel and setup.py use them.
  nvcc_flags=$(sources_bzl NVCC_FLAGS)
  gencode=$(sources_bzl CUDA_GENCODE)
  cuda_sources=$(sources_bzl CUDA_SOURCES)
  tmp=$(mktemp -d)
  for src in $cuda_sources; do
    # shellcheck disable=SC2086  # word splitting of the flag lists is intended
    nice nvcc -c $nvcc_flags $gencode -I. "$src" -o "$tmp/$(basename "$src").o"
  done
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
