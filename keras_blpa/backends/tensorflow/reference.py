"""Pure-TensorFlow reference of the K-bit activation code.

This module is the oracle of the native C++/CUDA ops and the fallback when they
are not available: the codes (`encode`, `bn_act_encode`) and decoded values
must match bit for bit; the gradient functions (`bn_grad_reduce`,
`bn_grad_input`) compute the same quantities with other float formulas and
summation orders, so the native ones match them to float32 rounding (tested
with tolerances). Everything here also runs under `tf.function(jit_compile=True)`.

The code (Chakrabarti & Moseley, 2019), per channel c of a batch-normalised
pre-activation y = gamma * x_hat + beta:

* u = y / |gamma| is y in units of the BN standard deviation (sign preserved);
* bins have width W / 2^K in u, i.e. ``step = W |gamma| / 2^K`` in y, with the
  window's width W = ``act.window(bits)``: the paper's 6, and 16 for the 8-bit
  codes of the linear and smooth activations (`keras_blpa.blocks.Activation.window`);
  the 4- and 2-bit codes of silu and hard_silu take W per channel from
  the batch (``spread``, `batch_spread`; `keras_blpa.codes.data_window`);
* ``shift = 2^(K-1) - floor(beta / |gamma| * 2^K / W)`` centres the window of
  2^K bins on beta (beta +- W/2 |gamma|); ``edge = clip(shift, 1, 2^K - 1)``.
  Where the window contains 0 (1 <= shift <= 2^K - 1, the paper's case), edge
  = shift puts the ReLU threshold y = 0 exactly on the edge between codes
  shift-1 and shift;
* ``code = clip(floor(y / step) + shift, 0, 2^K - 1)``, forced to ``>= edge``
  when y > 0 and to ``< edge`` otherwise, so the mask ``code >= edge`` equals
  ``y > 0`` for every element, including y == 0 and underflow;
* decode gives the bin centre ``(code + 0.5 - shift) * step``, kept on its
  side of 0 (``max(., 0)`` where the mask is on, ``min(., 0)`` where it is
  off; a no-op where the window contains 0).

Where the window lies wholly above 0 (beta >= 3 |gamma|, shift < 1), code 0
alone means y <= 0 and codes 1 .. 2^K - 1 keep the bins of the window (code 1
also holds 0 < y below it); wholly below 0 (shift > 2^K - 1), the top code
alone means y > 0. The paper clips shift to the window instead, so that such
a channel (pretrained BN layers have them) codes a window far from its values
and nearly every element saturates into one code: at beta = 10 |gamma|,
d_gamma had the wrong sign. Codes are unchanged wherever shift lies in
[1, 2^K - 1]. shift is bounded to +-2^24, where float32 integers end.

Negative gamma is handled (bins are measured in |gamma|, the mask comes from the
sign of y itself); |gamma| is floored at ``GAMMA_FLOOR`` to keep the step finite.
Non-finite inputs never crash: +inf maps to the top code, -inf and NaN to code 0
(so NaN counts as "ReLU inactive", like ``relu(NaN) > 0`` being false).

Other activations a = f(y) (`keras_blpa.blocks.Activation`) use the same
code, with these differences:

* leaky_relu, linear: the code above (0 is an edge); the decoded output is
  f(bin centre) and the derivative f' = 1 above 0, ``negative_slope`` (0 for
  linear: 1) below, both exact.
* relu6: 6 is an edge too: codes >= ``upper = min(shift + round(6 / step),
  2^K - 1)`` are exactly y >= 6, so the mask 0 < y < 6 is exact. Where 6 lies
  inside the paper's window (``m = max(round(6 / step0), 1) <= 2^K - 1 -
  shift0``, with the paper's step0 and shift0, shift0 clipped to
  [1, 2^K - 2]), the bins are resized so that 6 is m whole bins above 0:
  ``step = 6 / m``, ``shift = clip(2^(K-1) - floor(beta / step), 1,
  2^K - 1 - m)`` (step within the rounding of m of step0). Where the
  window lies wholly above 0 (the paper's shift < 1) the bins are resized
  the same way and shift follows the data as for ReLU, clipped to
  ``[2 - m, 2^K - 2]`` so that code 0 alone means y <= 0 and code 1 still
  holds 0 < y < 6 below upper (a window above 6 codes its values from 6 up).
  Elsewhere the paper's bins stay (shift clipped to [1, 2^K - 2]) and only
  the top code means y >= 6; the code below it also holds the values
  between the window's end and 6.
* smooth (silu, gelu both forms, hard_silu): the ReLU code. The decoded
  output is f(bin centre); the derivative is the secant slope across the bin,
  ``(f(hi) - f(lo)) / step`` with ``lo = (code - shift) * step`` and
  ``hi = (code + 1 - shift) * step``, i.e. the mean of f' over the bin; the
  open end bins use the asymptotes f'(-inf) = 0 (code 0) and f'(+inf) = 1
  (code 2^K - 1). So |f'(y) - secant| <= step * max|f''| over the bin:
  max|f''| is 0.5 (silu), 0.80 (gelu) and 1/3 (hard_silu), at 4 bits
  step = W / 16 |gamma| (0.375 |gamma| for gelu; 0.375 to 1 for silu and
  hard_silu, by the batch's window), at 8 bits 0.0625 |gamma| (the wide
  window).

Codes are packed densely along the flattened (row-major) tensor: 8 bits one per
byte, 4 bits two per byte (element 2i in the low nibble), 2 bits four per byte
(element 4i+j at bit 2j); the last byte is zero-padded.
"""

