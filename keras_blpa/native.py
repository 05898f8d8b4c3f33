"""Lazy loader of the compiled quantisation ops (ops/blpa_ops.cc + cc/).

`load()` returns an object exposing the fused kernels of `keras_blpa.reference`
with the same signatures (``bn_relu_encode, decode_relu, bn_grad_reduce,
bn_grad_input``), backed by the op library, or None when the pure-TF path must
be used:

* ``KERAS_BLPA_PURE_TF=1`` in the environment forces the pure-TF path;
* a missing library, or one that does not load into the installed TensorFlow
  (ABI or version mismatch), gives ONE warning per process naming the path and
  the error, then the pure-TF path.

The library is looked up at ``keras_blpa/_blpa_ops.so`` (built by setup.py);
``KERAS_BLPA_OPS_LIBRARY=/path/to/lib.so`` points at another build (e.g. the
Bazel output ``bazel-bin/_blpa_ops.so``).
"""

import os
import threading
import warnings

LIBRARY_NAME = "_blpa_ops.so"
PURE_TF_ENV = "KERAS_BLPA_PURE_TF"
LIBRARY_ENV = "KERAS_BLPA_OPS_LIBRARY"

_lock = threading.Lock()
_attempted = False
_ops = None
_error = None

_OP_FUNCTIONS = (
    "blpa_bn_relu_encode",
    "blpa_decode_relu",
    "blpa_bn_grad_reduce",
    "blpa_bn_grad_input",
)


def library_path():
    """Path of the op library that `load()` tries."""
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return override
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY_NAME)


def pure_tf_forced():
    """Whether ``KERAS_BLPA_PURE_TF`` asks for the pure-TF path."""
    return os.environ.get(PURE_TF_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class NativeOps:
    """The fused block kernels backed by the compiled op library.

    Same functions and signatures as `keras_blpa.reference`; inputs are cast to
    float32 (x, grad_a and the per-channel vectors) as the reference does.
    """

    def __init__(self, module, path):
        self._module = module
        self.path = path

    def __repr__(self):
        return f"NativeOps({self.path!r})"

    def bn_relu_encode(self, x, scale, offset, inv_step, shift, bits):
        import tensorflow as tf

        activation, packed = self._module.blpa_bn_relu_encode(
            x=tf.cast(x, tf.float32),
            scale=tf.cast(scale, tf.float32),
            offset=tf.cast(offset, tf.float32),
            inv_step=tf.cast(inv_step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            bits=int(bits),
        )
        return activation, packed

    def decode_relu(self, packed, shape, step, shift, bits):
        import tensorflow as tf

        if isinstance(shape, tf.TensorShape):
            shape = shape.as_list()
        shape = tf.convert_to_tensor(shape)
        if shape.dtype not in (tf.int32, tf.int64):
            shape = tf.cast(shape, tf.int64)
        return self._module.blpa_decode_relu(
            packed=packed,
            shape=shape,
            step=tf.cast(step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            bits=int(bits),
        )

    def bn_grad_reduce(self, packed, grad_a, step, shift, gamma, beta, bits):
        import tensorflow as tf

        sum_g, sum_gx = self._module.blpa_bn_grad_reduce(
            packed=packed,
            grad_a=tf.cast(grad_a, tf.float32),
            step=tf.cast(step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            gamma=tf.cast(gamma, tf.float32),
            beta=tf.cast(beta, tf.float32),
            bits=int(bits),
        )
        return sum_g, sum_gx

    def bn_grad_input(
        self, packed, grad_a, step, shift, gamma, beta, coef, mean_g, mean_gx, bits
    ):
        import tensorflow as tf

        return self._module.blpa_bn_grad_input(
            packed=packed,
            grad_a=tf.cast(grad_a, tf.float32),
            step=tf.cast(step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            gamma=tf.cast(gamma, tf.float32),
            beta=tf.cast(beta, tf.float32),
            coef=tf.cast(coef, tf.float32),
            mean_g=tf.cast(mean_g, tf.float32),
            mean_gx=tf.cast(mean_gx, tf.float32),
            bits=int(bits),
        )


def _load_library(path):
    import tensorflow as tf

    if not os.path.exists(path):
        raise FileNotFoundError(
            "file not found (build it with `pip install .` or Bazel, see README)"
        )
    module = tf.load_op_library(path)
    missing = [name for name in _OP_FUNCTIONS if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"library does not define {', '.join(missing)}")
    return NativeOps(module, path)


def load():
    """The native kernels, or None for the pure-TF path (see module docstring)."""
    global _attempted, _ops, _error
    if pure_tf_forced():
        return None
    if _attempted:
        return _ops
    with _lock:
        if not _attempted:
            path = library_path()
            try:
                _ops = _load_library(path)
            except Exception as e:  # noqa: BLE001 - any failure means fallback
                _ops = None
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"keras_blpa: native op library {path} is unavailable "
                    f"({_error}); using the pure-TensorFlow reference kernels "
                    f"(slower, same results). Set {PURE_TF_ENV}=1 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            _attempted = True
    return _ops


def load_error():
    """Why the last load attempt failed (None if it succeeded or never ran)."""
    return _error


def _reset_for_tests():
    """Forgets the load attempt, so that the next `load()` tries again."""
    global _attempted, _ops, _error
    with _lock:
        _attempted = False
        _ops = None
        _error = None
