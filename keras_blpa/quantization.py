"""Public quantisation API and the dispatch between native and reference kernels.

`kernels()` returns the object whose functions the layers call: the native op
library (keras_blpa.native) when it loads, else the pure-TF `reference` module.
Both expose the same fused functions with the same signatures:
``bn_relu_encode, decode_relu, bn_grad_reduce, bn_grad_input``.
"""

import tensorflow as tf

from keras_blpa import native
from keras_blpa import reference
from keras_blpa.reference import channel_params
from keras_blpa.reference import packed_size
from keras_blpa.validation import VALID_BITS
from keras_blpa.validation import check_bits

__all__ = [
    "VALID_BITS",
    "channel_params",
    "check_bits",
    "decode",
    "encode",
    "kernels",
    "native_ops_available",
    "packed_size",
]



def native_ops_available():
    """Whether the compiled ops are loaded and used (False under KERAS_BLPA_PURE_TF=1)."""
    return native.load() is not None


def kernels():
    """The fused block kernels in use: native ops if loaded, else the TF reference."""
    ops = native.load()
    return ops if ops is not None else reference


def encode(y, gamma, beta, bits=4):
    """Packs the K-bit code of a BN output `y` (channels last) into a 1-D uint8 tensor.

    Args:
        y: float tensor ``gamma * x_hat + beta`` of any rank, channels last.
        gamma, beta: the BN scale and shift, shape ``[C]``.
        bits: 2, 4 or 8.

    Returns:
        uint8 tensor of ``packed_size(tf.size(y), bits)`` bytes.
    """
    bits = check_bits(bits, allow_none=False)
    p = channel_params(gamma, beta, bits)
    return reference.encode(y, p["inv_step"], p["shift"], bits)


def decode(packed, shape, gamma, beta, bits=4):
    """Inverse of `encode`: ``(y_decoded, relu_mask)`` of the given shape.

    ``y_decoded`` is the centre of each element's bin (within half a bin,
    ``3 |gamma| / 2^K``, of y inside the coded range); ``relu_mask`` is exactly
    ``y > 0``.
    """
    bits = check_bits(bits, allow_none=False)
    p = channel_params(gamma, beta, bits)
    return reference.decode(packed, tf.convert_to_tensor(shape), p["step"], p["shift"], bits)
