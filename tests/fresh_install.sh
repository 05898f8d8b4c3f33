#!/usr/bin/env bash
# The newcomer path, as CI runs it: a fresh venv with NO TensorFlow preinstalled,
# plain `pip install .` with build isolation (the op library is then compiled at
# first use into a fresh per-user cache), a few model.fit steps on the native ops
# with peak memory asserted lower for 4-bit than for exact; then the sdist and the
# editable install (`pip install -e .`) in the same venv, each loading native ops.
# Usage: bash tests/fresh_install.sh   (from anywhere; takes a few minutes)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export KERAS_BLPA_CACHE="$work/cache" TF_CPP_MIN_LOG_LEVEL=2
"${PYTHON:-python3}" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --upgrade pip

echo "== pip install . (build isolation, no TensorFlow preinstalled)"
"$py" -m pip install -q "$repo"
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
echo "== fresh install OK"
