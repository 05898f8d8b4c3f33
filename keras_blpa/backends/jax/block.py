"""The JAX block: a `jax.custom_vjp` with the code in jnp.

The K-bit code is the one of `keras_blpa.backends.tensorflow.reference` (read
its docstring: bins, shift, packing order), written with jnp so that XLA
fuses it; the compressed block is a `jax.custom_vjp` whose residuals are only
the packed codes, the per-channel vectors and the kernels (and one float per
position for normalization "layer"). The backward decodes
the codes, takes the filter and input gradients of the convolutions from the
decoded activation output, then runs the BN backward with dL/dy = dL/da * f'
(f' read from the codes: the ReLU mask for ReLU) and x_hat read from the codes.
The activation itself (forward and decoded output) is `blocks.Activation`'s,
i.e. keras.ops on JAX, what stock Keras gives. Nothing here imports TensorFlow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.blocks import RELU
from keras_blpa.codes import GAMMA_FLOOR
from keras_blpa.codes import data_window
from keras_blpa.codes import codes_per_byte

__all__ = [
    "RELU6_CAP",
    "bn_act_encode",
    "bn_grad_reduce",
    "CHUNK_BYTES",
    "batch_chunks",
    "channel_params",
    "compressed",
    "compressed_block",
    "conv",
    "decode",
    "decode_activation",
    "encode",
    "encode_codes",
    "pack",
    "read",
    "recompute_call",
    "residual_call",
    "unpack",
]


# ---------------------------------------------------------------- the code


# relu6's upper breakpoint.
RELU6_CAP = 6.0
# |shift| is bounded where float32 stops holding every integer (the reference's).
SHIFT_BOUND = float(2**24)


def _clip(t, low, high):
    """``tf.clip_by_value``'s order, ``max(min(t, high), low)`` (jnp.clip's differs when low > high)."""
    return jnp.maximum(jnp.minimum(t, high), low)


def batch_spread(y, centre, scale):
    """Per channel, the largest |y - centre| / scale (as the TensorFlow `reference.batch_spread`)."""
    axes = tuple(range(y.ndim - 1))
    high = jnp.max(y, axes).astype(jnp.float32) - centre
    low = centre - jnp.min(y, axes).astype(jnp.float32)
    return jnp.maximum(high, low) / scale


def channel_params(gamma, beta, bits, act=RELU, spread=None):
    """Per-channel quantiser vectors (as the TensorFlow `reference.channel_params`).

    Args:
        act: the block's `keras_blpa.blocks.Activation` (relu6 has its own bins).
        spread: where ``act.follows_data(bits)``, `batch_spread` per channel.
    """
    gamma = jnp.asarray(gamma, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    levels = float(2**bits)
    gamma = jnp.where(
        gamma >= 0.0, jnp.maximum(gamma, GAMMA_FLOOR), jnp.minimum(gamma, -GAMMA_FLOOR)
    )
    abs_gamma = jnp.abs(gamma)
    width = act.window(bits)
    if spread is not None and act.follows_data(bits):
        width = data_window(jnp.asarray(spread, jnp.float32), jnp.ceil, _clip, jnp.where, jnp.isnan)
    step = abs_gamma * (width / levels)
    inv_step = levels / (width * abs_gamma)
    centre = jnp.floor(beta / abs_gamma * (levels / width))
    if act.name == "relu6":
        return _relu6_params(gamma, beta, step, inv_step, centre, levels)
    shift = _clip(levels / 2.0 - centre, -SHIFT_BOUND, SHIFT_BOUND)
    shift = jnp.where(jnp.isnan(shift), levels / 2.0, shift)
    return {
        "inv_step": inv_step,
        "step": step,
        "shift": shift,
        "gamma": gamma,
        "beta": beta,
    }


def _relu6_params(gamma, beta, step0, inv_step0, centre0, levels):
    """channel_params for relu6: 6 on a bin edge as well as 0 (the reference's docstring)."""
    top = levels - 1.0
    raw0 = _clip(levels / 2.0 - centre0, -SHIFT_BOUND, SHIFT_BOUND)
    shift0 = _clip(raw0, 1.0, top - 1.0)
    shift0 = jnp.where(jnp.isnan(shift0), levels / 2.0, shift0)
    m = jnp.maximum(jnp.round(RELU6_CAP / step0), 1.0)
    inside = m <= top - shift0  # 6 lies inside the paper's window (NaN: False)
    above = raw0 < 1.0  # the window lies wholly above 0 (NaN: False)
    resized = inside | above
    step = jnp.where(resized, RELU6_CAP / m, step0)
    shift = levels / 2.0 - jnp.floor(beta / step)
    shift = jnp.where(above, _clip(shift, 2.0 - m, top - 1.0), _clip(shift, 1.0, top - m))
    shift = jnp.where(jnp.isnan(shift), jnp.minimum(levels / 2.0, top - m), shift)
    return {
        "inv_step": jnp.where(resized, m * (1.0 / RELU6_CAP), inv_step0),  # the reference's
        "step": step,
        "shift": jnp.where(resized, shift, shift0),
        "gamma": gamma,
        "beta": beta,
    }


def _relu6_upper(shift, inverse_step, bits):
    """The code from which y >= 6: ``min(shift + round(6 / step), 2^K - 1)`` (round half to even)."""
    return jnp.minimum(shift + jnp.round(RELU6_CAP * inverse_step), float(2**bits - 1))


def mask_edge(shift, bits):
    """The first code of y > 0: ``clip(shift, 1, 2^K - 1)`` (the reference's docstring)."""
    return _clip(shift, 1.0, float(2**bits - 1))


def encode_codes(y, inv_step, shift, bits, act=RELU):
    """K-bit codes (uint8, shape of y) of the BN output y (channels last)."""
    y = jnp.asarray(y, jnp.float32)
    edge = mask_edge(shift, bits)
    t = jnp.floor(y * inv_step) + shift
    t = jnp.where(y > 0.0, jnp.maximum(t, edge), jnp.minimum(t, edge - 1.0))
    if act.name == "relu6":
        upper = _relu6_upper(shift, inv_step, bits)
        t = jnp.where(y >= RELU6_CAP, jnp.maximum(t, upper), jnp.minimum(t, upper - 1.0))
    t = jnp.clip(t, 0.0, float(2**bits - 1))
    # NaN survives the arithmetic above; it becomes code 0 (inactive).
    return jnp.where(jnp.isnan(t), 0.0, t).astype(jnp.uint8)


def pack(codes, bits):
    """Packs uint8 codes densely into a 1-D uint8 array (reference order)."""
    flat = jnp.ravel(codes).astype(jnp.uint8)
    per = codes_per_byte(bits)
    if per == 1:
        # Written as a reduction into 16-bit words (two codes, little-endian: the
        # same bytes), because XLA fuses a plain elementwise encode into its
        # backward consumers, which then read the float input instead of the codes.
        pairs = jnp.pad(flat, (0, flat.size % 2)).reshape(-1, 2).astype(jnp.uint16)
        words = jnp.sum(pairs << jnp.array([0, 8], jnp.uint16), axis=1, dtype=jnp.uint16)
        return jax.lax.bitcast_convert_type(words, jnp.uint8).reshape(-1)[: flat.size]
    flat = jnp.pad(flat, (0, -flat.size % per)).reshape(-1, per)
    shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)
    # Fields do not overlap: their sum is their bitwise or.
    return jnp.sum(flat << shifts, axis=1, dtype=jnp.uint8)


