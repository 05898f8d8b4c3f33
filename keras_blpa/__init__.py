"""keras_blpa: memory-efficient training with approximate activations for Keras 3.

Backprop with Approximate Activations (Chakrabarti & Moseley, NeurIPS 2019): the
forward pass is exact, the backward pass reads a 2/4/8-bit code of each block's
batch-normalised activation.

Importing keras_blpa before TensorFlow runs its first op turns on TensorFlow's
CPU allocator statistics (``TF_CPU_ALLOCATOR_USE_BFC=true`` unless set), so that
peak memory can be measured on every CPU (`keras_blpa.memory`).
"""

from keras_blpa import memory

memory.enable_cpu_statistics()

from keras_blpa import models  # noqa: E402
from keras_blpa import quantization  # noqa: E402
from keras_blpa.convert import convert  # noqa: E402
from keras_blpa.convert import memory_report  # noqa: E402
from keras_blpa.layers import ApproxConvBlock  # noqa: E402
from keras_blpa.layers import ResidualBuffer  # noqa: E402
from keras_blpa.models import from_preset  # noqa: E402
from keras_blpa.models import resnet  # noqa: E402
from keras_blpa.quantization import native_ops_available  # noqa: E402

__version__ = "0.1.0"

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
