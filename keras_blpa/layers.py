"""ApproxConvBlock (BN -> ReLU -> Conv2D with compressed-activation backprop) and ResidualBuffer."""

import keras
import tensorflow as tf

from keras_blpa import quantization as quant

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


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
    ):
        raise ValueError(
            f"Expected {name} to be a positive int or a pair of positive ints. "
            f"Received: {name}={value!r}"
        )
    return value


def _check_rank4(shape, layer):
    if len(shape) != 4:
        raise ValueError(
            f"{layer} expects a 4D input (batch, height, width, channels). "
            f"Received: input_shape={tuple(shape)}"
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
        if isinstance(filters, bool) or not isinstance(filters, int) or filters <= 0:
            raise ValueError(
                f"Expected filters to be a positive int. Received: filters={filters!r}"
            )
        if not isinstance(padding, str) or padding.lower() not in PADDINGS:
            raise ValueError(
                f"Expected padding in {PADDINGS}. Received: padding={padding!r}"
            )
        if quantization not in QUANTIZATION_MODES:
            raise ValueError(
                f"Expected quantization in {QUANTIZATION_MODES}. "
                f"Received: quantization={quantization!r}"
            )
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"Expected momentum in [0, 1]. Received: momentum={momentum!r}"
            )
        if not epsilon > 0:
            raise ValueError(f"Expected epsilon > 0. Received: epsilon={epsilon!r}")
        self.filters = filters
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.padding = padding.lower()
        self.bits = quant.check_bits(bits, allow_none=True)
        self.momentum = float(momentum)
        self.epsilon = float(epsilon)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.quantization = quantization
        self.synchronized = bool(synchronized)
        self.return_activation = bool(return_activation)
        # Custom ops cannot be compiled by XLA; the reference path can.
        self.supports_jit = self.bits is None or not quant.native_ops_available()

    def build(self, input_shape):
        _check_rank4(input_shape, "ApproxConvBlock")
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(
                "ApproxConvBlock needs a known channel count. "
                f"Received: input_shape={tuple(input_shape)}"
            )
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
        if len(inputs.shape) != 4:
            _check_rank4(inputs.shape, "ApproxConvBlock")
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
        bits, compute_dtype, input_dtype = self.bits, self.compute_dtype, x.dtype
        kernels = quant.kernels()
        naive = self.quantization == "naive"
        synchronized = self.synchronized

        @tf.custom_gradient
        def block(x, gamma, beta, kernel, mean, variance):
            inv_std = tf.math.rsqrt(variance + self.epsilon)
            scale = gamma * inv_std
            p = quant.channel_params(gamma, beta, bits)
            x_shape = tf.shape(x)
            activation, packed = kernels.bn_relu_encode(
                x, scale, beta - mean * scale, p["inv_step"], p["shift"], bits
            )
            if naive:
                activation = kernels.decode_relu(
                    packed, x_shape, p["step"], p["shift"], bits
                )
            activation = tf.cast(activation, compute_dtype)
            # The forward goes on only once the codes exist; otherwise the
            # executor may defer the packing and keep every block's float
            # pre-activation alive.
            with tf.control_dependencies([packed]):
                out = self._conv(activation, kernel)

            def grad(d_out, d_activation=None):
                # Decode only once the incoming gradient exists: otherwise the
                # executor decodes every block at the start of backprop and the
                # float activations all come back at once (DESIGN.md trap).
                codes = _after([d_out], packed)
                a_dec = kernels.decode_relu(codes, x_shape, p["step"], p["shift"], bits)
                d_kernel = tf.raw_ops.Conv2DBackpropFilter(
                    input=tf.cast(a_dec, d_out.dtype),
                    filter_sizes=tf.shape(kernel),
                    out_backprop=d_out,
                    strides=(1,) + self.strides + (1,),
                    padding=self.padding.upper(),
                )
                # One full-size temporary at a time: the input gradient waits
                # for the filter gradient (and so for a_dec to be released).
                with tf.control_dependencies([d_kernel]):
                    d_a = tf.raw_ops.Conv2DBackpropInput(
                        input_sizes=x_shape,
                        filter=kernel,
                        out_backprop=d_out,
                        strides=(1,) + self.strides + (1,),
                        padding=self.padding.upper(),
                    )
                d_a = tf.cast(d_a, tf.float32)
                if d_activation is not None:
                    d_a += tf.cast(d_activation, tf.float32)
                # Each decode waits for the result before it, so that at most
                # one block's float temporaries exist at a time.
                codes = _after([d_a], packed)
                sum_g, sum_gx = kernels.bn_grad_reduce(
                    codes, d_a, p["step"], p["shift"], p["gamma"], beta, bits
                )
                count = tf.cast(tf.reduce_prod(x_shape[:-1]), tf.float32)
                # d_gamma / d_beta stay per-replica: the optimizer sums them
                # across replicas; only the input gradient needs the global sums.
                d_gamma, d_beta = sum_gx, sum_g
                sum_g, sum_gx, count = _cross_replica_sum(
                    [sum_g, sum_gx, count], synchronized
                )
                codes = _after([sum_g, sum_gx], packed)
                d_x = kernels.bn_grad_input(
                    codes,
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
                return tf.cast(d_x, input_dtype), d_gamma, d_beta, d_kernel, None, None

            # Return the activation only when the caller uses it: for an unused
            # output the tape makes zeros_like(activation), which would keep
            # the float activation alive until the backward pass.
            if self.return_activation:
                return (out, activation), grad
            return out, grad

        result = block(x, gamma, beta, kernel, mean, variance)
        return result if self.return_activation else (result, None)

    def compute_output_shape(self, input_shape):
        _check_rank4(input_shape, "ApproxConvBlock")
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
                s = tf.pad(s, [[0, 0], [0, 0], [0, 0], [0, extra]])

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