def unpack(packed, num_elements, bits):
    """Inverse of `pack`: the first `num_elements` codes, 1-D uint8."""
    per = codes_per_byte(bits)
    if per == 1:
        return packed[:num_elements]
    shifts = jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)
    fields = (packed[:, None] >> shifts) & jnp.uint8(2**bits - 1)
    return fields.reshape(-1)[:num_elements]


def encode(y, inv_step, shift, bits, act=RELU):
    """Packed codes of y: ``pack(encode_codes(y, ...))``."""
    return pack(encode_codes(y, inv_step, shift, bits, act), bits)


def _codes(packed, shape, bits):
    """The codes as float32, shaped `shape`."""
    return unpack(packed, int(np.prod(shape)), bits).reshape(shape).astype(jnp.float32)


def _decoded_y(codes, step, shift, bits):
    """(y_dec, mask): the bin centre kept on its side of 0, and ``code >= edge`` (= y > 0)."""
    mask = codes >= mask_edge(shift, bits)
    centre = (codes + (0.5 - shift)) * step
    return jnp.where(mask, jnp.maximum(centre, 0.0), jnp.minimum(centre, 0.0)), mask


def decode(packed, shape, step, shift, bits):
    """Decoded value of y (float32, the bin centre) and the exact ReLU mask ``y > 0``."""
    return _decoded_y(_codes(packed, shape, bits), step, shift, bits)


