"""The TensorFlow block: a ``tf.custom_gradient`` around the fused ops (`fused.ops()`).

The fused ops are the native library's (ops/, cc/) when it loads, else the
pure-TF `reference`; both have the same functions and signatures.

The compressed backward runs as named steps: decode the code once the incoming
gradient exists, the filter gradient from the decoded activation output
(`_conv_backward`), the input gradient through the kernel, then the
activation's derivative and the BN backward from the code (`_bn_act_backward`).

Memory ordering. Inside `tf.function`, TensorFlow's executor runs an op as soon
as its inputs exist; the peak memory, not the stored bytes, is what counts, so
the block pins the order of a few ops:

(a) Each decode waits for its incoming gradient (`_Code.read_after`). A decode
    that depends only on the codes would run at the start of backprop for every
    block at once and re-materialise all float activations (a 20-block stack
    peaked at 1068 MiB that way, 156 MiB with the ordering; stock Keras 688 MiB).
    For the same reason each full-size backward temporary waits for the one
    before it, so that one block's float temporaries exist at a time; where
    the decoded activation would exceed `CHUNK_BYTES`, the filter gradients
    decode it a chunk of samples at a time (`_chunked_kernel_gradients`).
(b) The forward conv waits for the codes, so that the packing is not deferred
    while the float pre-activation stays alive.
(c) The activation is returned only when the caller uses it
    (``with_activation=True``): for an unused custom-gradient output the tape
    makes ``zeros_like(activation)`` and keeps the float activation alive until
    the backward pass.
"""

import tensorflow as tf

from keras_blpa.backends.tensorflow import fused
from keras_blpa.backends.tensorflow import reference
from keras_blpa.blocks import Activation
from keras_blpa.codes import GAMMA_FLOOR
from keras_blpa.codes import codes_per_byte

__all__ = ["CHUNK_BYTES", "batch_chunks", "compressed", "conv", "read", "recompute_call",
           "residual_call"]

# The heads' filter gradients run over the batch in chunks where a float32 tensor
# of the block's input or of a head's output would exceed this many bytes (None:
# never), so that the decoded activation is never made whole at large batches.
CHUNK_BYTES = 8 * 2**20


def read(variable):
    """A variable's current value as a tensor (tf.custom_gradient takes tensors, not variables)."""
    return tf.convert_to_tensor(variable)


