#!/usr/bin/env bash
# The README's test command and what CI runs: sets up the environment
# (examples/setup.sh, plus Bazel), checks every build route of the native ops,
# runs the whole suite with the native ops required, runs the tests whose
# figures depend on the CPU again as on an AVX2-only machine (oneDNN off, kernels
# capped at AVX2), runs the JAX-backend tests (their own venv, tests/run_jax.sh), and
# proves the newcomer path (fresh venvs, `pip install ".[tensorflow-cpu]"` and ".[jax]").
# Extra arguments go to the main pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_APT="bazel-bootstrap" bash examples/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export KERAS_BLPA_REQUIRE_NATIVE=1 TF_CPP_MIN_LOG_LEVEL=2
# Build checks of the native ops: nvcc compile, pip builds, Bazel build + load.
bash ops/ci.sh
python -m pytest -q -p no:cacheprovider --durations=25 tests "$@"
echo "== as on an AVX2-only CPU: TF_ENABLE_ONEDNN_OPTS=0, KERAS_BLPA_CPU_ISA=avx2"
TF_ENABLE_ONEDNN_OPTS=0 KERAS_BLPA_CPU_ISA=avx2 python -m pytest -q -p no:cacheprovider \
  tests/test_memory.py tests/test_distributed.py tests/test_benchmark.py tests/test_native.py tests/test_breakdown.py
echo "== Keras on JAX (CPU)"
bash tests/run_jax.sh
echo "== newcomer path"
bash tests/fresh_install.sh