def _decoded_output(codes, y_dec, mask, step, shift, bits, act):
    """The activation output rebuilt from the codes (y_dec, mask: `_decoded_y`)."""
    if act.name == "relu":
        return jnp.where(mask, y_dec, 0.0)
    if act.name == "relu6":
        upper = _relu6_upper(shift, 1.0 / step, bits)
        return jnp.where(codes >= upper, RELU6_CAP, jax.nn.relu(y_dec))
    return act(y_dec)


def _derivative(codes, mask, step, shift, bits, act):
    """f'(y) read back from the codes, as the reference's: exact for piecewise-linear f,
    the secant of f across the bin for smooth f (0 and 1 in the open end bins)."""
    if act.name in ("relu", "linear", "leaky_relu"):
        slope = 1.0 if act.name == "linear" else act.negative_slope
        return jnp.where(mask, 1.0, slope)
    if act.name == "relu6":
        upper = _relu6_upper(shift, 1.0 / step, bits)
        return jnp.where(mask & (codes < upper), 1.0, 0.0)
    lo = act((codes - shift) * step)
    hi = act((codes + (1.0 - shift)) * step)
    secant = (hi - lo) / step
    return jnp.where(codes <= 0.0, 0.0, jnp.where(codes >= float(2**bits - 1), 1.0, secant))


def decode_activation(packed, shape, step, shift, bits, act=RELU):
    """The activation output decoded from the code (ReLU: bin centre where the mask is on, else 0)."""
    codes = _codes(packed, shape, bits)
    y_dec, mask = _decoded_y(codes, step, shift, bits)
    return _decoded_output(codes, y_dec, mask, step, shift, bits, act)


def _zero_after(t, dtype=jnp.float32):
    """A scalar 0 that XLA cannot fold: it reads `t` (``v > inf`` is false for every float).

    XLA:CPU's fusions take a broadcast constant (relu's 0, a pooling's divisor)
    as a full-size operand, and XLA schedules a constant's broadcast anywhere,
    e.g. at the start of the step: measured, 52 MiB of such broadcasts alive
    through ResNet-164's forward pass at batch 256. A broadcast of this zero is
    made only once `t` exists.
    """
    return (jnp.ravel(t)[0] > jnp.inf).astype(dtype)


def bn_act_encode(x, scale, offset, inv_step, shift, bits, act=RELU):
    """(f(y), packed codes of y) with y = x * scale + offset (folded BN); f(y) is `act`'s (keras.ops;
    relu as ``max(y, 0)`` with a 0 that reads y, the same value, see `_zero_after`)."""
    y = jnp.asarray(x, jnp.float32) * scale + offset
    a = jnp.maximum(y, _zero_after(y)) if act.name == "relu" else act(y)
    return a, encode(y, inv_step, shift, bits, act)


