"""The K-bit code as a public TensorFlow API: `encode`, `decode`, `native_ops_available`.

The code (bins, shift, packing) is defined in
`keras_blpa.backends.tensorflow.reference`; the layers use it through their
backend. Needs TensorFlow (``import keras_blpa`` does not import this module
on other backends).
"""

import tensorflow as tf

from keras_blpa.backends.tensorflow import reference
from keras_blpa.backends.tensorflow.fused import native_ops_available
from keras_blpa.codes import VALID_BITS
from keras_blpa.codes import packed_size
from keras_blpa.validation import check_bits

__all__ = ["VALID_BITS", "decode", "encode", "native_ops_available", "packed_size"]


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
    p = reference.channel_params(gamma, beta, bits)
    return reference.encode(y, p["inv_step"], p["shift"], bits)


def decode(packed, shape, gamma, beta, bits=4):
    """Inverse of `encode`: ``(y_decoded, relu_mask)`` of the given shape.

    ``y_decoded`` is the centre of each element's bin (within half a bin,
    ``3 |gamma| / 2^K``, of y inside the coded range); ``relu_mask`` is exactly
    ``y > 0``.
    """
    bits = check_bits(bits, allow_none=False)
    p = reference.channel_params(gamma, beta, bits)
    return reference.decode(packed, tf.convert_to_tensor(shape), p["step"], p["shift"], bits)
