"""Shared fixtures: run layer tests on both fused-ops paths (native / pure-TF reference).

Development loop: ``pytest -m "not slow" tests`` (CI runs everything, `tests/run.sh`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Allocator statistics on every CPU (read when TensorFlow runs its first op;
# subprocesses inherit it), as keras_blpa.memory.enable_cpu_statistics() asks.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

import pytest  # noqa: E402


@pytest.fixture(params=["native", "reference"])
def ops_path(request, monkeypatch):
    """Selects the fused ops (`backends.tensorflow.fused.ops`) the layers use for this test.

    "native" skips with a reason when the op library is not built, unless
    KERAS_BLPA_REQUIRE_NATIVE=1 (as in CI), where it fails instead.
    """
    from keras_blpa.backends.tensorflow import native

    if request.param == "reference":
        monkeypatch.setattr(native, "load", lambda: None)
    elif native.load() is None:
        message = "native op library not built/loadable"
        if os.environ.get("KERAS_BLPA_REQUIRE_NATIVE") == "1":
            pytest.fail(message + " (KERAS_BLPA_REQUIRE_NATIVE=1)")
        pytest.skip(message)
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long test (still run by CI)")