def _act_grad(packed, grad_a, step, shift, bits, act):
    """(dL/dy, y_dec): the incoming gradient times f' read from the code, and decoded y."""
    codes = _codes(packed, grad_a.shape, bits)
    y_dec, mask = _decoded_y(codes, step, shift, bits)
    if act.name == "relu":
        return jnp.where(mask, grad_a.astype(jnp.float32), 0.0), y_dec
    grad_y = grad_a.astype(jnp.float32) * _derivative(codes, mask, step, shift, bits, act)
    return grad_y, y_dec


def bn_grad_reduce(packed, grad_a, step, shift, gamma, beta, bits, act=RELU):
    """(sum g, sum g * x_hat) per channel, g = grad_a * f' and x_hat from the code."""
    g, y_dec = _act_grad(packed, grad_a, step, shift, bits, act)
    axes = tuple(range(grad_a.ndim - 1))
    sum_g = jnp.sum(g, axes)
    return sum_g, (jnp.sum(g * y_dec, axes) - beta * sum_g) / gamma


def _layer_normalise(x, gamma, beta, mean, variance, epsilon):
    """(y, rstd): keras.layers.LayerNormalization's output over the channels, with
    its arithmetic, from the per-position statistics (N, H, W, 1), and rstd =
    rsqrt(variance + epsilon), what the backward keeps besides the code."""
    rstd = jax.lax.rsqrt(variance + epsilon)
    inv = rstd * gamma
    return x * inv + (-mean * inv + beta), rstd


def _layer_norm_backward(packed, d_a, step, shift, gamma, beta, rstd, bits, act):
    """(d_x, d_gamma, d_beta) of LayerNormalization over the channels from the code
    of y = gamma * x_hat + beta (the TensorFlow block's `_layer_norm_backward`):
    g = d_a * f', x_hat = (y_dec - beta) / gamma (|gamma| floored), h = gamma * g,
    ``d_x = rstd * (h - mean_c(h) - x_hat * mean_c(h * x_hat))``.

    gamma, beta and rstd are read after d_a (`_zero_after`): XLA:CPU takes their
    full-size broadcasts as fusion operands and schedules a broadcast of a
    forward value or a weight as early as it can, so each block's broadcast of
    gamma or rstd stayed alive from its forward to its backward (measured: the
    20-unit LayerNorm stack at batch 32 kept 20 such tensors, 160 of 380 MiB)."""
    g, y_dec = _act_grad(_after(d_a, packed), d_a, step, shift, bits, act)
    zero = _zero_after(d_a)  # broadcasts of these are made only in the backward
    gamma, beta, rstd = gamma + zero, beta + zero, rstd + zero
    p_gamma = jnp.where(
        gamma >= 0.0, jnp.maximum(gamma, GAMMA_FLOOR), jnp.minimum(gamma, -GAMMA_FLOOR)
    )
    x_hat = (y_dec - beta) / p_gamma
    axes = tuple(range(d_a.ndim - 1))
    h = gamma * g
    mean_h = jnp.mean(h, -1, keepdims=True)
    mean_hx = jnp.mean(h * x_hat, -1, keepdims=True)
    d_x = rstd * (h - mean_h - x_hat * mean_hx)
    return d_x, jnp.sum(g * x_hat, axes), jnp.sum(g, axes)


# --------------------------------------------------------------- the block