import tensorflow as tf

from keras_blpa.blocks import RELU
from keras_blpa.codes import GAMMA_FLOOR
from keras_blpa.codes import data_window
from keras_blpa.codes import codes_per_byte

__all__ = [
    "RELU6_CAP",
    "activation_forward",
    "batch_spread",
    "bn_act_encode",
    "bn_grad_input",
    "bn_grad_reduce",
    "channel_params",
    "decode",
    "decode_activation",
    "encode",
    "encode_codes",
    "mask_edge",
    "pack",
    "unpack",
]

# relu6's upper breakpoint.
RELU6_CAP = 6.0
# |shift| is bounded where float32 stops holding every integer.
SHIFT_BOUND = float(2**24)

def channel_params(gamma, beta, bits, act=RELU, spread=None):
    """Per-channel quantiser vectors from the BN scale and shift.

    Args:
        act: the block's `keras_blpa.blocks.Activation` (relu6 has its own bins).
        spread: where ``act.follows_data(bits)``, the batch's largest
            |y - beta| / |gamma| per channel (`batch_spread`), which sizes the
            window (`keras_blpa.codes.data_window`); None: ``act.window(bits)``.

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
    width = act.window(bits)
    if spread is not None and act.follows_data(bits):
        width = data_window(tf.cast(spread, tf.float32), tf.math.ceil, tf.clip_by_value,
                            tf.where, tf.math.is_nan)
    step = abs_gamma * (width / levels)
    inv_step = levels / (width * abs_gamma)
    centre = tf.floor(beta / abs_gamma * (levels / width))
    if act.name == "relu6":
        return _relu6_params(gamma, beta, step, inv_step, centre, levels)
    shift = tf.clip_by_value(levels / 2.0 - centre, -SHIFT_BOUND, SHIFT_BOUND)
    shift = tf.where(tf.math.is_nan(shift), levels / 2.0, shift)
    return {
        "inv_step": inv_step,
        "step": step,
        "shift": shift,
        "gamma": gamma,
        "beta": beta,
    }


def batch_spread(y, centre, scale):
    """Per channel (last axis), the largest |y - centre| / scale over the batch:
    `channel_params`' ``spread``. Reduces y in its own dtype (no float32 copy)."""
    axes = list(range(len(y.shape) - 1))
    high = tf.cast(tf.reduce_max(y, axes), tf.float32) - centre
    low = centre - tf.cast(tf.reduce_min(y, axes), tf.float32)
    return tf.maximum(high, low) / scale


