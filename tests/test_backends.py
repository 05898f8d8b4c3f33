"""The backend registry and interface (keras_blpa/backends)."""

import inspect
import os
import re

import pytest

from keras_blpa import backends
from keras_blpa.backends.interface import Backend

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "keras_blpa")


def _interface_functions():
    return {n: f for n, f in vars(Backend).items() if inspect.isfunction(f) and not n.startswith("_")}


def test_tensorflow_backend_implements_the_interface():
    backend = backends.get("tensorflow")
    assert backend.NAME == "tensorflow" and backend is backends.get()
    for name in Backend.__annotations__:
        assert hasattr(backend, name), name
    for name, spec in _interface_functions().items():
        expected = list(inspect.signature(spec).parameters)[1:]  # without self
        assert list(inspect.signature(getattr(backend, name)).parameters) == expected, name


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="KERAS_BACKEND='torch'"):
        backends.get("torch")


def test_missing_backend_package_names_the_extra(monkeypatch):
    real = backends.importlib.import_module

    def without_jax(name):
        if name == "keras_blpa.backends.jax":
            raise ModuleNotFoundError("No module named 'jax'", name="jax")
        return real(name)

    monkeypatch.setattr(backends.importlib, "import_module", without_jax)
    backends._load.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install "keras_blpa\[jax\]"'):
            backends.get("jax")
    finally:
        backends._load.cache_clear()


def test_only_the_registry_branches_on_the_backend_name():
    """Outside keras_blpa/backends/, no module asks Keras for its backend's name
    or compares a name with a backend's."""
    pattern = re.compile(r"""keras\.backend\.backend\(\)|==\s*["'](jax|tensorflow|torch)["']""")
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        if os.path.relpath(root, PACKAGE).split(os.sep)[0] == "backends":
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            for number, line in enumerate(open(path, encoding="utf-8"), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{os.path.relpath(path, PACKAGE)}:{number}: {line.strip()}")
    assert offenders == []
