"""keras_blpa: memory-efficient training with approximate activations for Keras 3.

Backprop with Approximate Activations (Chakrabarti & Moseley, NeurIPS 2019): the
forward pass is exact, the backward pass reads a 2/4/8-bit code of each block's
batch-normalised activation; `ArgmaxPooling2D` keeps each max pooling's argmax.

Importing keras_blpa changes no setting and loads no compiled library; on JAX
it never imports TensorFlow (`quantization` and `native_ops_available`, the
TensorFlow code API, load on first use).
"""

from keras_blpa import memory
from keras_blpa import models
from keras_blpa.convert import convert
from keras_blpa.convert import memory_report
from keras_blpa.layers import ApproxConvBlock
from keras_blpa.layers import ResidualBuffer
from keras_blpa.models import from_preset
from keras_blpa.models import resnet
from keras_blpa.pooling import ArgmaxPooling2D

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
    "ArgmaxPooling2D",
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
