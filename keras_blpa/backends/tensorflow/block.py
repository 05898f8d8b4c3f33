"""The TensorFlow block: a ``tf.custom_gradient`` around the fused ops (`fused.ops()`).

The fused ops are the native library's (ops/, cc/) when it loads, else the
pure-TF `reference`; both have the same functions and signatures.

The compressed backward runs as named steps: decode the code once the incoming
gradient exists, the filter gradient from the decoded ReLU output
(`_conv_backward`), the input gradient through the kernel, then the ReLU mask
and the BN backward from the code (`_bn_relu_backward`).

Memory ordering. Inside `tf.function`, TensorFlow's executor runs an op as soon
as its inputs exist; the peak memory, not the stored bytes, is what counts, so
the block pins the order of a few ops:

(a) Each decode waits for its incoming gradient (`_Code.read_after`). A decode
    that depends only on the codes would run at the start of backprop for every
    block at once and re-materialise all float activations (a 20-block stack
    peaked at 1068 MiB that way, 156 MiB with the ordering; stock Keras 688 MiB).
    For the same reason each full-size backward temporary waits for the one
    before it, so that one block's float temporaries exist at a time.
(b) The forward conv waits for the codes, so that the packing is not deferred
    while the float pre-activation stays alive.
(c) The activation is returned only when the caller uses it
    (``with_activation=True``): for an unused custom-gradient output the tape
    makes ``zeros_like(activation)`` and keeps the float activation alive until
    the backward pass.
"""

import tensorflow as tf

from keras_blpa.backends.tensorflow import fused

__all__ = ["compressed", "conv", "read", "recompute_call", "residual_call"]


def read(variable):
    """A variable's current value as a tensor (tf.custom_gradient takes tensors, not variables)."""
    return tf.convert_to_tensor(variable)


def _conv_args(head):
    """Keyword arguments of tf.raw_ops.Conv2D / Conv2DBackprop* for a `blocks.Head`."""
    args = {"strides": (1,) + head.strides + (1,)}
    if head.explicit_padding is None:
        args["padding"] = head.padding.upper()
    else:
        (top, bottom), (left, right) = head.explicit_padding
        args["padding"] = "EXPLICIT"
        args["explicit_paddings"] = [0, 0, top, bottom, left, right, 0, 0]
    return args


def conv(a, kernel, head):
    """NHWC x HWIO convolution of one `blocks.Head`."""
    return tf.raw_ops.Conv2D(input=a, filter=kernel, **_conv_args(head))


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

    def __init__(self, ops, packed, shape, params, bits):
        self.ops, self.packed, self.shape = ops, packed, shape
        self.params, self.bits = params, bits

    def read_after(self, dependencies):
        """The packed code, read only once `dependencies` exist (ordering (a))."""
        return _after(dependencies, self.packed)

    def decode_relu(self, dependencies):
        """The decoded ReLU output (float32), computed after `dependencies`."""
        p = self.params
        return self.ops.decode_relu(
            self.read_after(dependencies), self.shape, p["step"], p["shift"], self.bits
        )


def _conv_backward(code, kernels, d_outs, conv_args):
    """(d_kernels, d_activation) of the convolutions ``conv_i(relu_output, kernel_i)``.

    The decode waits for the incoming gradients; the filter gradients read the
    decoded ReLU output, then the input gradients (which need only the kernels)
    wait for them, so that the decoded activation is released before the next
    full-size temporaries are made.
    """
    a_dec = code.decode_relu(list(d_outs))
    d_kernels = [
        tf.raw_ops.Conv2DBackpropFilter(
            input=tf.cast(a_dec, d_out.dtype),
            filter_sizes=tf.shape(kernel),
            out_backprop=d_out,
            **args,
        )
        for kernel, d_out, args in zip(kernels, d_outs, conv_args)
    ]
    d_a = None
    with tf.control_dependencies(d_kernels):
        for kernel, d_out, args in zip(kernels, d_outs, conv_args):
            d = tf.cast(
                tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=code.shape, filter=kernel, out_backprop=d_out, **args
                ),
                tf.float32,
            )
            d_a = d if d_a is None else d_a + d
    return d_kernels, d_a


def _bn_relu_backward(code, d_a, beta, scale, synchronized):
    """(d_x, d_gamma, d_beta) from the gradient of the ReLU output.

    The ReLU mask and the normalised input come from the code; the two
    per-channel sums are all-reduced across replicas when `synchronized`
    (d_gamma and d_beta stay per-replica: the optimizer sums them).
    """
    p, bits, ops = code.params, code.bits, code.ops
    sum_g, sum_gx = ops.bn_grad_reduce(
        code.read_after([d_a]), d_a, p["step"], p["shift"], p["gamma"], beta, bits
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
    )
    return d_x, d_gamma, d_beta


def compressed(x, gamma, beta, mean, variance, kernels, config):
    """The training forward of ApproxConvBlock whose backward reads only the packed codes.

    Args:
        x: the block input (float32); gamma, beta: BN vectors; mean, variance:
            the batch statistics (their gradients are part of the BN backward).
        kernels: one conv kernel per head, in ``config.compute_dtype``.
        config: a `keras_blpa.blocks.BlockConfig`.

    Returns:
        (list of head outputs, the activation or None).
    """
    ops = fused.ops()
    bits, epsilon = config.bits, config.epsilon
    conv_args = [_conv_args(h) for h in config.heads]
    n = len(kernels)

    @tf.custom_gradient
    def block(x, gamma, beta, mean, variance, *kernels):
        scale = gamma * tf.math.rsqrt(variance + epsilon)
        p = fused.channel_params(gamma, beta, bits)
        x_shape = tf.shape(x)
        activation, packed = ops.bn_relu_encode(
            x, scale, beta - mean * scale, p["inv_step"], p["shift"], bits
        )
        if config.naive:
            activation = ops.decode_relu(packed, x_shape, p["step"], p["shift"], bits)
        activation = tf.cast(activation, config.compute_dtype)
        with tf.control_dependencies([packed]):  # ordering (b)
            outs = [
                tf.raw_ops.Conv2D(input=activation, filter=k, **args)
                for k, args in zip(kernels, conv_args)
            ]
        code = _Code(ops, packed, x_shape, p, bits)

        def grad(*d_results):
            d_outs = d_results[:n]
            d_kernels, d_a = _conv_backward(code, kernels, d_outs, conv_args)
            if config.with_activation:
                d_a += tf.cast(d_results[n], tf.float32)
            d_x, d_gamma, d_beta = _bn_relu_backward(code, d_a, beta, scale, config.synchronized)
            d_x, d_gamma, d_beta, *d_kernels = _first_order_only(
                [tf.cast(d_x, x.dtype), d_gamma, d_beta, *d_kernels], config
            )
            return (d_x, d_gamma, d_beta, None, None, *d_kernels)

        # Ordering (c): return the activation only when the caller uses it.
        if config.with_activation:
            return (*outs, activation), grad
        return tuple(outs), grad

    result = list(block(x, gamma, beta, mean, variance, *kernels))
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
        if extra:
            # Not tf.pad: TF 2.21's oneDNN graph rewrite segfaults on a
            # channel Pad here inside model.fit (AVX-512 machines).
            zeros = tf.zeros(tf.concat([tf.shape(s)[:-1], [extra]], 0), s.dtype)
            s = tf.concat([s, zeros], axis=-1)

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

        return x + tf.cast(s, x.dtype), grad

    return merge(x, shortcut)
