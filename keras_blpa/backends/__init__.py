"""The Keras backends of keras_blpa: one interface (`interface.Backend`), one package each.

`get()` returns the package of Keras' current backend (``tensorflow/`` or
``jax/``), imported on first use, so that keras_blpa on JAX never imports
TensorFlow. A third backend is one more package here and one line in
`_PACKAGES`.
"""

import functools
import importlib

from keras_blpa.backends.interface import Backend

__all__ = ["Backend", "NAMES", "check", "get"]

# Backend name -> the package that implements it.
_PACKAGES = {
    "tensorflow": "keras_blpa.backends.tensorflow",
    "jax": "keras_blpa.backends.jax",
}
NAMES = tuple(_PACKAGES)
_MEMBERS = tuple(
    name for name in list(Backend.__annotations__) + list(vars(Backend))
    if not name.startswith("_")
)


def check(name=None):
    """`name` (default: Keras' backend) if keras_blpa supports it, else ValueError."""
    if name is None:
        import keras

        name = keras.backend.backend()
    if name not in _PACKAGES:
        raise ValueError(
            f"keras_blpa needs one of the Keras backends {NAMES}. Received: KERAS_BACKEND={name!r}"
        )
    return name


@functools.cache
def _load(name):
    try:
        package = importlib.import_module(_PACKAGES[name])
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] == "keras_blpa":
            raise
        raise ImportError(
            f"keras_blpa on the {name} backend needs the package {e.name!r}: "
            f"pip install \"keras_blpa[{name}]\""
        ) from e
    missing = [m for m in _MEMBERS if not hasattr(package, m)]
    if missing:
        raise TypeError(f"{package.__name__} does not implement the backend interface: {missing}")
    return package


def get(name=None) -> Backend:
    """The backend package (see `interface.Backend`) of `name`, default Keras' current one."""
    return _load(check(name))
