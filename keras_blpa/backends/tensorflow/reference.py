"""Pure-TensorFlow reference of the K-bit activation code.

This module is the oracle of the native C++/CUDA ops and the fallback when they
are not available: the codes (`encode`, `bn_relu_encode`) and decoded values
must match bit for bit; the gradient functions (`bn_grad_reduce`,
`bn_grad_input`) compute the same quantities with other float formulas and
summation orders, so the native ones match them to float32 rounding (tested
with tolerances). Everything here also runs under `tf.function(jit_compile=True)`.

The code (Chakrabarti & Moseley, 2019), per channel c of a batch-normalised
pre-activation y = gamma * x_hat + beta:

* u = y / |gamma| is y in units of the BN standard deviation (sign preserved);
* bins have width 6 / 2^K in u, i.e. ``step = 6 |gamma| / 2^K`` in y;
* ``shift = clip(2^(K-1) - floor(beta / |gamma| * 2^K / 6), 1, 2^K - 1)`` puts
  the ReLU threshold y = 0 exactly on the edge between codes shift-1 and shift;
* ``code = clip(floor(y / step) + shift, 0, 2^K - 1)``, forced to ``>= shift``
  when y > 0 and to ``< shift`` otherwise, so the mask ``code >= shift`` equals
  ``y > 0`` for every element, including y == 0 and underflow;
* decode gives the bin centre ``(code + 0.5 - shift) * step``.

Negative gamma is handled (bins are measured in |gamma|, the mask comes from the
sign of y itself); |gamma| is floored at ``GAMMA_FLOOR`` to keep the step finite.
Non-finite inputs never crash: +inf maps to the top code, -inf and NaN to code 0
(so NaN counts as "ReLU inactive", like ``relu(NaN) > 0`` being false).

Codes are packed densely along the flattened (row-major) tensor: 8 bits one per
byte, 4 bits two per byte (element 2i in the low nibble), 2 bits four per byte
(element 4i+j at bit 2j); the last byte is zero-padded.
"""

import tensorflow as tf

from keras_blpa.codes import GAMMA_FLOOR
from keras_blpa.codes import codes_per_byte

__all__ = [
    "bn_grad_input",
    "bn_grad_reduce",
    "bn_relu_encode",
    "channel_params",
    "decode",
    "decode_relu",
    "encode",
    "encode_codes",
    "pack",
    "unpack",
]

def channel_params(gamma, beta, bits):
    """Per-channel quantiser vectors from the BN scale and shift.

    Returns:
        dict of float32 vectors of shape [C]: ``inv_step`` (1 / bin width in y
        units), ``step`` (bin width), ``shift`` (code of the first positive bin),
        ``gamma`` (gamma with |gamma| floored) and ``beta``.
    """
    gamma = tf.cast(gamma, tf.float32)
    beta = tf.cast(beta, tf.float32)
    levels = float(2**bits)
    gamma = tf.where(
        gamma >= 0.0,
        tf.maximum(gamma, GAMMA_FLOOR),
        tf.minimum(gamma, -GAMMA_FLOOR),
    )
    abs_gamma = tf.abs(gamma)
    step = abs_gamma * (6.0 / levels)
    inv_step = levels / (6.0 * abs_gamma)
    centre = tf.floor(beta / abs_gamma * (levels / 6.0))
    shift = tf.clip_by_value(levels / 2.0 - centre, 1.0, levels - 1.0)
    shift = tf.where(tf.math.is_nan(shift), levels / 2.0, shift)
    return {
        "inv_step": inv_step,
        "step": step,
        "shift": shift,
        "gamma": gamma,
        "beta": beta,
    }


def encode_codes(y, inv_step, shift, bits):
    """K-bit codes (uint8, same shape as y) of the BN output y (channels last)."""
    y = tf.cast(y, tf.float32)
    top = float(2**bits - 1)
    t = tf.floor(y * inv_step) + shift
    positive = y > 0.0
    t = tf.where(positive, tf.maximum(t, shift), tf.minimum(t, shift - 1.0))
    t = tf.clip_by_value(t, 0.0, top)
    # NaN survives the arithmetic above; it becomes code 0 (inactive).
    t = tf.where(tf.math.is_nan(t), tf.zeros_like(t), t)
    return tf.cast(t, tf.uint8)


