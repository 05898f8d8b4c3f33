"""The fused block ops in use: the native library's if it loads, else the pure-TF reference.

Both have the same functions and signatures (``bn_act_encode``,
``decode_activation``, ``bn_grad_reduce``, ``bn_grad_input``) and give the same
codes; the native ones fuse BN + activation + encode and decode straight into
what the backward consumes. `ops()` loads (and, if needed, builds) the library on first
call, which the block makes at its first training step.
"""

from keras_blpa.backends.tensorflow import native
from keras_blpa.backends.tensorflow import reference
from keras_blpa.backends.tensorflow.reference import channel_params

__all__ = ["channel_params", "expects_native", "native_ops_available", "ops"]


def ops():
    """The fused ops in use: the native library's if it loads, else `reference`."""
    library = native.load()
    return library if library is not None else reference


def native_ops_available():
    """Whether the compiled ops are loaded and used (False under KERAS_BLPA_PURE_TF=1).

    Loads (and, if needed, builds) the library.
    """
    return native.load() is not None


def expects_native():
    """Whether the native ops are, or will be at first use, the ones in use.

    Loads nothing: True unless KERAS_BLPA_PURE_TF=1 or loading failed already.
    """
    return not native.pure_tf_forced() and not native.load_failed()
