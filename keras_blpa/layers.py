"""ApproxConvBlock (BN -> ReLU -> Conv2D with compressed-activation backprop) and ResidualBuffer.

The compressed backward of ApproxConvBlock runs as named steps: decode the code
once the incoming gradient exists, the filter gradient from the decoded ReLU
output (`_conv_backward`), the input gradient through the kernel, then the ReLU
mask and the BN backward from the code (`_bn_relu_backward`).

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
    (``return_activation=True``): for an unused custom-gradient output the tape
    makes ``zeros_like(activation)`` and keeps the float activation alive until
    the backward pass.
"""

import keras
import tensorflow as tf

from keras_blpa import quantization as quant
from keras_blpa.validation import check_bits
from keras_blpa.validation import check_choice
from keras_blpa.validation import check_int
from keras_blpa.validation import check_int_pair
from keras_blpa.validation import check_number
from keras_blpa.validation import check_rank4

__all__ = [
    "ApproxConvBlock",
    "PADDINGS",
    "QUANTIZATION_MODES",
    "ResidualBuffer",
    "check_backend",
    "shortcut_adapter",
]

QUANTIZATION_MODES = ("blpa", "naive")
PADDINGS = ("same", "valid")


def check_backend():
    """Raises ValueError unless Keras runs on TensorFlow."""
    name = keras.backend.backend()
    if name != "tensorflow":
        raise ValueError(
            "keras_blpa needs the TensorFlow backend of Keras. "
            f"Received: KERAS_BACKEND={name!r}"
        )


def _after(dependencies, tensor):
    """`tensor`, read only once `dependencies` are computed (orders the executor)."""
    with tf.control_dependencies(dependencies):
        return tf.identity(tensor)


def _cross_replica_sum(values, synchronized):
    """All-reduces (sums) a list of tensors across replicas when synchronized."""
    ctx = tf.distribute.get_replica_context()
    if not synchronized or ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


class _Code:
    """The packed K-bit code of one block and what decoding it needs."""

    def __init__(self, kernels, packed, shape, params, bits):
        self.kernels, self.packed, self.shape = kernels, packed, shape
        self.params, self.bits = params, bits

    def read_after(self, dependencies):
        """The packed code, read only once `dependencies` exist (ordering (a))."""
        return _after(dependencies, self.packed)

    def decode_relu(self, dependencies):
        """The decoded ReLU output (float32), computed after `dependencies`."""
        p = self.params
        return self.kernels.decode_relu(
            self.read_after(dependencies), self.shape, p["step"], p["shift"], self.bits
        )


def _conv_backward(code, kernel, d_out, conv_args):
    """(d_kernel, d_activation) of ``conv(relu_output, kernel)``.

    The filter gradient reads the decoded ReLU output; the input gradient needs
    only the kernel and waits for the filter gradient, so that the decoded
    activation is released before the next full-size temporary is made.
    """
    a_dec = code.decode_relu([d_out])
    d_kernel = tf.raw_ops.Conv2DBackpropFilter(
        input=tf.cast(a_dec, d_out.dtype),
        filter_sizes=tf.shape(kernel),
        out_backprop=d_out,
        **conv_args,
    )
    with tf.control_dependencies([d_kernel]):
        d_a = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=code.shape, filter=kernel, out_backprop=d_out, **conv_args
        )
    return d_kernel, tf.cast(d_a, tf.float32)