def _same_padding(head):
    """True when a folded ZeroPadding2D is exactly the padding "SAME" gives: stride 1
    and (k - 1) // 2 before, the rest after, on each axis (whatever the input size)."""
    if head.explicit_padding is None or any(s != 1 for s in head.strides):
        return False
    return all(
        tuple(pad) == ((k - 1) // 2, k - 1 - (k - 1) // 2)
        for pad, k in zip(head.explicit_padding, head.kernel_size)
    )


def _conv_args(head, backward=False):
    """Keyword arguments of the raw ops of a `blocks.Head`: Conv2D / Conv2DBackprop*,
    DepthwiseConv2dNative / DepthwiseConv2dNativeBackprop* (both take explicit
    paddings, so a folded ZeroPadding2D makes no padded copy); {} for "dense".
    For the backward ops (``backward=True``), a folded padding that equals "SAME"
    is passed as "SAME": TensorFlow's CPU Conv2DBackpropInput with "EXPLICIT"
    padding takes a slow path (ResNet50V2's 3x3 heads at 2x2 x 512, batch 16:
    319 ms, against 8 ms with "SAME"). The forward conv keeps "EXPLICIT", whose
    output is bit-identical to stock Keras' ZeroPadding2D -> "valid" conv."""
    if head.kind == "dense":
        return {}
    args = {"strides": (1,) + head.strides + (1,)}
    if head.explicit_padding is None:
        args["padding"] = head.padding.upper()
    elif backward and _same_padding(head):
        args["padding"] = "SAME"
    else:
        (top, bottom), (left, right) = head.explicit_padding
        args["padding"] = "EXPLICIT"
        args["explicit_paddings"] = [0, 0, top, bottom, left, right, 0, 0]
    return args


def conv(a, kernel, head):
    """The output of one `blocks.Head` on the NHWC activation `a` (the kernel in
    Keras' shape of its kind), with the op stock Keras uses: Conv2D,
    DepthwiseConv2dNative (``tf.nn.depthwise_conv2d`` at dilation 1) or
    ``tf.tensordot`` over the channels (``keras.ops.matmul``, i.e. Dense)."""
    if head.kind == "dense":
        return tf.tensordot(a, kernel, axes=[[-1], [0]])
    op = tf.raw_ops.DepthwiseConv2dNative if head.kind == "depthwise" else tf.raw_ops.Conv2D
    return op(input=a, filter=kernel, **_conv_args(head))


def _kernel_gradient(a, kernel, d_out, head):
    """dL/dkernel of `conv` from the (decoded) activation `a`."""
    if head.kind == "dense":
        channels, units = kernel.shape[0], kernel.shape[1]
        return tf.matmul(
            tf.reshape(a, [-1, channels]), tf.reshape(d_out, [-1, units]), transpose_a=True
        )
    if head.kind == "depthwise":
        op = tf.raw_ops.DepthwiseConv2dNativeBackpropFilter
    else:
        op = tf.raw_ops.Conv2DBackpropFilter
    return op(input=a, filter_sizes=tf.shape(kernel), out_backprop=d_out,
              **_conv_args(head, backward=True))


def _input_gradient(a_shape, kernel, d_out, head):
    """dL/da of `conv`, which needs only the kernel. Any other explicit padding
    (a stride-2 head's) is the gradient of the VALID conv of the padded input,
    cropped: TensorFlow's CPU backprop-input op is slow with "EXPLICIT" padding
    (ResNet50V2's 3x3 stride-2 heads at 4x4 x 256, batch 16: 19.6 ms, 2.9 ms this way)."""
    if head.kind == "dense":
        d = tf.matmul(tf.reshape(d_out, [-1, kernel.shape[1]]), kernel, transpose_b=True)
        return tf.reshape(d, a_shape)
    if head.kind == "depthwise":
        op = tf.raw_ops.DepthwiseConv2dNativeBackpropInput
    else:
        op = tf.raw_ops.Conv2DBackpropInput
    args = _conv_args(head, backward=True)
    if args["padding"] != "EXPLICIT":
        return op(input_sizes=a_shape, filter=kernel, out_backprop=d_out, **args)
    (top, bottom), (left, right) = head.explicit_padding
    a_shape = tf.convert_to_tensor(a_shape, tf.int32)
    padded = a_shape + tf.constant([0, top + bottom, left + right, 0], tf.int32)
    d = op(input_sizes=padded, filter=kernel, out_backprop=d_out,
           strides=args["strides"], padding="VALID")
    return tf.slice(d, [0, top, left, 0], a_shape)


def _after(dependencies, tensor):
    """`tensor`, read only once `dependencies` are computed (orders the executor)."""
    with tf.control_dependencies(dependencies):
        return tf.identity(tensor)


def _first_order_only(tensors, config):
    """`tensors` (identities) whose own gradient raises `config.second_order_error()`.

    The compressed backward is not differentiable (it reads the codes; the
    native ops have no gradient and the pure-TF ones would give a wrong one),
    so a tape that records it, for a gradient of a gradient, refuses here.
    """

    @tf.custom_gradient
    def identity(*values):
        def grad(*_):
            raise config.second_order_error()

        return [tf.identity(v) for v in values], grad

    return identity(*tensors)


def _cross_replica_sum(values, synchronized):
    """All-reduces (sums) a list of tensors across replicas when synchronized."""
    ctx = tf.distribute.get_replica_context()
    if not synchronized or ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


class _Code:
    """The packed K-bit code of one block and what decoding it needs."""

    def __init__(self, ops, packed, shape, params, bits, act, static_shape=None):
        self.ops, self.packed, self.shape = ops, packed, shape
        self.params, self.bits, self.act = params, bits, act
        self.static_shape = tf.TensorShape(static_shape)

    def read_after(self, dependencies):
        """The packed code, read only once `dependencies` exist (ordering (a))."""
        return _after(dependencies, self.packed)

    def decode_activation(self, dependencies):
        """The decoded activation output (float32), computed after `dependencies`."""
        return self._decode(self.read_after(dependencies), self.shape)

    def _decode(self, packed, shape):
        p = self.params
        return self.ops.decode_activation(packed, shape, p["step"], p["shift"], self.bits, self.act)

    def decode_chunks(self, sizes):
        """Functions that decode the batch chunks of `sizes` samples: the i-th,
        called with a list of dependencies, decodes chunk i once they exist. A
        chunk of samples is a contiguous run of the packed codes (`batch_chunks`
        checks that it fills whole bytes)."""
        per_sample = self.static_shape[1:].num_elements() // codes_per_byte(self.bits)
        # Slices, not tf.split: Grappler hoists the ordering identities above a
        # Split, with every chunk's control inputs, which makes a cycle.
        starts = [sum(sizes[:i]) * per_sample for i in range(len(sizes))]
        parts = [self.packed[b:b + m * per_sample] for b, m in zip(starts, sizes)]
        rest = self.static_shape[1:].as_list()
        return [
            lambda dependencies, m=m, part=part: self._decode(_after(dependencies, part), [m] + rest)
            for m, part in zip(sizes, parts)
        ]


def batch_chunks(x_shape, d_outs, bits, chunk_bytes=None):
    """Samples per chunk of the heads' filter gradients (`_chunked_kernel_gradients`),
    or None for the whole batch at once.

    The most samples whose float32 block input and head outputs each fit
    `chunk_bytes` (`CHUNK_BYTES`); the last chunk takes the rest (the JAX
    block's scan needs equal chunks, a divisor of the batch; these are unrolled). None where everything fits whole, where the batch or a sample's size
    is not static, or where a sample's codes do not fill whole bytes.
    """
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    shapes = [tf.TensorShape(x_shape)] + [d.shape for d in d_outs]
    if chunk_bytes is None or not all(s.is_fully_defined() for s in shapes):
        return None
    n = shapes[0][0]
    if any(s[0] != n for s in shapes) or shapes[0][1:].num_elements() % codes_per_byte(bits):
        return None
    per_sample = 4 * max(s[1:].num_elements() for s in shapes)
    if n * per_sample <= chunk_bytes:
        return None
    m = max(1, chunk_bytes // per_sample)
    return [m] * (n // m) + ([n % m] if n % m else [])


def _conv_backward(code, kernels, d_outs, heads, gate=None):
    """(d_kernels, d_activation, d_gate_weights) of the heads ``conv(head_in, kernel_i, head_i)``.

    ``head_in`` is the activation, or with a squeeze-excite `_Gate` the gated
    ``a * s``. The decode waits for the incoming gradients; the filter
    gradients (Conv2D, depthwise or dense alike) read the decoded head input,
    then the input gradients (which need only the kernels) wait for them, so
    that the decoded tensor is released before the next full-size temporaries
    are made (with a gate the decoded activation stays until dL/ds is summed).
    """
    sizes = None if gate is not None else batch_chunks(code.static_shape, d_outs, code.bits)
    if sizes is not None:
        d_kernels = _chunked_kernel_gradients(code, kernels, d_outs, heads, sizes)
    else:
        a_dec = code.decode_activation(list(d_outs))
        head_in = a_dec if gate is None else gate.excite(a_dec)
        d_kernels = [
            _kernel_gradient(tf.cast(head_in, d_out.dtype), kernel, d_out, head)
            for kernel, d_out, head in zip(kernels, d_outs, heads)
        ]
    d_a = None
    with tf.control_dependencies(d_kernels):
        for kernel, d_out, head in zip(kernels, d_outs, heads):
            d = tf.cast(_input_gradient(code.shape, kernel, d_out, head), tf.float32)
            d_a = d if d_a is None else d_a + d
    if gate is None:
        return d_kernels, d_a, []
    d_a, d_gate_weights = gate.backward(a_dec, d_a)
    return d_kernels, d_a, d_gate_weights


def _chunked_kernel_gradients(code, kernels, d_outs, heads, sizes):
    """The heads' filter gradients over the batch in chunks of `sizes` samples.

    Each chunk's decode waits for the previous chunk's filter gradients (the
    first for every incoming gradient), so one chunk of decoded floats is alive
    at a time; the incoming gradients are split along the batch (``tf.split``
    on axis 0 shares their buffers). The filter gradients are summed in float32,
    in chunk order (deterministic).
    """
    d_out_chunks = [tf.split(d_out, sizes) for d_out in d_outs]
    totals, done = [None] * len(kernels), list(d_outs)
    for i, decode in enumerate(code.decode_chunks(sizes)):
        a = decode(done)
        grads = [
            tf.cast(_kernel_gradient(tf.cast(a, parts[i].dtype), kernel, parts[i], head), tf.float32)
            for kernel, parts, head in zip(kernels, d_out_chunks, heads)
        ]
        totals = [g if t is None else t + g for t, g in zip(totals, grads)]
        done = grads
    return [tf.cast(t, k.dtype) for t, k in zip(totals, kernels)]


class _Gate:
    """A block's squeeze-excite (`blocks.SqueezeExcite`): what its backward keeps
    (the pooled activation and the gate s, per sample and channel; the weights)."""

    def __init__(self, config, activation, weights):
        self.se, self.weights = config, list(weights)
        self.pooled, self.s = config.squeeze(activation, self.weights)

    def excite(self, a):
        return self.se.excite(a, tf.cast(self.s, a.dtype))

    def backward(self, a_dec, d_gated):
        """(dL/da, the weights' gradients) from the decoded activation and dL/d(a * s).

        dL/ds = sum_hw(a * dL/d(a * s)); the gate's own backward (on vectors)
        is autodiff's, from the pooled activation kept in the forward; its
        pooled gradient reaches a as ``dL/dpooled / (H * W)`` everywhere.
        """
        d_s = tf.reduce_sum(a_dec * d_gated, axis=[1, 2])
        with tf.GradientTape() as tape:
            tape.watch([self.pooled] + self.weights)
            s = self.se(self.pooled, self.weights)
        d_pooled, *d_weights = tape.gradient(
            s, [self.pooled] + self.weights, output_gradients=tf.cast(d_s, s.dtype)
        )
        area = tf.cast(tf.reduce_prod(tf.shape(a_dec)[1:3]), tf.float32)
        d_pooled = tf.cast(d_pooled, tf.float32) / area
        d_a = d_gated * tf.cast(self.s, tf.float32)[:, None, None, :]
        return d_a + d_pooled[:, None, None, :], d_weights


def _bn_act_backward(code, d_a, beta, scale, synchronized):
    """(d_x, d_gamma, d_beta) from the gradient of the activation output.

    The activation's derivative and the normalised input come from the code; the two
    per-channel sums are all-reduced across replicas when `synchronized`
    (d_gamma and d_beta stay per-replica: the optimizer sums them). The native
    `bn_grad_input` writes d_x into d_a's buffer when d_a has no other reader,
    so the block's input gradient costs no new full-size tensor.
    """
    p, bits, ops, act = code.params, code.bits, code.ops, code.act
    sum_g, sum_gx = ops.bn_grad_reduce(
        code.read_after([d_a]), d_a, p["step"], p["shift"], p["gamma"], beta, bits, act
    )
    d_gamma, d_beta = sum_gx, sum_g
    count = tf.cast(tf.reduce_prod(code.shape[:-1]), tf.float32)
    sum_g, sum_gx, count = _cross_replica_sum([sum_g, sum_gx, count], synchronized)
    d_x = ops.bn_grad_input(
        code.read_after([sum_g, sum_gx]),
        d_a,
        p["step"],
        p["shift"],
        p["gamma"],
        beta,
        scale,
        sum_g / count,
        sum_gx / count,
        bits,
        act,
    )
    return d_x, d_gamma, d_beta


def _unnormalised_backward(code, d_a, ones):
    """d_x = dL/dy for normalization "none" (y = x): the fused BN input
    gradient with coef 1 and zero means is exactly ``g``."""
    p, zeros = code.params, tf.zeros_like(ones)
    return code.ops.bn_grad_input(
        code.read_after([d_a]), d_a, p["step"], p["shift"], p["gamma"], p["beta"],
        ones, zeros, zeros, code.bits, code.act,
    )


# Decodes the code's y itself (the bin centre on its side of 0), whatever the
# block's activation: every activation's code shares this y decode.
_LINEAR = Activation("linear")


def _layer_normalised(x, gamma, beta, mean, variance, params, config):
    """(y, rstd, code params) of normalization "layer", else (x, None, params).

    y is keras.layers.LayerNormalization's output over the channels, with its
    arithmetic (``inv = rsqrt(variance + epsilon) * gamma``, ``y = x * inv +
    (-mean * inv + beta)``), from the per-position mean and variance (N, H, W, 1);
    rstd = rsqrt(variance + epsilon), one float per position, is what the
    backward keeps besides the code (the mean is not needed: x_hat comes from
    the code).

    The code of y is sized per channel by y's batch mean and standard deviation,
    as for "none", not by gamma and beta as BN's: x_hat is standardised per
    position, not per channel, so a channel's x_hat may spread over much less
    than BN's [-3, 3] window (or lie off-centre), and gamma-sized bins would
    waste the resolution that LN's x_hat terms need. Every breakpoint stays a
    bin edge (the code is of y).
    """
    if config.normalization != "layer":
        return x, None, params
    rstd = tf.math.rsqrt(variance + config.epsilon)
    inv = rstd * gamma
    y = x * inv + (-mean * inv + beta)
    y_const = tf.stop_gradient(y)
    code_mean, code_variance = tf.nn.moments(y_const, [0, 1, 2])
    params = _code_params(y_const, tf.sqrt(code_variance), code_mean, config)
    return y, rstd, params


def _layer_norm_backward(code, d_a, gamma, beta, rstd):
    """(d_x, d_gamma, d_beta) of y = gamma * x_hat + beta, x_hat = (x - mean_p) * rstd_p,
    LayerNormalization over the channels of each position p.

    With g = dL/dy (the incoming gradient times f' read from the code) and
    x_hat decoded as (y_dec - beta) / gamma, the per-channel sums are BN's:
    ``d_gamma = sum_p g * x_hat``, ``d_beta = sum_p g`` (exact for
    piecewise-linear activations); the input gradient is BN's with the roles
    of the axes swapped, means over the C channels of each position:
    ``d_x = rstd_p * (h - mean_c(h) - x_hat * mean_c(h * x_hat))``, h = gamma * g
    (differentiating x_hat through mean_p and rstd_p gives the two mean terms).
    The fused ops give the sums (`bn_grad_reduce`), h (`bn_grad_input` with coef
    gamma and zero means) and y_dec (`decode_activation`, linear); each
    full-size temporary waits for the one before it (ordering (a)).
    """
    p, ops, bits, act = code.params, code.ops, code.bits, code.act
    step, shift = p["step"], p["shift"]
    # x_hat = (y_dec - beta) / gamma, |gamma| floored as the code's.
    p_gamma = tf.where(gamma >= 0.0, tf.maximum(gamma, GAMMA_FLOOR), tf.minimum(gamma, -GAMMA_FLOOR))
    d_beta, d_gamma = ops.bn_grad_reduce(
        code.read_after([d_a]), d_a, step, shift, p_gamma, beta, bits, act
    )
    zeros = tf.zeros_like(gamma)
    h = ops.bn_grad_input(
        code.read_after([d_beta, d_gamma]), d_a, step, shift, p_gamma, beta,
        gamma, zeros, zeros, bits, act,
    )
    y_dec = ops.decode_activation(code.read_after([h]), code.shape, step, shift, bits, _LINEAR)
    x_hat = (y_dec - beta) / p_gamma
    mean_h = tf.reduce_mean(h, -1, keepdims=True)
    mean_hx = tf.reduce_mean(h * x_hat, -1, keepdims=True)
    d_x = rstd * (h - mean_h - x_hat * mean_hx)
    return d_x, d_gamma, d_beta


def _code_params(x, std, mean, config, gamma=None, beta=None):
    """`fused.channel_params` of the block's code: sized by `gamma` and `beta`
    (default: the batch's `std` and `mean`), and where the activation's code
    follows the batch (`blocks.Activation.follows_data`), by x's largest
    distance from `mean` in units of `std` (the same in y's units of |gamma|)."""
    act, bits = config.activation, config.bits
    spread = reference.batch_spread(x, mean, std) if act.follows_data(bits) else None
    gamma = std if gamma is None else gamma
    beta = mean if beta is None else beta
    return fused.channel_params(gamma, beta, bits, act, spread=spread)


def _normalisation(x, gamma, beta, mean, variance, config):
    """(scale, offset, code params) of the block's y = x * scale + offset.

    "batch": BN folded (gamma / std, beta - mean * scale), the code sized by
    gamma and beta. "none": y = x exactly (scale 1, offset 0), the code sized by
    the batch statistics as if they were gamma (std) and beta (mean). "layer":
    the LN output y is made after (`_layer_normalised`, which sizes its code)
    and coded as is (scale 1, offset 0).
    """
    if config.normalization == "layer":
        return tf.ones_like(gamma), tf.zeros_like(gamma), None
    std = tf.sqrt(variance + config.epsilon)
    if config.normalization == "none":
        return tf.ones_like(mean), tf.zeros_like(mean), _code_params(x, std, mean, config)
    scale = gamma * tf.math.rsqrt(variance + config.epsilon)
    params = _code_params(x, std, mean, config, gamma, beta)
    return scale, beta - mean * scale, params


def compressed(x, gamma, beta, mean, variance, kernels, config, gate_weights=()):
    """The training forward of ApproxConvBlock whose backward reads only the packed codes.

    Args:
        x: the block input (float32); gamma, beta: BN vectors; mean, variance:
            the batch statistics (for "batch", their gradients are part of
            the BN backward; for "none", they only size the code); for
            "layer", LayerNormalization's per-position statistics (N, H, W, 1),
            whose gradients are part of the LN backward.
        kernels: one conv kernel per head, in ``config.compute_dtype``.
        config: a `keras_blpa.blocks.BlockConfig`.
        gate_weights: the squeeze-excite's weights (``config.squeeze_excite``),
            in the compute dtype.

    Returns:
        (list of head outputs, the activation or None).
    """
    ops = fused.ops()
    bits, act = config.bits, config.activation
    n = len(kernels)

    @tf.custom_gradient
    def block(x, gamma, beta, mean, variance, *weights):
        kernels, gate_weights = weights[:n], weights[n:]
        scale, offset, p = _normalisation(x, gamma, beta, mean, variance, config)
        pre, rstd, p = _layer_normalised(x, gamma, beta, mean, variance, p, config)
        x_shape = tf.shape(x)
        activation, packed = ops.bn_act_encode(
            pre, scale, offset, p["inv_step"], p["shift"], bits, act
        )
        if config.naive:
            activation = ops.decode_activation(packed, x_shape, p["step"], p["shift"], bits, act)
        activation = tf.cast(activation, config.compute_dtype)
        gate = None
        head_in = activation
        if config.squeeze_excite is not None:
            gate = _Gate(config.squeeze_excite, activation, gate_weights)
            head_in = gate.excite(activation)
        with tf.control_dependencies([packed]):  # ordering (b)
            outs = [conv(head_in, k, head) for k, head in zip(kernels, config.heads)]
        code = _Code(ops, packed, x_shape, p, bits, act, x.shape)

        def grad(*d_results):
            d_outs = d_results[:n]
            if n:
                d_kernels, d_a, d_gate = _conv_backward(code, kernels, d_outs, config.heads, gate)
                if config.with_activation:
                    d_a += tf.cast(d_results[n], tf.float32)
            else:  # no heads: only the returned activation is read
                d_kernels, d_gate, d_a = [], [], tf.cast(d_results[0], tf.float32)
            if config.normalization == "batch":
                d_x, d_gamma, d_beta = _bn_act_backward(
                    code, d_a, beta, scale, config.synchronized
                )
            elif config.normalization == "layer":
                d_x, d_gamma, d_beta = _layer_norm_backward(code, d_a, gamma, beta, rstd)
            else:
                d_x = _unnormalised_backward(code, d_a, scale)
                d_gamma, d_beta = tf.zeros_like(gamma), tf.zeros_like(beta)
            d_x, d_gamma, d_beta, *d_weights = _first_order_only(
                [tf.cast(d_x, x.dtype), d_gamma, d_beta, *d_kernels, *d_gate], config
            )
            return (d_x, d_gamma, d_beta, None, None, *d_weights)

        # Ordering (c): return the activation only when the caller uses it.
        if config.with_activation:
            return (*outs, activation), grad
        return tuple(outs), grad

    result = list(block(x, gamma, beta, mean, variance, *kernels, *gate_weights))
    return result[:n], (result[n] if config.with_activation else None)


def recompute_call(block, inputs, training):
    """`block(inputs)` under ``tf.recompute_grad`` (its recomputation updates the
    BN moving statistics a second time)."""

    @tf.recompute_grad
    def forward(x):
        return block(x, training=training)

    return forward(inputs)


def residual_call(x, shortcut, stride, padding, extra):
    """ResidualBuffer.call: ``x + adapt(shortcut)``, a backward that keeps only shapes."""
    window = (1, stride, stride, 1)

    @tf.custom_gradient
    def merge(x, shortcut):
        shortcut_shape = tf.shape(shortcut)
        s = shortcut
        if stride > 1:
            s = tf.nn.avg_pool2d(s, stride, stride, padding)

        def grad(d_out):
            d_s = d_out[..., : d_out.shape[-1] - extra] if extra else d_out
            if stride > 1:
                d_s = tf.raw_ops.AvgPoolGrad(
                    orig_input_shape=shortcut_shape,
                    grad=d_s,
                    ksize=window,
                    strides=window,
                    padding=padding,
                )
            return d_out, d_s

        s = tf.cast(s, x.dtype)
        if extra:
            # x plus s padded with zero channels, without the zeros: a
            # tf.zeros of the batch's static shape is folded by Grappler into
            # a constant that the graph keeps between steps (ResNet-164's
            # three widening units: 0.3 MiB per sample), and tf.pad here makes
            # TF 2.21's oneDNN graph rewrite segfault inside model.fit.
            channels = x.shape[-1] - extra
            return tf.concat([x[..., :channels] + s, x[..., channels:]], axis=-1), grad

        return x + s, grad

    return merge(x, shortcut)
