"""ApproxConvBlock (BN -> ReLU -> Conv2D with compressed-activation backprop) and ResidualBuffer.

The layers, weights and configs are shared by both backends; `call` is one
keras.ops implementation, and only the convolution, the compressed training
step and the residual merge come from the backend (`keras_blpa.backends`),
which each layer resolves once, when it is made:

* TensorFlow (`backends/tensorflow`): a ``tf.custom_gradient`` around the
  native (or pure-TF) fused ops, with the executor ordering that keeps the
  peak low;
* JAX (`backends/jax`): a ``jax.custom_vjp`` whose jnp code is the same, byte
  for byte.

Making a layer loads no compiled library: the TensorFlow ops are loaded (and
built, if needed) at the first training step.
"""

import keras

from keras_blpa import backends
from keras_blpa.blocks import PADDINGS
from keras_blpa.blocks import BlockConfig
from keras_blpa.blocks import Head
from keras_blpa.validation import check_bits
from keras_blpa.validation import check_choice
from keras_blpa.validation import check_number
from keras_blpa.validation import check_rank4

__all__ = [
    "ApproxConvBlock",
    "PADDINGS",
    "QUANTIZATION_MODES",
    "ResidualBuffer",
    "shortcut_adapter",
]

QUANTIZATION_MODES = ("blpa", "naive")


