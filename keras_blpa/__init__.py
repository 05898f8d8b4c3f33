"""keras_blpa: memory-efficient training with approximate activations for Keras 3.

Backprop with Approximate Activations (Chakrabarti & Moseley, NeurIPS 2019): the
forward pass is exact, the backward pass reads a 2/4/8-bit code of each block's
batch-normalised activation.

On JAX, keras_blpa needs no TensorFlow: `quantization` and
`native_ops_available` (the TensorFlow kernels) load on first use.

Importing keras_blpa before TensorFlow runs its first op turns on TensorFlow's
CPU allocator statistics (``TF_CPU_ALLOCATOR_USE_BFC=true`` unless set), so that
peak memory can be measured on every CPU (`keras_blpa.memory`).
"""

from keras_blpa import memory

memory.enable_cpu_statistics()

from keras_blpa import models  # noqa: E402
from keras_blpa.convert import convert  # noqa: E402
from keras_blpa.convert import memory_report  # noqa: E402
from keras_blpa.layers import ApproxConvBlock  # noqa: E402
from keras_blpa.layers import ResidualBuffer  # noqa: E402
from keras_blpa.models import from_preset  # noqa: E402
from keras_blpa.models import resnet  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    """The TensorFlow-only parts, imported on first use (PEP 562)."""
    if name in ("quantization", "native_ops_available"):
        import importlib

        quantization = importlib.import_module("keras_blpa.quantization")
        return quantization if name == "quantization" else quantization.native_ops_available
    raise AttributeError(f"module 'keras_blpa' has no attribute {name!r}")

__all__ = [
    "ApproxConvBlock",
    "ResidualBuffer",
    "convert",
    "from_preset",
    "memory",
    "memory_report",
    "models",
    "native_ops_available",
    "quantization",
    "resnet",
]