def _bn_relu_backward(code, d_a, beta, scale, synchronized):
    """(d_x, d_gamma, d_beta) from the gradient of the ReLU output.

    The ReLU mask and the normalised input come from the code; the two
    per-channel sums are all-reduced across replicas when `synchronized`
    (d_gamma and d_beta stay per-replica: the optimizer sums them).
    """
    p, bits, kernels = code.params, code.bits, code.kernels
    sum_g, sum_gx = kernels.bn_grad_reduce(
        code.read_after([d_a]), d_a, p["step"], p["shift"], p["gamma"], beta, bits
    )
    d_gamma, d_beta = sum_gx, sum_g
    count = tf.cast(tf.reduce_prod(code.shape[:-1]), tf.float32)
    sum_g, sum_gx, count = _cross_replica_sum([sum_g, sum_gx, count], synchronized)
    d_x = kernels.bn_grad_input(
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


@keras.saving.register_keras_serializable(package="keras_blpa")
class ApproxConvBlock(keras.layers.Layer):
    """BatchNormalization -> ReLU -> Conv2D whose backward uses K-bit activations.

    The forward pass is exact. In training, the block keeps for the backward pass
    only a packed K-bit code of its batch-normalised pre-activation (1/8 of the
    float32 bytes at 4 bits), per-channel vectors and the kernel. The backward
    pass decodes the codes once the incoming gradient arrives and rebuilds the
    filter gradient (from the decoded ReLU output), the exact ReLU mask and the BN
    gradient (from the decoded normalised value).

    Negative gamma is supported: the bins are measured in |gamma| and the ReLU
    mask comes from the sign of the BN output itself (no clamp of gamma).

    Args:
        filters: number of output channels (> 0).
        kernel_size: int or pair of ints.
        strides: int or pair of ints. Defaults to 1.
        padding: "same" or "valid".
        bits: 2, 4 or 8 bits per stored activation, or None for the exact
            (stock) backward. Defaults to 4.
        momentum, epsilon: as in keras.layers.BatchNormalization.
        use_bias: whether the convolution adds a bias. Defaults to False.
        kernel_initializer, kernel_regularizer: for the convolution kernel.
        gamma_initializer, beta_initializer: for the BN scale and shift.
        quantization: "blpa" (exact forward, approximate backward) or "naive"
            (the paper's baseline: the quantised activation also feeds the
            forward convolution, so errors compound across layers).
        synchronized: if True, the BN batch statistics and the two per-channel
            sums of its backward pass are all-reduced across replicas.
        return_activation: if True, the layer returns ``[conv_output,
            activation]`` where ``activation`` is the BN+ReLU output, so a
            residual shortcut can be taken after the block's BN+ReLU (the
            default shortcut is the block input, i.e. before BN+ReLU).
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Call arguments:
        inputs: 4D tensor (batch, height, width, channels).
        training: whether to use batch statistics (and store codes).

    Returns:
        The convolution output, or ``[output, activation]`` with
        ``return_activation=True``.

    Raises:
        ValueError: for bad arguments, a non-4D input or a non-TensorFlow backend.

    Example:
    >>> block = ApproxConvBlock(64, 3, bits=4)
    >>> y = block(tf.random.normal([8, 32, 32, 16]), training=True)

    Reference:
        Chakrabarti & Moseley, "Backprop with Approximate Activations for
        Memory-efficient Network Training", NeurIPS 2019.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=1,
        padding="same",
        bits=4,
        momentum=0.99,
        epsilon=1e-3,
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=None,
        quantization="blpa",
        synchronized=False,
        return_activation=False,
        gamma_initializer="ones",
        beta_initializer="zeros",
        **kwargs,
    ):
        check_backend()
        super().__init__(**kwargs)
        self.filters = check_int(filters, "filters")
        self.kernel_size = check_int_pair(kernel_size, "kernel_size")
        self.strides = check_int_pair(strides, "strides")
        self.padding = check_choice(
            padding.lower() if isinstance(padding, str) else padding, "padding", PADDINGS
        )
        self.bits = check_bits(bits, allow_none=True)
        self.quantization = check_choice(
            quantization, "quantization", QUANTIZATION_MODES
        )
        momentum = check_number(momentum, "momentum", 0.0, 1.0)
        epsilon = check_number(epsilon, "epsilon", low=0.0, low_open=True)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.synchronized = bool(synchronized)
        self.return_activation = bool(return_activation)
        # Custom ops cannot be compiled by XLA; the reference path can.
        self.supports_jit = self.bits is None or not quant.native_ops_available()

    def build(self, input_shape):
        check_rank4(input_shape, "ApproxConvBlock")
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                "ApproxConvBlock needs a known channel count. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={-1: channels})
        vector = dict(shape=(channels,), autocast=False)
        self.gamma = self.add_weight(
            name="gamma", initializer=self.gamma_initializer, **vector
        )
        self.beta = self.add_weight(
            name="beta", initializer=self.beta_initializer, **vector
        )
        self.moving_mean = self.add_weight(
            name="moving_mean", initializer="zeros", trainable=False, **vector
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", initializer="ones", trainable=False, **vector
        )
        self.kernel = self.add_weight(
            name="kernel",
            shape=self.kernel_size + (channels, self.filters),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.filters,), initializer="zeros"
            )

    def _conv(self, a, kernel):
        return tf.nn.conv2d(
            a, kernel, strides=(1,) + self.strides + (1,), padding=self.padding.upper()
        )

    def call(self, inputs, training=None):
        x = tf.cast(inputs, tf.float32)
        gamma = tf.convert_to_tensor(self.gamma)
        beta = tf.convert_to_tensor(self.beta)
        kernel = tf.cast(tf.convert_to_tensor(self.kernel), self.compute_dtype)
        use_batch_stats = bool(training) and self.trainable
        if use_batch_stats:
            # Exact mode differentiates through the statistics like stock Keras;
            # the compressed backward below computes their gradient itself.
            stats_input = x if self.bits is None else tf.stop_gradient(x)
            mean, variance = keras.ops.moments(
                stats_input, axes=[0, 1, 2], synchronized=self.synchronized
            )
            self.moving_mean.assign(
                self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum
                + variance * (1.0 - self.momentum)
            )
        else:
            mean = tf.convert_to_tensor(self.moving_mean)
            variance = tf.convert_to_tensor(self.moving_variance)

        if use_batch_stats and self.bits is not None:
            out, activation = self._compressed(x, gamma, beta, kernel, mean, variance)
        else:
            scale = gamma * tf.math.rsqrt(variance + self.epsilon)
            activation = tf.nn.relu(x * scale + (beta - mean * scale))
            activation = tf.cast(activation, self.compute_dtype)
            out = self._conv(activation, kernel)
        if self.use_bias:
            out = tf.nn.bias_add(out, tf.cast(self.bias, out.dtype))
        if self.return_activation:
            return [out, activation]
        return out

    def _compressed(self, x, gamma, beta, kernel, mean, variance):
        """Training forward whose backward reads only the packed codes."""
        kernels = quant.kernels()
        bits, epsilon = self.bits, self.epsilon
        conv = self._conv
        conv_args = dict(
            strides=(1,) + self.strides + (1,), padding=self.padding.upper()
        )

        @tf.custom_gradient
        def block(x, gamma, beta, kernel, mean, variance):
            scale = gamma * tf.math.rsqrt(variance + epsilon)
            p = quant.channel_params(gamma, beta, bits)
            x_shape = tf.shape(x)
            activation, packed = kernels.bn_relu_encode(
                x, scale, beta - mean * scale, p["inv_step"], p["shift"], bits
            )
            if self.quantization == "naive":
                activation = kernels.decode_relu(
                    packed, x_shape, p["step"], p["shift"], bits
                )
            activation = tf.cast(activation, self.compute_dtype)
            with tf.control_dependencies([packed]):  # ordering (b)
                out = conv(activation, kernel)
            code = _Code(kernels, packed, x_shape, p, bits)

            def grad(d_out, d_activation=None):
                d_kernel, d_a = _conv_backward(code, kernel, d_out, conv_args)
                if d_activation is not None:
                    d_a += tf.cast(d_activation, tf.float32)
                d_x, d_gamma, d_beta = _bn_relu_backward(
                    code, d_a, beta, scale, self.synchronized
                )
                return tf.cast(d_x, x.dtype), d_gamma, d_beta, d_kernel, None, None

            # Ordering (c): return the activation only when the caller uses it.
            if self.return_activation:
                return (out, activation), grad
            return out, grad

        result = block(x, gamma, beta, kernel, mean, variance)
        return result if self.return_activation else (result, None)

    def compute_output_shape(self, input_shape):
        check_rank4(input_shape, "ApproxConvBlock")
        spatial = []
        for size, k, s in zip(input_shape[1:3], self.kernel_size, self.strides):
            if size is None:
                spatial.append(None)
            elif self.padding == "same":
                spatial.append(-(-size // s))
            else:
                spatial.append(-(-(size - k + 1) // s))
        out = (input_shape[0], *spatial, self.filters)
        if self.return_activation:
            return [out, tuple(input_shape)]
        return out

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "filters": self.filters,
                "kernel_size": self.kernel_size,
                "strides": self.strides,
                "padding": self.padding,
                "bits": self.bits,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "gamma_initializer": keras.initializers.serialize(
                    self.gamma_initializer
                ),
                "beta_initializer": keras.initializers.serialize(
                    self.beta_initializer
                ),
                "quantization": self.quantization,
                "synchronized": self.synchronized,
                "return_activation": self.return_activation,
            }
        )
        return config


def shortcut_adapter(x_shape, shortcut_shape):
    """(pool stride, pool padding, channels to add) that map the shortcut onto x.

    The paper's parameter-free shortcut: average-pool by the stride, zero-pad the
    extra channels. Raises ValueError when no such mapping exists.
    """
    def fail():
        return ValueError(
            "ResidualBuffer cannot map the shortcut onto the input without "
            "parameters (needs the same or an integer-stride smaller spatial size "
            "and no fewer channels). Received: "
            f"input shape={tuple(x_shape)}, shortcut shape={tuple(shortcut_shape)}"
        )

    if len(x_shape) != 4 or len(shortcut_shape) != 4:
        raise fail()
    (h, w, c), (hs, ws, cs) = x_shape[1:], shortcut_shape[1:]
    if None in (h, w, c, hs, ws, cs) or cs > c:
        raise fail()
    stride = max(1, -(-hs // h))
    for padding, size in (("SAME", lambda n: -(-n // stride)), ("VALID", lambda n: n // stride)):
        if size(hs) == h and size(ws) == w:
            return stride, padding, c - cs
    raise fail()


@keras.saving.register_keras_serializable(package="keras_blpa")
class ResidualBuffer(keras.layers.Layer):
    """Parameter-free residual merge ``x + adapt(shortcut)`` that stores nothing.

    Where the shortcut has a larger spatial size or fewer channels than x, it is
    average-pooled by the (integer) stride and zero-padded in channels, as in the
    paper's ResNets. The backward pass keeps no activations (only shapes).

    Where the shortcut is taken is up to the network: the input of a block
    (before its BN+ReLU) or, with ``ApproxConvBlock(..., return_activation=True)``,
    the block's BN+ReLU output.

    Call arguments:
        inputs: ``[x, shortcut]``, 4D tensors.

    Example:
    >>> y = ResidualBuffer()([block_output, block_input])
    """

    def __init__(self, **kwargs):
        check_backend()
        super().__init__(**kwargs)

    def _adapter(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                "ResidualBuffer expects a list [x, shortcut]. "
                f"Received: input_shape={input_shape!r}"
            )
        return shortcut_adapter(tuple(input_shape[0]), tuple(input_shape[1]))

    def build(self, input_shape):
        self._adapter(input_shape)

    def compute_output_shape(self, input_shape):
        self._adapter(input_shape)
        return tuple(input_shape[0])

    def call(self, inputs):
        x, shortcut = inputs
        stride, padding, extra = self._adapter([x.shape, shortcut.shape])
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
