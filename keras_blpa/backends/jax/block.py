"""The JAX block: a `jax.custom_vjp` with the code in jnp.

The K-bit code is the one of `keras_blpa.backends.tensorflow.reference` (read
its docstring: bins, shift, packing order), written with jnp so that XLA
fuses it; the compressed block is a `jax.custom_vjp` whose residuals are only
the packed codes, the per-channel vectors and the kernels. The backward decodes
the codes, takes the filter and input gradients of the convolutions from the
decoded ReLU output, then runs the BN backward with the ReLU mask and x_hat read
from the codes. Nothing here imports TensorFlow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.codes import GAMMA_FLOOR
from keras_blpa.codes import codes_per_byte

__all__ = [
    "bn_grad_reduce",
    "bn_relu_encode",
    "channel_params",
    "compressed",
    "compressed_block",
    "conv",
    "decode",
    "decode_relu",
    "encode",
    "encode_codes",
    "pack",
    "read",
    "recompute_call",
    "residual_call",
    "unpack",
]


# ---------------------------------------------------------------- the code


def channel_params(gamma, beta, bits):
    """Per-channel quantiser vectors (as the TensorFlow `reference.channel_params`)."""
    gamma = jnp.asarray(gamma, jnp.float32)
    beta = jnp.asarray(beta, jnp.float32)
    levels = float(2**bits)
    gamma = jnp.where(
        gamma >= 0.0, jnp.maximum(gamma, GAMMA_FLOOR), jnp.minimum(gamma, -GAMMA_FLOOR)
    )
    abs_gamma = jnp.abs(gamma)
    centre = jnp.floor(beta / abs_gamma * (levels / 6.0))
    shift = jnp.clip(levels / 2.0 - centre, 1.0, levels - 1.0)
    shift = jnp.where(jnp.isnan(shift), levels / 2.0, shift)
    return {
        "inv_step": levels / (6.0 * abs_gamma),
        "step": abs_gamma * (6.0 / levels),
        "shift": shift,
        "gamma": gamma,
        "beta": beta,
    }


def encode_codes(y, inv_step, shift, bits):
    """K-bit codes (uint8, shape of y) of the BN output y (channels last)."""
    y = jnp.asarray(y, jnp.float32)
    t = jnp.floor(y * inv_step) + shift
    t = jnp.where(y > 0.0, jnp.maximum(t, shift), jnp.minimum(t, shift - 1.0))
    t = jnp.clip(t, 0.0, float(2**bits - 1))
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


def encode(y, inv_step, shift, bits):
    """Packed codes of y."""
    return pack(encode_codes(y, inv_step, shift, bits), bits)


def decode(packed, shape, step, shift, bits):
    """Bin-centre value of y (float32) and the exact ReLU mask ``y > 0``."""
    codes = unpack(packed, int(np.prod(shape)), bits).reshape(shape)
    y_dec = (codes.astype(jnp.float32) + (0.5 - shift)) * step
    return y_dec, y_dec > 0.0


def decode_relu(packed, shape, step, shift, bits):
    """Decoded ReLU output: bin centre where the mask is on, else 0."""
    return jax.nn.relu(decode(packed, shape, step, shift, bits)[0])


def bn_relu_encode(x, scale, offset, inv_step, shift, bits):
    """(relu(y), packed codes of y) with y = x * scale + offset (folded BN)."""
    y = jnp.asarray(x, jnp.float32) * scale + offset
    return jax.nn.relu(y), encode(y, inv_step, shift, bits)


def bn_grad_reduce(packed, grad_a, step, shift, gamma, beta, bits):
    """(sum g, sum g * x_hat) per channel, g = grad_a * mask, x_hat from the code."""
    y_dec, mask = decode(packed, grad_a.shape, step, shift, bits)
    g = jnp.where(mask, grad_a.astype(jnp.float32), 0.0)
    axes = tuple(range(grad_a.ndim - 1))
    sum_g = jnp.sum(g, axes)
    return sum_g, (jnp.sum(g * y_dec, axes) - beta * sum_g) / gamma


# --------------------------------------------------------------- the block


def conv(a, kernel, head):
    """NHWC x HWIO convolution of one `blocks.Head`."""
    if head.explicit_padding is not None:
        padding = [tuple(p) for p in head.explicit_padding]
    else:
        padding = head.padding.upper()
    return jax.lax.conv_general_dilated(
        a, kernel, head.strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
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


def compressed(x, gamma, beta, mean, variance, kernels, config):
    """The TensorFlow block's `compressed` on JAX: (list of head outputs, the activation or None).

    ``config.synchronized`` needs no code here: under keras.distribution the
    block runs on one global (sharded) array, so the statistics and the
    backward's sums are over the global batch and XLA inserts the all-reduces.
    """
    result = compressed_block(config)(tuple(x.shape), x, gamma, beta, mean, variance, *kernels)
    n = len(kernels)
    return list(result[:n]), (result[-1] if config.with_activation else None)


@functools.lru_cache(maxsize=None)
def compressed_block(config):
    """The compressed training block ``f(x_shape, x, gamma, beta, mean, variance, *kernels)``.

    Args:
        config: a `keras_blpa.blocks.BlockConfig` (hashable: one function each).

    Returns:
        A `jax.custom_vjp` function returning the tuple of head outputs (and the
        activation). Its residuals: packed codes, per-channel vectors, kernels.
        mean and variance get zero gradients (the BN backward includes theirs).
    """
    bits, epsilon, compute_dtype = config.bits, config.epsilon, config.compute_dtype
    specs = config.heads

    def forward(x, gamma, beta, mean, variance, kernels):
        scale = gamma * jax.lax.rsqrt(variance + epsilon)
        p = channel_params(gamma, beta, bits)
        activation, packed = bn_relu_encode(
            x, scale, beta - mean * scale, p["inv_step"], p["shift"], bits
        )
        if config.naive:
            activation = decode_relu(packed, x.shape, p["step"], p["shift"], bits)
        activation = activation.astype(compute_dtype)
        outs = tuple(conv(activation, k, h) for k, h in zip(kernels, specs))
        if config.with_activation:
            outs += (activation,)
        vectors = (p["step"], p["shift"], p["gamma"], p["beta"], scale)
        return outs, (packed, vectors, tuple(kernels))

    # x_shape (static) is the only trace of x that the backward keeps.
    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def block(x_shape, x, gamma, beta, mean, variance, *kernels):
        return forward(x, gamma, beta, mean, variance, kernels)[0]

    def fwd(x_shape, x, gamma, beta, mean, variance, *kernels):
        return forward(x, gamma, beta, mean, variance, kernels)

    def bwd(x_shape, residuals, d_results):
        packed, (step, shift, gamma, beta, scale), kernels = residuals
        d_outs = d_results[: len(kernels)]
        # Ordering (a) of the TensorFlow block: decode only once the gradient has arrived.
        a_dec = decode_relu(_after(d_outs, packed), x_shape, step, shift, bits).astype(compute_dtype)
        d_kernels, d_a = [], jnp.zeros(x_shape, jnp.float32)
        for kernel, head, d_out in zip(kernels, specs, d_outs):
            _, conv_vjp = jax.vjp(lambda a, k, h=head: conv(a, k, h), a_dec, kernel)
            d_in, d_kernel = conv_vjp(d_out.astype(compute_dtype))
            d_kernels.append(d_kernel.astype(kernel.dtype))
            d_a = d_a + d_in.astype(jnp.float32)
        if config.with_activation:
            d_a = d_a + d_results[-1].astype(jnp.float32)
        sum_g, sum_gx = bn_grad_reduce(_after(d_a, packed), d_a, step, shift, gamma, beta, bits)
        count = float(np.prod(x_shape[:-1]))
        mean_g, mean_gx = sum_g / count, sum_gx / count
        # d_x = scale * (g - mean_g - x_hat * mean_gx), x_hat = (y_dec - beta) / gamma.
        y_dec, mask = decode(_after((sum_g, sum_gx), packed), x_shape, step, shift, bits)
        g = jnp.where(mask, d_a, 0.0)
        d_x = scale * (g - mean_g - (y_dec - beta) / gamma * mean_gx)
        zeros = jnp.zeros_like(step)
        d_x, d_gamma, d_beta, *d_kernels = _first_order_only(
            [d_x, sum_gx, sum_g, *d_kernels], config
        )
        return (d_x, d_gamma, d_beta, zeros, zeros, *d_kernels)

    block.defvjp(fwd, bwd)
    return block


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
        if padding == "VALID":
            s = s / float(stride * stride)
        else:
            ones = jnp.ones((1,) + shortcut.shape[1:3] + (1,), s.dtype)
            s = s / jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, window, padding)
    if extra:
        s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return x + s.astype(x.dtype)