def _relu6_params(gamma, beta, step0, inv_step0, centre0, levels):
    """channel_params for relu6: 6 on a bin edge as well as 0 (module docstring)."""
    top = levels - 1.0
    raw0 = tf.clip_by_value(levels / 2.0 - centre0, -SHIFT_BOUND, SHIFT_BOUND)
    shift0 = tf.clip_by_value(raw0, 1.0, top - 1.0)
    shift0 = tf.where(tf.math.is_nan(shift0), levels / 2.0, shift0)
    m = tf.maximum(tf.round(RELU6_CAP / step0), 1.0)
    inside = m <= top - shift0  # 6 lies inside the paper's window (NaN: False)
    above = raw0 < 1.0  # the window lies wholly above 0 (NaN: False)
    resized = inside | above
    step = tf.where(resized, RELU6_CAP / m, step0)
    shift = levels / 2.0 - tf.floor(beta / step)
    # Above 0, shift is not clipped to the window: code 0 alone holds y <= 0,
    # and shift >= 2 - m keeps code 1 for 0 < y < 6 below upper = shift + m.
    shift = tf.where(
        above,
        tf.clip_by_value(shift, 2.0 - m, top - 1.0),
        tf.clip_by_value(shift, 1.0, top - m),
    )
    shift = tf.where(tf.math.is_nan(shift), tf.minimum(levels / 2.0, top - m), shift)
    return {
        # m * (1 / 6), not m / 6: XLA rewrites a division by a constant so (JAX's
        # codes must be these bit for bit).
        "inv_step": tf.where(resized, m * (1.0 / RELU6_CAP), inv_step0),
        "step": step,
        "shift": tf.where(resized, shift, shift0),
        "gamma": gamma,
        "beta": beta,
    }


def _relu6_upper(shift, inverse_step, bits):
    """The code from which y >= 6: ``min(shift + round(6 / step), 2^K - 1)``.

    `inverse_step` is 1 / step (encode has inv_step, decode 1 / step): both
    give the same code (module docstring).
    """
    return tf.minimum(shift + tf.round(RELU6_CAP * inverse_step), float(2**bits - 1))


def mask_edge(shift, bits):
    """The first code of y > 0: ``clip(shift, 1, 2^K - 1)`` (module docstring)."""
    return tf.clip_by_value(shift, 1.0, float(2**bits - 1))


def encode_codes(y, inv_step, shift, bits, act=RELU):
    """K-bit codes (uint8, same shape as y) of the BN output y (channels last)."""
    y = tf.cast(y, tf.float32)
    top = float(2**bits - 1)
    edge = mask_edge(shift, bits)
    t = tf.floor(y * inv_step) + shift
    positive = y > 0.0
    t = tf.where(positive, tf.maximum(t, edge), tf.minimum(t, edge - 1.0))
    if act.name == "relu6":
        upper = _relu6_upper(shift, inv_step, bits)
        t = tf.where(y >= RELU6_CAP, tf.maximum(t, upper), tf.minimum(t, upper - 1.0))
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


def encode(y, inv_step, shift, bits, act=RELU):
    """Packed codes of y: ``pack(encode_codes(y, ...))``."""
    return pack(encode_codes(y, inv_step, shift, bits, act), bits)


def _codes(packed, shape, bits):
    """The codes as float32, shaped `shape`."""
    codes = unpack(packed, tf.reduce_prod(shape), bits)
    return tf.reshape(tf.cast(codes, tf.float32), shape)


def _decoded_y(codes, step, shift, bits):
    """(y_dec, mask): the bin centre kept on its side of 0, and ``code >= edge`` (= y > 0)."""
    mask = codes >= mask_edge(shift, bits)
    centre = (codes + (0.5 - shift)) * step
    return tf.where(mask, tf.maximum(centre, 0.0), tf.minimum(centre, 0.0)), mask


def decode(packed, shape, step, shift, bits):
    """Decoded value of y (the bin centre) and the exact ReLU mask (``y > 0``)."""
    return _decoded_y(_codes(packed, shape, bits), step, shift, bits)


def activation_forward(act, y):
    """f(y) with the TensorFlow ops that Keras' activations use (the same bits)."""
    if act.name == "relu":
        return tf.nn.relu(y)
    if act.name == "relu6":
        return tf.nn.relu6(y)
    if act.name == "leaky_relu":
        return tf.nn.leaky_relu(y, alpha=act.negative_slope)
    if act.name == "linear":
        return y
    if act.name == "silu":
        return tf.nn.silu(y)
    if act.name == "hard_silu":
        return y * (tf.nn.relu6(y + 3.0) / 6.0)
    return tf.nn.gelu(y, approximate=act.name == "gelu_approximate")


