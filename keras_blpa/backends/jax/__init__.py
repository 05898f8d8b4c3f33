"""The JAX backend of keras_blpa (implements `keras_blpa.backends.Backend`); no TensorFlow.

* `block`: the compressed block, a ``jax.custom_vjp`` whose residuals are only
  the packed codes, per-channel vectors and kernels, with the code in jnp
  (byte for byte the TensorFlow reference's);
* `pooling`: `ArgmaxPooling2D`'s max pooling, a ``jax.custom_vjp`` whose
  residual is the argmax code;
* `memory`: device statistics, XLA's compiled-step memory (and what is live at
  its peak), ``keras_blpa.info``'s facts;
* `breakdown`: ``python -m keras_blpa.backends.jax.breakdown``, the step's temporaries
  and peak breakdown per mode (results/jax_breakdown).
"""

from keras_blpa.backends.jax.block import compressed
from keras_blpa.backends.jax.block import conv
from keras_blpa.backends.jax.block import read
from keras_blpa.backends.jax.block import recompute_call
from keras_blpa.backends.jax.block import residual_call
from keras_blpa.backends.jax.memory import accelerator
from keras_blpa.backends.jax.memory import compiled_step_memory
from keras_blpa.backends.jax.memory import facts
from keras_blpa.backends.jax.memory import memory_device
from keras_blpa.backends.jax.memory import memory_stats
from keras_blpa.backends.jax.memory import peak_buffers
from keras_blpa.backends.jax.memory import reset_peak_memory
from keras_blpa.backends.jax.memory import versions
from keras_blpa.backends.jax.pooling import max_pool_argmax

NAME = "jax"
# Under keras.distribution a distributed batch is one global (sharded) array.
COMPILED_STEP_MEMORY = True
EXPLICIT_CROSS_REPLICA = False


def jit_compatible():
    """The JAX step is jnp: always XLA-compiled."""
    return True


def working_set_factor():
    """Full-size float tensors alive at once in one block's backward: 3.

    Measured from XLA's buffer assignment: one block's compiled gradient keeps
    temporaries of 3.1x its input's float bytes (32x32x{16,64}, batch 32;
    tests/test_jax.py checks it), as the fused native TensorFlow ops do (the
    incoming gradient, the decoded activation, the result).
    """
    return 3


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
    "peak_buffers",
    "read",
    "recompute_call",
    "reset_peak_memory",
    "residual_call",
    "versions",
    "working_set_factor",
]
