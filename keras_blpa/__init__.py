"""keras_blpa: memory-efficient training with approximate activations for Keras 3.

Backprop with Approximate Activations (Chakrabarti & Moseley, NeurIPS 2019): the
forward pass is exact, the backward pass reads a 2/4/8-bit code of each block's
batch-normalised activation.
"""

from keras_blpa import models
from keras_blpa import quantization
from keras_blpa.convert import convert
from keras_blpa.convert import memory_report
from keras_blpa.layers import ApproxConvBlock
from keras_blpa.layers import ResidualBuffer
from keras_blpa.models import resnet
from keras_blpa.quantization import native_ops_available

__version__ = "0.1.0"

__all__ = [
    "ApproxConvBlock",
    "ResidualBuffer",
    "convert",
    "memory_report",
    "models",
    "native_ops_available",
    "quantization",
    "resnet",
]