def pack(codes, bits):
    """Packs uint8 codes of any shape into a dense 1-D uint8 tensor."""
    flat = tf.reshape(tf.cast(codes, tf.uint8), [-1])
    per = codes_per_byte(bits)
    if per == 1:
        return flat
    pad = (per - tf.size(flat) % per) % per
    groups = tf.reshape(tf.concat([flat, tf.zeros([pad], tf.uint8)], 0), [-1, per])
    packed = groups[:, 0]
    for j in range(1, per):
        # Fields do not overlap, so or-ing them in places each field.
        field = tf.bitwise.left_shift(groups[:, j], tf.constant(bits * j, tf.uint8))
        packed = tf.bitwise.bitwise_or(packed, field)
    return packed


def unpack(packed, num_elements, bits):
    """Inverse of `pack`: the first `num_elements` codes as a 1-D uint8 tensor."""
    per = codes_per_byte(bits)
    if per == 1:
        return tf.reshape(packed, [-1])[:num_elements]
    words = tf.reshape(packed, [-1, 1])
    shifts = tf.constant([bits * j for j in range(per)], tf.uint8)
    fields = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(words, shifts), tf.constant(2**bits - 1, tf.uint8)
    )
    return tf.reshape(fields, [-1])[:num_elements]


def encode(y, inv_step, shift, bits):
    """Packed codes of y: ``pack(encode_codes(y, ...))``."""
    return pack(encode_codes(y, inv_step, shift, bits), bits)


def _decode_value(packed, shape, step, shift, bits):
    codes = unpack(packed, tf.reduce_prod(shape), bits)
    return (tf.reshape(tf.cast(codes, tf.float32), shape) + (0.5 - shift)) * step


def decode(packed, shape, step, shift, bits):
    """Bin-centre value of y and the exact ReLU mask (``y > 0``)."""
    y_dec = _decode_value(packed, shape, step, shift, bits)
    # Bin centres are >= step/2 above the threshold and <= -step/2 below it.
    return y_dec, y_dec > 0.0


# Fused block kernels: the ops the native library replaces one for one. They are
# written to keep few full-size temporaries alive (the pure-TF path is also the
# fallback, and its peak memory matters).


def bn_relu_encode(x, scale, offset, inv_step, shift, bits):
    """Forward of BN->ReLU from the block input: (relu(y), packed codes of y).

    y = x * scale + offset, with the BN folded into ``scale = gamma / std`` and
    ``offset = beta - mean * scale`` (the same arithmetic as stock Keras).
    """
    y = tf.cast(x, tf.float32) * scale + offset
    return tf.nn.relu(y), encode(y, inv_step, shift, bits)


def decode_relu(packed, shape, step, shift, bits):
    """Decoded ReLU output: bin centre where the mask is on, else 0."""
    return tf.nn.relu(_decode_value(packed, shape, step, shift, bits))


def _masked_grad(packed, grad_a, step, shift, bits):
    y_dec = _decode_value(packed, tf.shape(grad_a), step, shift, bits)
    return tf.where(y_dec > 0.0, tf.cast(grad_a, tf.float32), 0.0), y_dec


def bn_grad_reduce(packed, grad_a, step, shift, gamma, beta, bits):
    """Per-channel sums of g and g * x_hat, g = grad_a * mask (BN backward).

    x_hat = (y_dec - beta) / gamma is never materialised:
    sum(g * x_hat) = (sum(g * y_dec) - beta * sum(g)) / gamma.
    """
    grad_y, y_dec = _masked_grad(packed, grad_a, step, shift, bits)
    axes = list(range(len(grad_a.shape) - 1))
    sum_g = tf.reduce_sum(grad_y, axes)
    sum_gy = tf.reduce_sum(grad_y * y_dec, axes)
    return sum_g, (sum_gy - beta * sum_g) / gamma


def bn_grad_input(
    packed, grad_a, step, shift, gamma, beta, coef, mean_g, mean_gx, bits
):
    """BN input gradient ``coef * (g - mean_g - x_hat * mean_gx)``.

    Expanded per channel as ``coef * g + a * y_dec + b`` with
    ``a = -coef * mean_gx / gamma`` and ``b = coef * (mean_gx * beta / gamma - mean_g)``.
    """
    grad_y, y_dec = _masked_grad(packed, grad_a, step, shift, bits)
    a = -coef * mean_gx / gamma
    b = coef * (mean_gx * beta / gamma - mean_g)
    return coef * grad_y + (a * y_dec + b)
