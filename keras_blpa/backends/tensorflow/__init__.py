"""The TensorFlow backend of keras_blpa (implements `keras_blpa.backends.Backend`).

* `block`: the compressed block, a ``tf.custom_gradient`` with the executor
  ordering that keeps the peak low;
* `fused`: the fused ops in use, native or the pure-TF `reference` (the oracle
  of the code, and the fallback);
* `native`, `native_build`: the op library's loader and its build (at install
  time or at first use);
* `pooling`: `ArgmaxPooling2D`'s max pooling, a ``tf.custom_gradient`` that
  keeps the argmax code;
* `memory`: the allocator's statistics, `facts` for ``keras_blpa.info``.
"""

from keras_blpa.backends.tensorflow import fused
from keras_blpa.backends.tensorflow.block import compressed
from keras_blpa.backends.tensorflow.block import conv
from keras_blpa.backends.tensorflow.block import read
from keras_blpa.backends.tensorflow.block import recompute_call
from keras_blpa.backends.tensorflow.block import residual_call
from keras_blpa.backends.tensorflow.breakdown import step_breakdown
from keras_blpa.backends.tensorflow.memory import accelerator
from keras_blpa.backends.tensorflow.memory import compiled_step_memory
from keras_blpa.backends.tensorflow.memory import facts
from keras_blpa.backends.tensorflow.memory import memory_device
from keras_blpa.backends.tensorflow.memory import memory_stats
from keras_blpa.backends.tensorflow.memory import reset_peak_memory
from keras_blpa.backends.tensorflow.memory import versions
from keras_blpa.backends.tensorflow.pooling import max_pool_argmax

NAME = "tensorflow"
COMPILED_STEP_MEMORY = False
EXPLICIT_CROSS_REPLICA = True


def jit_compatible():
    """Whether the compressed step can be XLA-compiled: not with the native custom ops.

    Loads nothing (see `fused.expects_native`): a layer asks when it is made.
    """
    return not fused.expects_native()


def working_set_factor():
    """Full-size float tensors alive at once in one block's backward.

    The incoming gradient, the decoded activation and the result with the fused
    native ops; the pure-TF fallback also materialises the decoded value, the
    mask, the masked gradient and partial sums, and the executor's order moves
    how many of them meet: ResNet50V2 at 64x64, batch 32, peaked 45 to 61 MiB
    above its kept bytes, 4.9 to 6.7 times its largest activation (9 MiB), so
    8. (The convert tests check the report built on it against the allocator's
    peak, on both paths.)
    """
    return 3 if fused.expects_native() else 8


__all__ = [
    "COMPILED_STEP_MEMORY",
    "EXPLICIT_CROSS_REPLICA",
    "NAME",
    "accelerator",
    "compiled_step_memory",
    "compressed",
    "conv",
    "facts",
    "jit_compatible",
    "max_pool_argmax",
    "memory_device",
    "memory_stats",
    "read",
    "recompute_call",
    "reset_peak_memory",
    "residual_call",
    "step_breakdown",
    "versions",
    "working_set_factor",
]