def conv(a, kernel, head):
    """The output of one `blocks.Head` on the NHWC activation `a` (the kernel in
    Keras' shape of its kind), as Keras' JAX backend computes it.

    "conv": HWIO ``conv_general_dilated``; "depthwise": the same with
    ``feature_group_count=C`` and the (kh, kw, C, m) kernel read as HWIO
    (kh, kw, 1, C * m), output channel ``c * m + j`` (Keras' order); "dense":
    ``jnp.matmul`` over the channels (``keras.ops.matmul``).
    """
    if head.kind == "dense":
        return jnp.matmul(a, kernel)
    if head.explicit_padding is not None:
        padding = [tuple(p) for p in head.explicit_padding]
    else:
        padding = head.padding.upper()
    groups = 1
    if head.kind == "depthwise":
        groups = kernel.shape[2]
        kernel = jnp.reshape(kernel, kernel.shape[:2] + (1, groups * kernel.shape[3]))
    return jax.lax.conv_general_dilated(
        a, kernel, head.strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def _after(dependencies, packed):
    """`packed`, read only once `dependencies` (arrays) are computed.

    XLA's scheduler, like TensorFlow's executor, runs a decode that depends only
    on the codes early: in the forward pass, which keeps every block's float
    activation alive (measured here: 1084 MiB for the 30-block stack). XLA:CPU
    removes optimization barriers before scheduling, so the dependency is made
    a data one: or-ing into the codes a flag that is always 0 (``v > inf`` is
    false for every float, NaN included) but that XLA cannot fold away.
    """
    flags = [jnp.ravel(d)[0] > jnp.inf for d in jax.tree_util.tree_leaves(dependencies)]
    return packed | functools.reduce(jnp.logical_or, flags).astype(packed.dtype)


def _first_order_only(values, config):
    """`values` unchanged; differentiating them raises `config.second_order_error()`.

    JAX would differentiate the compressed backward itself, which reads the
    codes, not the activation: a silently wrong second derivative.
    """

    @jax.custom_vjp
    def identity(v):
        return v

    def bwd(_, g):
        raise config.second_order_error()

    identity.defvjp(lambda v: (v, None), bwd)
    return [identity(v) for v in values]


def read(variable):
    """A variable's current value (inside a stateless scope, the scope's value)."""
    return variable.value


def compressed(x, gamma, beta, mean, variance, kernels, config, gate_weights=()):
    """The TensorFlow block's `compressed` on JAX: (list of head outputs, the activation or None).

    ``config.synchronized`` needs no code here: under keras.distribution the
    block runs on one global (sharded) array, so the statistics and the
    backward's sums are over the global batch and XLA inserts the all-reduces.
    """
    result = compressed_block(config)(
        tuple(x.shape), x, gamma, beta, mean, variance, *kernels, *gate_weights
    )
    n = len(kernels)
    return list(result[:n]), (result[-1] if config.with_activation else None)


@functools.lru_cache(maxsize=None)
def compressed_block(config):
    """The compressed training block ``f(x_shape, x, gamma, beta, mean, variance, *kernels,
    *gate_weights)``.

    Args:
        config: a `keras_blpa.blocks.BlockConfig` (hashable: one function each).

    Returns:
        A `jax.custom_vjp` function returning the tuple of head outputs (and the
        activation). Its residuals: packed codes, per-channel vectors, kernels
        (and a squeeze-excite's weights, pooled activation and gate, per
        sample and channel).
        mean and variance get zero gradients (the BN backward includes theirs).
    """
    bits, epsilon, compute_dtype = config.bits, config.epsilon, config.compute_dtype
    specs, act = config.heads, config.activation

    unnormalised = config.normalization == "none"
    layer_norm = config.normalization == "layer"
    se, n = config.squeeze_excite, len(specs)

    def _code_params(x, std, mean, gamma=None, beta=None):
        """channel_params of the code (the TensorFlow block's `_code_params`)."""
        spread = batch_spread(jax.lax.stop_gradient(x), mean, std) if act.follows_data(bits) else None
        return channel_params(std if gamma is None else gamma, mean if beta is None else beta,
                              bits, act, spread=spread)

    def forward(x, gamma, beta, mean, variance, weights):
        kernels, gate_weights = weights[:n], weights[n:]
        extra = None
        if layer_norm:
            # The LN output is coded as is, sized by its per-channel batch statistics
            # (the TensorFlow block's `_layer_normalised` says why).
            x, rstd = _layer_normalise(x, gamma, beta, mean, variance, epsilon)
            scale, offset = jnp.ones_like(gamma), jnp.zeros_like(gamma)
            y = jax.lax.stop_gradient(x)
            code_mean = jnp.mean(y, (0, 1, 2))
            code_variance = jnp.mean(jnp.square(y - code_mean), (0, 1, 2))
            p = _code_params(y, jnp.sqrt(code_variance), code_mean)
            extra = (gamma, beta, rstd)
        elif unnormalised:
            # y = x exactly; the batch statistics size the code (TF block's `_normalisation`).
            scale, offset = jnp.ones_like(mean), jnp.zeros_like(mean)
            p = _code_params(x, jnp.sqrt(variance + epsilon), mean)
        else:
            scale = gamma * jax.lax.rsqrt(variance + epsilon)
            offset = beta - mean * scale
            p = _code_params(x, jnp.sqrt(variance + epsilon), mean, gamma, beta)
        activation, packed = bn_act_encode(
            x, scale, offset, p["inv_step"], p["shift"], bits, act
        )
        if config.naive:
            activation = decode_activation(packed, x.shape, p["step"], p["shift"], bits, act)
        activation = activation.astype(compute_dtype)
        head_in, gate = activation, ()
        if se is not None:
            pooled, s = se.squeeze(activation, gate_weights)
            head_in, gate = se.excite(activation, s), (pooled, s, tuple(gate_weights))
        outs = tuple(conv(head_in, k, h) for k, h in zip(kernels, specs))
        if config.with_activation:
            outs += (activation,)
        vectors = (p["step"], p["shift"], p["gamma"], p["beta"], scale)
        return outs, (packed, vectors, tuple(kernels), gate, extra)

    # x_shape (static) is the only trace of x that the backward keeps.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def block(x_shape, x, gamma, beta, mean, variance, *weights):
        return forward(x, gamma, beta, mean, variance, weights)[0]

    def fwd(x_shape, x, gamma, beta, mean, variance, *weights):
        return forward(x, gamma, beta, mean, variance, weights)

    def bwd(x_shape, residuals, d_results):
        packed, (step, shift, gamma, beta, scale), kernels, gate, extra = residuals
        d_outs = d_results[: len(kernels)]
        d_kernels, d_a = [], jnp.zeros(x_shape, jnp.float32)
        chunks = 1 if se is not None or not kernels else batch_chunks(x_shape, d_outs, bits)
        if chunks > 1:
            d_kernels, d_a = _chunked_heads_backward(
                chunks, x_shape, packed, step, shift, kernels, specs, d_outs,
                d_results[-1] if config.with_activation else None, bits, act, compute_dtype,
            )
        elif kernels:  # (a block without heads returns only its activation)
            # Ordering (a) of the TensorFlow block: decode only once the gradient has arrived.
            a_dec = decode_activation(
                _after(d_outs, packed), x_shape, step, shift, bits, act
            ).astype(compute_dtype)
            head_in = a_dec if se is None else se.excite(a_dec, gate[1])
        for kernel, head, d_out in zip(kernels if chunks == 1 else (), specs, d_outs):
            _, conv_vjp = jax.vjp(lambda a, k, h=head: conv(a, k, h), head_in, kernel)
            d_in, d_kernel = conv_vjp(d_out.astype(compute_dtype))
            d_kernels.append(d_kernel.astype(kernel.dtype))
            d_a = d_a + d_in.astype(jnp.float32)
        if se is not None:
            d_a, d_gate = _gate_backward(se, gate, a_dec, d_a)
            d_kernels += d_gate
        if config.with_activation and chunks == 1:
            d_a = d_a + d_results[-1].astype(jnp.float32)
        zeros = jnp.zeros_like(step)
        if layer_norm:
            d_x, d_gamma, d_beta = _layer_norm_backward(
                packed, d_a, step, shift, *extra, bits, act
            )
            d_x, d_gamma, d_beta, *d_kernels = _first_order_only(
                [d_x, d_gamma, d_beta, *d_kernels], config
            )
            stats = jnp.zeros(x_shape[:-1] + (1,), jnp.float32)
            return (d_x, d_gamma, d_beta, stats, stats, *d_kernels)
        if unnormalised:
            d_x, _ = _act_grad(_after(d_a, packed), d_a, step, shift, bits, act)
            d_x, *d_kernels = _first_order_only([d_x, *d_kernels], config)
            return (d_x, zeros, zeros, zeros, zeros, *d_kernels)
        sum_g, sum_gx = bn_grad_reduce(
            _after(d_a, packed), d_a, step, shift, gamma, beta, bits, act
        )
        count = float(np.prod(x_shape[:-1]))
        mean_g, mean_gx = sum_g / count, sum_gx / count
        # d_x = scale * (g - mean_g - x_hat * mean_gx), g = d_a * f', x_hat = (y_dec - beta) / gamma.
        g, y_dec = _act_grad(_after((sum_g, sum_gx), packed), d_a, step, shift, bits, act)
        d_x = scale * (g - mean_g - (y_dec - beta) / gamma * mean_gx)
        d_x, d_gamma, d_beta, *d_kernels = _first_order_only(
            [d_x, sum_gx, sum_g, *d_kernels], config
        )
        return (d_x, d_gamma, d_beta, zeros, zeros, *d_kernels)

    block.defvjp(fwd, bwd)
    return block


# The heads' backward runs over the batch in chunks where a float32 tensor of the
# block's input or of a head's output would exceed this many bytes (None: never).
CHUNK_BYTES = 8 * 2**20


def batch_chunks(x_shape, d_outs, bits, chunk_bytes=None):
    """How many batch chunks the heads' backward takes (1: the whole batch at once).

    The fewest chunks, a divisor of the batch, for which one chunk's float32
    block input and head outputs each fit `chunk_bytes` (`CHUNK_BYTES`); 1 where
    they fit whole, at 8 bits, where a sample's codes do not fill whole bytes, or under a
    ``keras.distribution`` (not measured there).
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    import keras

    if keras.distribution.distribution() is not None:
        # A sharded global batch: slicing it would gather the shards.
        return 1
    n = x_shape[0]
    per_sample = max([int(np.prod(x_shape[1:]))] + [int(np.prod(d.shape[1:])) for d in d_outs]) * 4
    if chunk_bytes is None or n * per_sample <= chunk_bytes:
        return 1
    if codes_per_byte(bits) == 1 or int(np.prod(x_shape[1:])) % codes_per_byte(bits):
        # 8-bit codes (16-bit words, see `pack`): sliced in the loop, XLA kept them
        # twice (measured: 1476 MiB of codes live vs 760 for ResNet-164, batch 256).
        return 1
    if any(d.shape[0] != n for d in d_outs):
        return 1
    for chunks in range(2, n + 1):
        if n % chunks == 0 and (n // chunks) * per_sample <= chunk_bytes:
            return chunks
    return n


def _chunked_heads_backward(chunks, x_shape, packed, step, shift, kernels, specs, d_outs,
                            d_activation, bits, act, compute_dtype):
    """(d_kernels, dL/da) of the heads, over the batch in `chunks` equal chunks.

    A ``lax.scan``: each step decodes one chunk's codes (a chunk of samples is a
    contiguous run of the packed codes), takes the heads' input and filter
    gradients on it, adds the chunk's dL/da into one full-size buffer (the
    loop carry, updated in place: it starts as the activation's own gradient,
    or zeros) and the filter gradients into float32 sums, in chunk order
    (deterministic). Only one chunk's decoded activation and transposed copies
    are alive at once; the while loop starts only once every incoming gradient
    exists, so no decode runs early.
    """
    n = x_shape[0]
    m = n // chunks
    chunk_shape = (m,) + tuple(x_shape[1:])
    packed_per_chunk = m * int(np.prod(x_shape[1:])) // codes_per_byte(bits)
    # The loop's initial buffers are updated in place, so XLA copies constant ones
    # (zeros), and schedules such copies anywhere, in the forward pass too (measured:
    # every block's float zeros alive at once, 2595 MiB for ResNet-164 at batch 256).
    # A zero that reads an incoming gradient (``v > inf`` is false) is made only then.
    zero = _zero_after(d_outs[0])
    d_a = (jnp.broadcast_to(zero, x_shape) if d_activation is None
           else d_activation.astype(jnp.float32))
    sums = tuple(jnp.broadcast_to(zero, k.shape) for k in kernels)

    def body(carry, i):
        d_a, sums = carry
        p = jax.lax.dynamic_slice_in_dim(packed, i * packed_per_chunk, packed_per_chunk)
        a_dec = decode_activation(p, chunk_shape, step, shift, bits, act).astype(compute_dtype)
        d_a_chunk = jnp.zeros(chunk_shape, jnp.float32)
        new_sums = []
        for kernel, head, d_out, total in zip(kernels, specs, d_outs, sums):
            d_out = jax.lax.dynamic_slice_in_dim(d_out, i * m, m)
            _, conv_vjp = jax.vjp(lambda a, k, h=head: conv(a, k, h), a_dec, kernel)
            d_in, d_kernel = conv_vjp(d_out.astype(compute_dtype))
            new_sums.append(total + d_kernel.astype(jnp.float32))
            d_a_chunk = d_a_chunk + d_in.astype(jnp.float32)
        if d_activation is not None:
            d_a_chunk = d_a_chunk + jax.lax.dynamic_slice_in_dim(d_a, i * m, m)
        d_a = jax.lax.dynamic_update_slice_in_dim(d_a, d_a_chunk, i * m, 0)
        return (d_a, tuple(new_sums)), None

    (d_a, sums), _ = jax.lax.scan(body, (d_a, sums), jnp.arange(chunks))
    return [total.astype(k.dtype) for total, k in zip(sums, kernels)], d_a


def _gate_backward(se, gate, a_dec, d_gated):
    """(dL/da, the squeeze-excite weights' gradients) from the decoded activation
    and dL/d(a * s): the TensorFlow block's `_Gate.backward`."""
    pooled, s, weights = gate
    d_s = jnp.sum(a_dec.astype(jnp.float32) * d_gated, axis=(1, 2))
    _, gate_vjp = jax.vjp(lambda p, w: se(p, w), pooled, weights)
    d_pooled, d_weights = gate_vjp(d_s.astype(s.dtype))
    area = float(a_dec.shape[1] * a_dec.shape[2])
    d_a = d_gated * s.astype(jnp.float32)[:, None, None, :]
    return d_a + (d_pooled.astype(jnp.float32) / area)[:, None, None, :], list(d_weights)


def recompute_call(block, inputs, training):
    """`block(inputs)` as ``block.stateless_call`` under ``jax.checkpoint``.

    The unit's variable values are explicit arguments and the new moving
    statistics are assigned after the checkpointed function returns, so they
    are updated once, as without the wrapper (and no tracer escapes ``jax.jit``).
    """

    def forward(x, trainable, non_trainable):
        return block.stateless_call(trainable, non_trainable, x, training=training)

    outputs, non_trainable = jax.checkpoint(forward)(
        inputs,
        [v.value for v in block.trainable_variables],
        [v.value for v in block.non_trainable_variables],
    )
    for variable, value in zip(block.non_trainable_variables, non_trainable):
        variable.assign(value)
    return outputs


def residual_call(x, shortcut, stride, padding, extra):
    """ResidualBuffer.call on JAX: ``x + adapt(shortcut)``.

    Average pooling and channel padding are linear, so JAX's own backward keeps
    no activation of them.
    """
    s = shortcut
    if stride > 1:
        window = (1, stride, stride, 1)
        s = jax.lax.reduce_window(s, 0.0, jax.lax.add, window, window, padding)
        # Divisors that read the data (the same values), so that XLA makes no
        # full-size constant of them early in the step (block.`_zero_after`).
        zero = _zero_after(s, s.dtype)
        if padding == "VALID":
            s = s / (float(stride * stride) + zero)
        else:
            ones = jnp.ones((1,) + shortcut.shape[1:3] + (1,), s.dtype) + zero
            s = s / jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, window, padding)
    if extra:
        s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x + s.astype(x.dtype)