def _decoded_output(codes, y_dec, mask, step, shift, bits, act):
    """The activation output rebuilt from the codes (y_dec, mask: `_decoded_y`)."""
    if act.name == "relu":
        return tf.where(mask, y_dec, 0.0)
    if act.name == "relu6":
        upper = _relu6_upper(shift, 1.0 / step, bits)
        return tf.where(codes >= upper, RELU6_CAP, tf.nn.relu(y_dec))
    return activation_forward(act, y_dec)


def _derivative(codes, mask, step, shift, bits, act):
    """f'(y) read back from the codes (module docstring): exact for piecewise-linear f."""
    if act.name in ("relu", "linear", "leaky_relu"):
        slope = 1.0 if act.name == "linear" else act.negative_slope
        return tf.where(mask, 1.0, slope)
    if act.name == "relu6":
        upper = _relu6_upper(shift, 1.0 / step, bits)
        return tf.where(mask & (codes < upper), 1.0, 0.0)
    lo = activation_forward(act, (codes - shift) * step)
    hi = activation_forward(act, (codes + (1.0 - shift)) * step)
    secant = (hi - lo) / step
    return tf.where(codes <= 0.0, 0.0, tf.where(codes >= float(2**bits - 1), 1.0, secant))


# Fused block kernels: the ops the native library replaces one for one. They are
# written to keep few full-size temporaries alive (the pure-TF path is also the
# fallback, and its peak memory matters).


def bn_act_encode(x, scale, offset, inv_step, shift, bits, act=RELU):
    """Forward of BN->activation from the block input: (f(y), packed codes of y).

    y = x * scale + offset, with the BN folded into ``scale = gamma / std`` and
    ``offset = beta - mean * scale`` (the same arithmetic as stock Keras).
    """
    y = tf.cast(x, tf.float32) * scale + offset
    return activation_forward(act, y), encode(y, inv_step, shift, bits, act)


def decode_activation(packed, shape, step, shift, bits, act=RELU):
    """The activation output decoded from the code (ReLU: bin centre where the mask is on, else 0)."""
    codes = _codes(packed, shape, bits)
    y_dec, mask = _decoded_y(codes, step, shift, bits)
    return _decoded_output(codes, y_dec, mask, step, shift, bits, act)


def _act_grad(packed, grad_a, step, shift, bits, act):
    """(dL/dy, y_dec): the incoming gradient times f' read from the code, and decoded y."""
    codes = _codes(packed, tf.shape(grad_a), bits)
    y_dec, mask = _decoded_y(codes, step, shift, bits)
    if act.name == "relu":
        return tf.where(mask, tf.cast(grad_a, tf.float32), 0.0), y_dec
    return tf.cast(grad_a, tf.float32) * _derivative(codes, mask, step, shift, bits, act), y_dec


def bn_grad_reduce(packed, grad_a, step, shift, gamma, beta, bits, act=RELU):
    """Per-channel sums of g and g * x_hat, g = dL/dy = grad_a * f' (BN backward).

    x_hat = (y_dec - beta) / gamma is never materialised:
    sum(g * x_hat) = (sum(g * y_dec) - beta * sum(g)) / gamma.
    """
    grad_y, y_dec = _act_grad(packed, grad_a, step, shift, bits, act)
    axes = list(range(len(grad_a.shape) - 1))
    sum_g = tf.reduce_sum(grad_y, axes)
    sum_gy = tf.reduce_sum(grad_y * y_dec, axes)
    return sum_g, (sum_gy - beta * sum_g) / gamma


def bn_grad_input(
    packed, grad_a, step, shift, gamma, beta, coef, mean_g, mean_gx, bits, act=RELU
):
    """BN input gradient ``coef * (g - mean_g - x_hat * mean_gx)``, g = grad_a * f'.

    Expanded per channel as ``coef * g + a * y_dec + b`` with
    ``a = -coef * mean_gx / gamma`` and ``b = coef * (mean_gx * beta / gamma - mean_g)``.
    """
    grad_y, y_dec = _act_grad(packed, grad_a, step, shift, bits, act)
    a = -coef * mean_gx / gamma
    b = coef * (mean_gx * beta / gamma - mean_g)
    return coef * grad_y + (a * y_dec + b)
