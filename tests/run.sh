#!/usr/bin/env bash
# Sets up the environment (examples/setup.sh, plus Bazel) and runs the whole test suite,
# native ops required: what CI runs. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA_APT="bazel-bootstrap" bash examples/setup.sh
# shellcheck disable=SC1091
. .venv/bin/activate
export KERAS_BLPA_REQUIRE_NATIVE=1 TF_CPP_MIN_LOG_LEVEL=2
# Build checks of the native ops: nvcc compile, pip builds, Bazel build + load.
bash ops/ci.sh
python -m pytest -q -p no:cacheprovider tests "$@"