@keras.saving.register_keras_serializable(package="keras_blpa")
class ApproxConvBlock(keras.layers.Layer):
    """BatchNormalization -> ReLU -> Conv2D whose backward uses K-bit activations.

    The forward pass is exact. In training, the block keeps for the backward pass
    only a packed K-bit code of its batch-normalised pre-activation (1/8 of the
    float32 bytes at 4 bits), per-channel vectors and the kernels. The backward
    pass decodes the codes once the incoming gradient arrives and rebuilds the
    filter gradient (from the decoded ReLU output), the exact ReLU mask and the BN
    gradient (from the decoded normalised value).

    One BN+ReLU may feed several convolutions ("heads", e.g. a ResNetV2
    pre-activation feeding both the projection shortcut and the first conv):
    pass ``heads=[dict(filters=..., kernel_size=..., ...), ...]`` instead of
    `filters` / `kernel_size`; all heads read the same single code.

    Negative gamma is supported: the bins are measured in |gamma| and the ReLU
    mask comes from the sign of the BN output itself (no clamp of gamma).

    Args:
        filters: number of output channels (> 0). None when `heads` is given.
        kernel_size: int or pair of ints. None when `heads` is given.
        strides: int or pair of ints. Defaults to 1.
        padding: "same" or "valid".
        bits: 2, 4 or 8 bits per stored activation, or None for the exact
            (stock) backward. Defaults to 4.
        momentum, epsilon: as in keras.layers.BatchNormalization.
        use_bias: whether the convolution adds a bias. Defaults to False.
        kernel_initializer, kernel_regularizer: for the convolution kernel(s).
        gamma_initializer, beta_initializer: for the BN scale and shift.
        quantization: "blpa" (exact forward, approximate backward) or "naive"
            (the paper's baseline: the quantised activation also feeds the
            forward convolution, so errors compound across layers).
        synchronized: if True, the BN batch statistics and the two per-channel
            sums of its backward pass are all-reduced across replicas
            (TensorFlow distribution strategies). On JAX it holds by
            construction: under keras.distribution (e.g. DataParallel) the
            layer sees the global batch as one sharded array, so statistics and
            sums are over the global batch whatever the flag.
        return_activation: if True, the BN+ReLU output is returned as well
            (last), so that it can also feed a residual shortcut or any other
            layer (the default shortcut is the block input, before BN+ReLU).
        center, scale: as in keras.layers.BatchNormalization (False: no beta /
            no gamma weight, the shift is 0 / the scale is 1).
        heads: optional list of conv heads, dicts with keys ``filters``,
            ``kernel_size``, ``strides`` (1), ``padding`` ("same"),
            ``use_bias`` (False), ``explicit_padding`` (None, or
            ``((top, bottom), (left, right))`` zeros added before a "valid"
            conv, i.e. a folded ZeroPadding2D) and ``kernel_regularizer``.
            Weights: ``kernel`` / ``bias`` for the first head, ``kernel_{i}`` /
            ``bias_{i}`` for head i.
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Call arguments:
        inputs: 4D tensor (batch, height, width, channels).
        training: whether to use batch statistics (and store codes).

    Returns:
        The convolution output; with several heads or
        ``return_activation=True``, the list of head outputs followed by the
        activation if returned.

    Raises:
        ValueError: for bad arguments, a non-4D input or a backend other than
            TensorFlow and JAX.

    Example:
    >>> block = ApproxConvBlock(64, 3, bits=4)
    >>> y = block(keras.random.normal([8, 32, 32, 16]), training=True)
    >>> two = ApproxConvBlock(heads=[dict(filters=64, kernel_size=1),
    ...                              dict(filters=16, kernel_size=3)])

    Reference:
        Chakrabarti & Moseley, "Backprop with Approximate Activations for
        Memory-efficient Network Training", NeurIPS 2019.
    """

    def __init__(
        self,
        filters=None,
        kernel_size=None,
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
        center=True,
        scale=True,
        heads=None,
        **kwargs,
    ):
        self._backend = backends.get()
        super().__init__(**kwargs)
        self.kernel_regularizer = keras.regularizers.get(kernel_regularizer)
        self._multi = heads is not None
        if self._multi:
            if filters is not None or kernel_size is not None:
                raise ValueError(
                    "Pass either filters/kernel_size or heads, not both. Received: "
                    f"filters={filters!r}, kernel_size={kernel_size!r}, heads={heads!r}"
                )
            if not isinstance(heads, (list, tuple)) or not heads:
                raise ValueError(
                    f"Expected heads to be a non-empty list of dicts. Received: heads={heads!r}"
                )
            self.heads = tuple(Head.from_dict(h, kernel_regularizer) for h in heads)
        else:
            self.heads = (
                Head.from_dict(
                    dict(
                        filters=filters,
                        kernel_size=kernel_size,
                        strides=strides,
                        padding=padding,
                        use_bias=use_bias,
                    ),
                    kernel_regularizer,
                ),
            )
        first = self.heads[0]
        self.filters, self.kernel_size = first.filters, first.kernel_size
        self.strides, self.padding, self.use_bias = first.strides, first.padding, first.use_bias
        self.bits = check_bits(bits, allow_none=True)
        self.quantization = check_choice(
            quantization, "quantization", QUANTIZATION_MODES
        )
        self.momentum = check_number(momentum, "momentum", 0.0, 1.0)
        self.epsilon = check_number(epsilon, "epsilon", low=0.0, low_open=True)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.synchronized = bool(synchronized)
        self.return_activation = bool(return_activation)
        self.center, self.scale = bool(center), bool(scale)
        # Custom ops cannot be compiled by XLA; the pure-TF and JAX paths can.
        # (The backend answers without loading anything.)
        self.supports_jit = self.bits is None or self._backend.jit_compatible()

    def _block_config(self):
        return BlockConfig(
            bits=self.bits,
            epsilon=float(self.epsilon),
            heads=self.heads,
            compute_dtype=self.compute_dtype,
            naive=self.quantization == "naive",
            with_activation=self.return_activation,
            synchronized=self.synchronized,
        )

    @property
    def _single_output(self):
        return len(self.heads) == 1 and not self.return_activation

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
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma", initializer=self.gamma_initializer, **vector
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta", initializer=self.beta_initializer, **vector
            )
        self.moving_mean = self.add_weight(
            name="moving_mean", initializer="zeros", trainable=False, **vector
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", initializer="ones", trainable=False, **vector
        )
        self.kernels, self.biases = [], []
        for i, head in enumerate(self.heads):
            suffix = f"_{i}" if i else ""
            self.kernels.append(
                self.add_weight(
                    name=f"kernel{suffix}",
                    shape=head.kernel_size + (channels, head.filters),
                    initializer=self.kernel_initializer,
                    regularizer=head.kernel_regularizer,
                )
            )
            self.biases.append(
                self.add_weight(
                    name=f"bias{suffix}", shape=(head.filters,), initializer="zeros"
                )
                if head.use_bias
                else None
            )
        self.kernel, self.bias = self.kernels[0], self.biases[0]

    def _bn_vectors(self, channels):
        """gamma and beta as float32 tensors (ones / zeros without scale / center)."""
        read = self._backend.read
        gamma = read(self.gamma) if self.scale else keras.ops.ones([channels])
        beta = read(self.beta) if self.center else keras.ops.zeros([channels])
        return gamma, beta

    def call(self, inputs, training=None):
        # One call for both backends (keras.ops); only the convolution and the
        # compressed training step are the backend's.
        x = keras.ops.cast(inputs, "float32")
        gamma, beta = self._bn_vectors(self.moving_mean.shape[0])
        ops = self._backend
        kernels = [keras.ops.cast(ops.read(k), self.compute_dtype) for k in self.kernels]
        use_batch_stats = bool(training) and self.trainable
        if use_batch_stats:
            # Exact mode differentiates through the statistics like stock Keras;
            # the compressed backward below computes their gradient itself.
            stats_input = x if self.bits is None else keras.ops.stop_gradient(x)
            # Where a distributed batch is one global array (JAX under
            # keras.distribution), these moments and the backward's per-channel
            # sums are global already (XLA inserts the all-reduces).
            mean, variance = keras.ops.moments(
                stats_input,
                axes=[0, 1, 2],
                synchronized=self.synchronized and ops.EXPLICIT_CROSS_REPLICA,
            )
            self.moving_mean.assign(
                self.moving_mean * self.momentum + mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum
                + variance * (1.0 - self.momentum)
            )
        else:
            mean, variance = ops.read(self.moving_mean), ops.read(self.moving_variance)

        if use_batch_stats and self.bits is not None:
            outs, activation = ops.compressed(
                x, gamma, beta, mean, variance, kernels, self._block_config()
            )
        else:
            scale = gamma * keras.ops.rsqrt(variance + self.epsilon)
            activation = keras.ops.relu(x * scale + (beta - mean * scale))
            activation = keras.ops.cast(activation, self.compute_dtype)
            outs = [ops.conv(activation, k, head) for k, head in zip(kernels, self.heads)]
        outs = [
            o if b is None else o + keras.ops.cast(b, o.dtype)
            for o, b in zip(outs, self.biases)
        ]
        if self._single_output:
            return outs[0]
        return outs + ([activation] if self.return_activation else [])

    def compute_output_shape(self, input_shape):
        check_rank4(input_shape, "ApproxConvBlock")
        outs = []
        for head in self.heads:
            spatial = [head.output_size(size, axis) for axis, size in enumerate(input_shape[1:3])]
            outs.append((input_shape[0], *spatial, head.filters))
        if self._single_output:
            return outs[0]
        return outs + ([tuple(input_shape)] if self.return_activation else [])

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bits": self.bits,
                "momentum": self.momentum,
                "epsilon": self.epsilon,
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
                "center": self.center,
                "scale": self.scale,
            }
        )
        if self._multi:
            config["heads"] = [head.get_config() for head in self.heads]
        else:
            config.update(
                {
                    "filters": self.filters,
                    "kernel_size": self.kernel_size,
                    "strides": self.strides,
                    "padding": self.padding,
                    "use_bias": self.use_bias,
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
        self._backend = backends.get()
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
        return self._backend.residual_call(x, shortcut, stride, padding, extra)
