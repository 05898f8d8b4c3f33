"""Lazy loader of the compiled quantisation ops (ops/blpa_ops.cc + cc/).

`load()` returns an object exposing the fused ops of `reference`
with the same signatures (``bn_act_encode, decode_activation, bn_grad_reduce,
bn_grad_input``, each with a trailing ``act``, a `keras_blpa.blocks.Activation`
passed to the ops as their ``activation`` and ``negative_slope`` attrs), backed
by the op library, or None when the pure-TF path must be used. The library is found, in this order:

1. ``KERAS_BLPA_OPS_LIBRARY=/path/to/lib.so`` (e.g. the Bazel output
   ``bazel-bin/_blpa_ops.so``), loaded unless its stamp names another TensorFlow;
2. ``keras_blpa/_blpa_ops.so`` built by setup.py, if its stamp matches the
   TensorFlow in use and the sources;
3. the per-user cache (`native_build`), compiled there at first use
   if needed (``KERAS_BLPA_NATIVE_BUILD=0`` forbids compiling).

A library whose stamp records a size and sha256 is loaded only if it matches
them (and one without, only if no segment lies past its end), since a truncated
library would kill the process with SIGBUS: a damaged cache entry is rebuilt;
the library of 1. or 2. is refused, with what to do.

``KERAS_BLPA_PURE_TF=1`` forces the pure-TF path. Any failure (no compiler, no
sources, a library that does not load) gives ONE warning per process with the
reason, then the pure-TF path; `status()` says which path is in use and why.
``KERAS_BLPA_CPU_ISA`` (avx, avx2 or avx512, any case) caps the instruction set
of the CPU kernels; another value is ignored with a warning.
"""

import os
import threading
import warnings

from keras_blpa.backends.tensorflow import native_build
from keras_blpa.blocks import RELU
from keras_blpa.blocks import Activation

__all__ = [
    "BUILD_ENV",
    "CPU_ISA_ENV",
    "CPU_ISA_LEVELS",
    "LIBRARY_ENV",
    "NativeOps",
    "PURE_TF_ENV",
    "load",
    "load_error",
    "packaged_library",
    "pure_tf_forced",
    "status",
]

PURE_TF_ENV = "KERAS_BLPA_PURE_TF"
LIBRARY_ENV = "KERAS_BLPA_OPS_LIBRARY"
BUILD_ENV = "KERAS_BLPA_NATIVE_BUILD"
CPU_ISA_ENV = "KERAS_BLPA_CPU_ISA"
# The caps cc/blpa_cpu.h accepts (usable_cpu_level), lowest first.
CPU_ISA_LEVELS = ("avx", "avx2", "avx512")

_lock = threading.Lock()
_attempted = False
_ops = None
_error = None
_origin = None

_OP_FUNCTIONS = (
    "blpa_bn_act_encode",
    "blpa_decode_activation",
    "blpa_bn_grad_reduce",
    "blpa_bn_grad_input",
    "blpa_argmax_pool",
    "blpa_argmax_pool_grad",
)


def packaged_library():
    """Path of the library that setup.py builds into the package."""
    return os.path.join(native_build.PACKAGE_DIR, native_build.LIBRARY_NAME)


def _find_library():
    """(path, origin, remedy) of the library to load, building it into the cache if needed.

    The remedy says what to do if the library is damaged or does not load.
    """
    tf_info = native_build.tensorflow_info()
    override = os.environ.get(LIBRARY_ENV)
    if override:
        stamp = native_build.read_stamp(override)
        if stamp and stamp.get("tensorflow") != tf_info["version"]:
            raise RuntimeError(
                f"{override} was built for TensorFlow {stamp.get('tensorflow')}, "
                f"not {tf_info['version']}"
            )
        return override, LIBRARY_ENV, f"rebuild {override}, or unset {LIBRARY_ENV}"
    packaged = packaged_library()
    if native_build.matches(packaged, tf_info):
        return packaged, "built at install time", (
            f"reinstall keras_blpa, or delete {packaged} and "
            f"{native_build.stamp_path(packaged)} to compile it into the per-user cache at first use"
        )
    if native_build.env_flag(BUILD_ENV) is False:
        raise RuntimeError(
            f"no library built for TensorFlow {tf_info['version']} and {BUILD_ENV}=0"
        )
    library = native_build.cached_library(tf_info)
    return library, "per-user cache", f"delete {os.path.dirname(library)} to rebuild it"


def pure_tf_forced():
    """Whether ``KERAS_BLPA_PURE_TF`` asks for the pure-TF path."""
    return os.environ.get(PURE_TF_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class NativeOps:
    """The fused block kernels backed by the compiled op library.

    Same functions and signatures as `reference`; inputs are cast to
    float32 (x, grad_a and the per-channel vectors) as the reference does.
    """

    def __init__(self, module, path):
        self._module = module
        self.path = path

    def __repr__(self):
        return f"NativeOps({self.path!r})"

    def cpu_isa(self):
        """The instruction set the CPU kernels run with: avx512, avx2, avx (baseline off x86)."""
        return self._module.blpa_cpu_isa().numpy().decode()

    def bn_act_encode(self, x, scale, offset, inv_step, shift, bits, act=RELU):
        """The op's f(y) and codes; silu and gelu (both forms): the op's linear
        y (their code is linear's) through TensorFlow's own f, so the output
        has the reference's (and stock Keras') bits, at Eigen's vectorised speed."""
        import tensorflow as tf

        tf_forward = act.name in _TF_FORWARD
        activation, packed = self._module.blpa_bn_act_encode(
            x=tf.cast(x, tf.float32),
            scale=tf.cast(scale, tf.float32),
            offset=tf.cast(offset, tf.float32),
            inv_step=tf.cast(inv_step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            bits=int(bits),
            **_act_attrs(_LINEAR if tf_forward else act),
        )
        if tf_forward:
            from keras_blpa.backends.tensorflow import reference

            activation = reference.activation_forward(act, activation)
        return activation, packed

    def decode_activation(self, packed, shape, step, shift, bits, act=RELU):
        import tensorflow as tf

        if isinstance(shape, tf.TensorShape):
            shape = shape.as_list()
        shape = tf.convert_to_tensor(shape)
        if shape.dtype not in (tf.int32, tf.int64):
            shape = tf.cast(shape, tf.int64)
        return self._module.blpa_decode_activation(
            packed=packed,
            shape=shape,
            step=tf.cast(step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            bits=int(bits),
            **_act_attrs(act),
        )

    def bn_grad_reduce(self, packed, grad_a, step, shift, gamma, beta, bits, act=RELU):
        import tensorflow as tf

        sum_g, sum_gx = self._module.blpa_bn_grad_reduce(
            packed=packed,
            grad_a=tf.cast(grad_a, tf.float32),
            step=tf.cast(step, tf.float32),
            shift=tf.cast(shift, tf.float32),
            gamma=tf.cast(gamma, tf.float32),
            beta=tf.cast(beta, tf.float32),
            bits=int(bits),
            **_act_attrs(act),
        )
        return sum_g, sum_gx

    def bn_grad_input(
        self, packed, grad_a, step, shift, gamma, beta, coef, mean_g, mean_gx, bits, act=RELU
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
            **_act_attrs(act),
        )

    def argmax_pool(self, x, window):
        """(y, code) of the max pooling of NHWC float32 `x` over a
        `keras_blpa.windows.Window` (ops/blpa_pool_ops.cc)."""
        return self._module.blpa_argmax_pool(
            x=x, code_dtype=window.index_dtype, output_size=list(window.output_size),
            **_window_attrs(window),
        )

    def argmax_pool_grad(self, dy, code, window):
        """The input gradient of `argmax_pool` from its output gradient and code."""
        return self._module.blpa_argmax_pool_grad(
            dy=dy, code=code, input_size=list(window.size), **_window_attrs(window)
        )


# Smooth activations whose forward bn_act_encode leaves to TensorFlow: the
# op's own calls libm (a few ulp from Eigen, and slow); hard_silu's is TF's bits
# already, fused.
_TF_FORWARD = ("silu", "gelu", "gelu_approximate")
_LINEAR = Activation("linear")


def _window_attrs(window):
    """The pooling ops' geometry attrs of a `keras_blpa.windows.Window`."""
    (top, _), (left, _) = window.pads
    return {"ksize": list(window.pool_size), "strides": list(window.strides),
            "pads": [top, left]}


def _act_attrs(act):
    """The ops' attrs of a `keras_blpa.blocks.Activation`."""
    return {"activation": act.name, "negative_slope": float(act.negative_slope)}


def _load_library(path):
    import tensorflow as tf

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: file not found")
    problem = native_build.library_problem(path)
    if problem:
        raise RuntimeError(f"{path} not loaded: {problem}")
    module = tf.load_op_library(path)
    missing = [name for name in _OP_FUNCTIONS if not hasattr(module, name)]
    if missing:
        raise RuntimeError(f"library does not define {', '.join(missing)}")
    return NativeOps(module, path)


def _check_cpu_isa_cap():
    """Warns if KERAS_BLPA_CPU_ISA names no level, which the CPU kernels then ignore."""
    value = os.environ.get(CPU_ISA_ENV)
    if value and value.lower() not in CPU_ISA_LEVELS:
        warnings.warn(
            f"keras_blpa: {CPU_ISA_ENV}={value!r} is not one of {', '.join(CPU_ISA_LEVELS)} "
            "(any case), so it is ignored: the CPU kernels run at the best level this CPU "
            "supports",
            RuntimeWarning,
            stacklevel=3,
        )


def load():
    """The native kernels, or None for the pure-TF path (see module docstring)."""
    global _attempted, _ops, _error, _origin
    if pure_tf_forced():
        return None
    if _attempted:
        return _ops
    with _lock:
        if not _attempted:
            remedy = None
            try:
                path, _origin, remedy = _find_library()
                _ops = _load_library(path)
            except Exception as e:  # noqa: BLE001 - any failure means fallback
                _ops = None
                _error = f"{type(e).__name__}: {e}" + (f"; {remedy}" if remedy else "")
                warnings.warn(
                    "keras_blpa: native ops unavailable "
                    f"({_error}); using the pure-TensorFlow reference kernels "
                    f"(slower, same results). Set {PURE_TF_ENV}=1 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            else:
                _check_cpu_isa_cap()
            _attempted = True
    return _ops


def load_error():
    """Why the last load attempt failed (None if it succeeded or never ran)."""
    return _error


def load_failed():
    """Whether `load()` ran and fell back to the pure-TF path (loads nothing)."""
    return _attempted and _ops is None


def status():
    """Which kernels are in use and why: a dict for `python -m keras_blpa.info`."""
    ops = load()
    if pure_tf_forced():
        return {"kernels": "pure-TF", "reason": f"{PURE_TF_ENV}=1"}
    if ops is None:
        return {"kernels": "pure-TF", "reason": _error}
    stamp = native_build.read_stamp(ops.path) or {}
    return {
        "kernels": "native",
        "library": ops.path,
        "origin": _origin,
        "cpu_isa": ops.cpu_isa(),
        "cuda": stamp.get("cuda_reason", "unknown (library has no stamp)"),
    }


def _reset_for_tests():
    """Forgets the load attempt, so that the next `load()` tries again."""
    global _attempted, _ops, _error, _origin
    with _lock:
        _attempted = False
        _ops = None
        _error = None
        _origin = None
