"""ApproxConvBlock (BN -> activation -> Conv2D with compressed-activation backprop) and ResidualBuffer.

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
from keras_blpa.blocks import NORMALIZATIONS
from keras_blpa.blocks import PADDINGS
from keras_blpa.blocks import WEIGHT_OPTIONS
from keras_blpa.blocks import Activation
from keras_blpa.blocks import BlockConfig
from keras_blpa.blocks import Head
from keras_blpa.blocks import SqueezeExcite
from keras_blpa.blocks import option_module
from keras_blpa.validation import check_bits
from keras_blpa.validation import check_choice
from keras_blpa.validation import check_number
from keras_blpa.validation import check_rank4

__all__ = [
    "ApproxConvBlock",
    "DATA_FORMATS",
    "PADDINGS",
    "QUANTIZATION_MODES",
    "ResidualBuffer",
    "shortcut_adapter",
]

QUANTIZATION_MODES = ("blpa", "naive")
DATA_FORMATS = ("channels_last", "channels_first")
_BN_OPTIONS = ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint")
# Axis orders from a layer's data format to NHWC (the backends' layout) and back.
_TO_NHWC = {"channels_last": None, "channels_first": (0, 2, 3, 1)}
_FROM_NHWC = {"channels_last": None, "channels_first": (0, 3, 1, 2)}


def _data_format(data_format):
    """`data_format` checked; None: keras.config.image_data_format(), as in Keras layers."""
    if data_format is None:
        return keras.config.image_data_format()
    standard = data_format.lower() if isinstance(data_format, str) else None
    if standard not in DATA_FORMATS:
        raise ValueError(
            f"Expected data_format in {DATA_FORMATS} or None. "
            f"Received: data_format={data_format!r}"
        )
    return standard


def _permute(value, order):
    """A 4D tensor, or a shape tuple, with its axes in `order` (None: unchanged)."""
    if order is None:
        return value
    if isinstance(value, tuple):
        return tuple(value[i] for i in order)
    return keras.ops.transpose(value, order)


@keras.saving.register_keras_serializable(package="keras_blpa")
class ApproxConvBlock(keras.layers.Layer):
    """BatchNormalization -> activation -> Conv2D whose backward uses K-bit activations.

    The forward pass is exact. In training, the block keeps for the backward pass
    only a packed K-bit code of its batch-normalised pre-activation (1/8 of the
    float32 bytes at 4 bits), per-channel vectors and the kernels. The backward
    pass decodes the codes once the incoming gradient arrives and rebuilds the
    filter gradient (from the decoded activation output), the activation's
    derivative and the BN gradient (from the decoded normalised value).

    The activation is ReLU by default. Piecewise-linear activations (relu,
    relu6, leaky_relu, linear) have every breakpoint on a bin edge of the code,
    so their derivative (the ReLU mask) and with it the BN shift's gradient are
    exact; smooth ones (silu, gelu, hard_silu) read back the mean derivative
    over the code's bin.

    One BN+activation may feed several convolutions ("heads", e.g. a ResNetV2
    pre-activation feeding both the projection shortcut and the first conv):
    pass ``heads=[dict(filters=..., kernel_size=..., ...), ...]`` instead of
    `filters` / `kernel_size`; all heads read the same single code. With
    ``heads=[]`` and ``return_activation=True`` the block is a compressed BN +
    activation whose output other layers read (a post-activation ResNet's BN ->
    Add, Inception's BN -> ReLU -> Concatenate): it returns the activation alone.

    A head is a Conv2D (``kind="conv"``, the default), a DepthwiseConv2D
    (``kind="depthwise"``: kernel ``(kh, kw, C, depth_multiplier)``, ``C *
    depth_multiplier`` outputs, no `filters`) or a Dense on the channel axis
    (``kind="dense"``, ConvNeXt's pointwise layers: kernel ``(C, filters)``,
    `filters` being Dense's ``units``), each with its stock layer's kernel
    shape and op. A SeparableConv2D is a depthwise block followed by a stock
    1x1 Conv2D (its pointwise part): that conv reads the float depthwise
    output and keeps it for its own backward, as the stock layer does; only
    the block's input activation is compressed (`keras_blpa.convert` builds
    it so).

    Negative gamma is supported: the bins are measured in |gamma| and the ReLU
    mask comes from the sign of the BN output itself (no clamp of gamma).

    Args:
        filters: number of output channels (> 0); Dense's units for
            ``kind="dense"``; None for ``kind="depthwise"`` and when `heads`
            is given.
        kernel_size: int or pair of ints. None when `heads` is given or for
            ``kind="dense"``.
        strides: int or pair of ints. Defaults to 1.
        padding: "same" or "valid".
        bits: 2, 4 or 8 bits per stored activation, or None for the exact
            (stock) backward. Defaults to 4.
        momentum, epsilon: as in keras.layers.BatchNormalization.
        use_bias: whether the convolution adds a bias. Defaults to False.
        kernel_initializer, kernel_regularizer, kernel_constraint: for the
            convolution kernel(s).
        bias_regularizer, bias_constraint: for the convolution bias(es).
        gamma_initializer, beta_initializer, gamma_regularizer,
            beta_regularizer, gamma_constraint, beta_constraint: for the BN
            scale and shift, as in keras.layers.BatchNormalization.
        quantization: "blpa" (exact forward, approximate backward) or "naive"
            (the paper's baseline: the quantised activation also feeds the
            forward convolution, so errors compound across layers).
        synchronized: if True, the BN batch statistics and the two per-channel
            sums of its backward pass are all-reduced across replicas
            (TensorFlow distribution strategies). On JAX it holds by
            construction: under keras.distribution (e.g. DataParallel) the
            layer sees the global batch as one sharded array, so statistics and
            sums are over the global batch whatever the flag.
        activation: Keras' name of the activation: "relu" (default),
            "relu6" (``ReLU(6.0)``), "leaky_relu", "linear", "silu" / "swish",
            "gelu" (``gelu(approximate=False)``, Keras' ``Activation("gelu")``),
            "gelu_approximate" (the tanh form), "hard_silu" / "hard_swish".
        negative_slope: leaky_relu's slope below 0 (>= 0); defaults to 0.2,
            as ``keras.activations.leaky_relu`` (``LeakyReLU``'s is 0.3).
        normalization: what normalises the input before the activation:
            "batch" (default, BatchNormalization), "frozen" (a frozen
            BatchNormalization, the fine-tuning recipe: the moving statistics
            normalise in training too, gamma and beta are not trained and the
            backward has no batch-statistics term, while the convolution
            trains) or "none" (no normalisation: y = x, as an Add -> ReLU ->
            Conv2D; no BN weights; in training the code's per-channel range
            comes from batch statistics computed for coding only) or "layer"
            (LayerNormalization over the channels, ConvNeXt's
            ``LayerNormalization(epsilon=1e-6) -> Dense``: per-position mean
            and variance, weights gamma and beta, no moving statistics; pass
            LN's `epsilon`, `momentum` is unused). A "batch" block built with
            ``trainable=False`` normalises as "frozen", as a non-trainable
            BatchNormalization does, and still compresses the activation that
            the input gradient needs; a "layer" block made non-trainable
            keeps its normalisation and backward (LN has no moving
            statistics), only gamma and beta stop training, as with a
            non-trainable LayerNormalization. In training, a "layer" block
            keeps the packed code of the LN output y (per channel, y = gamma *
            x_hat + beta has BN's form; its bins are sized by y's per-channel
            batch statistics, as "none"'s, since LN standardises x_hat per
            position, not per channel) and one float per position, the
            reciprocal standard deviation; the backward rebuilds x_hat =
            (y - beta) / gamma from the code (the derivation:
            `keras_blpa.backends.tensorflow.block._layer_norm_backward`).
        squeeze_excite: None, or a squeeze-excite gate between the activation
            and the heads (EfficientNet, MobileNetV3): a dict with ``filters``
            (the reduced width), ``activation`` (its inner activation, "relu"
            by default; EfficientNet's is "swish"), ``gate`` ("sigmoid" or
            "hard_sigmoid") and ``use_bias`` (True). The heads read ``a * s``
            with ``s = gate(W2 f(W1 mean_hw(a) + b1) + b2)``, the weights
            ``se_reduce_kernel`` (1, 1, C, filters), ``se_reduce_bias``,
            ``se_expand_kernel`` (1, 1, filters, C), ``se_expand_bias`` in
            Conv2D's shapes; see `keras_blpa.blocks.SqueezeExcite`. The
            compressed backward computes the gate's gradient from the decoded
            activation: neither ``a`` nor ``a * s`` is kept as floats.
        return_activation: if True, the BN+activation output is returned as well
            (last), so that it can also feed a residual shortcut or any other
            layer (the default shortcut is the block input, before BN+activation).
        center, scale: as in keras.layers.BatchNormalization (False: no beta /
            no gamma weight, the shift is 0 / the scale is 1).
        kind: the single head's layer: "conv" (Conv2D, default),
            "depthwise" (DepthwiseConv2D) or "dense" (Dense on the channels).
        depth_multiplier: ``kind="depthwise"``'s DepthwiseConv2D
            depth_multiplier (1).
        heads: optional list of heads, dicts with keys ``kind`` ("conv"),
            ``filters`` (not for "depthwise"), ``depth_multiplier``
            ("depthwise" only, 1),
            ``kernel_size``, ``strides`` (1), ``padding`` ("same"),
            ``use_bias`` (False), ``explicit_padding`` (None, or
            ``((top, bottom), (left, right))`` zeros added before a "valid"
            conv, i.e. a folded ZeroPadding2D) and ``kernel_regularizer``,
            ``kernel_constraint``, ``bias_regularizer``, ``bias_constraint``
            (default: the block's); a "dense" head takes only ``filters``,
            ``use_bias`` and the weight options. Weights: ``kernel`` /
            ``bias`` for the first head, ``kernel_{i}`` / ``bias_{i}`` for
            head i, in the shape of the head's stock layer.
        data_format: "channels_last" (NHWC) or "channels_first" (NCHW);
            None: ``keras.config.image_data_format()``. The kernels are HWIO
            either way, as Conv2D's; channels_first inputs and outputs are
            transposed around the NHWC computation.
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Call arguments:
        inputs: 4D tensor, (batch, height, width, channels) or with
            channels_first (batch, channels, height, width).
        training: whether to use batch statistics (and store codes).

    Returns:
        The convolution output; with several heads or
        ``return_activation=True``, the list of head outputs followed by the
        activation if returned.

    Dtype policies: the BN statistics are computed in float32 (float64
    under a float64 policy), as keras.layers.BatchNormalization does; the
    activation and the convolutions in the compute dtype. The K-bit code and
    the compressed backward are float32 under every policy.

    Raises:
        ValueError: for bad arguments, a non-4D input, an input too small for
            a "valid" kernel, a backend other than TensorFlow and JAX, and,
            from the backward, a second derivative of the compressed backward
            (use ``bits=None``).

    Example:
    >>> block = ApproxConvBlock(64, 3, bits=4)
    >>> y = block(keras.random.normal([8, 32, 32, 16]), training=True)
    >>> two = ApproxConvBlock(heads=[dict(filters=64, kernel_size=1),
    ...                              dict(filters=16, kernel_size=3)])
    >>> dw = ApproxConvBlock(kernel_size=3, kind="depthwise", activation="relu6")
    >>> pointwise = ApproxConvBlock(256, kind="dense", activation="gelu")

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
        data_format=None,
        gamma_regularizer=None,
        beta_regularizer=None,
        gamma_constraint=None,
        beta_constraint=None,
        kernel_constraint=None,
        bias_regularizer=None,
        bias_constraint=None,
        activation="relu",
        negative_slope=None,
        normalization="batch",
        kind="conv",
        depth_multiplier=1,
        squeeze_excite=None,
        **kwargs,
    ):
        self._backend = backends.get()
        super().__init__(**kwargs)
        options = dict(
            kernel_regularizer=kernel_regularizer,
            kernel_constraint=kernel_constraint,
            bias_regularizer=bias_regularizer,
            bias_constraint=bias_constraint,
            gamma_regularizer=gamma_regularizer,
            beta_regularizer=beta_regularizer,
            gamma_constraint=gamma_constraint,
            beta_constraint=beta_constraint,
        )
        for name, value in options.items():
            setattr(self, name, option_module(name).get(value))
        head_defaults = {name: getattr(self, name) for name in WEIGHT_OPTIONS}
        self.data_format = _data_format(data_format)
        self._multi = heads is not None
        if self._multi:
            if filters is not None or kernel_size is not None or kind != "conv" or (
                depth_multiplier != 1
            ):
                raise ValueError(
                    "Pass either filters/kernel_size/kind/depth_multiplier or heads, not "
                    f"both. Received: filters={filters!r}, kernel_size={kernel_size!r}, "
                    f"kind={kind!r}, depth_multiplier={depth_multiplier!r}, heads={heads!r}"
                )
            if not isinstance(heads, (list, tuple)) or not (heads or return_activation):
                raise ValueError(
                    "Expected heads to be a list of dicts, empty only with "
                    f"return_activation=True. Received: heads={heads!r}"
                )
            if not heads and squeeze_excite is not None:
                raise ValueError(
                    "A squeeze_excite gate feeds the heads: it needs at least one. "
                    f"Received: heads={heads!r}, squeeze_excite={squeeze_excite!r}"
                )
            self.heads = tuple(Head.from_dict(h, head_defaults) for h in heads)
        else:
            head = dict(filters=filters, kernel_size=kernel_size, strides=strides,
                        padding=padding, use_bias=use_bias, kind=kind)
            if depth_multiplier != 1:
                head["depth_multiplier"] = depth_multiplier
            self.heads = (Head.from_dict(head, head_defaults),)
        # The first head's arguments (None without heads: the block returns its activation).
        first = self.heads[0] if self.heads else None
        for name in ("kind", "depth_multiplier", "filters", "kernel_size", "strides", "padding",
                     "use_bias"):
            setattr(self, name, getattr(first, name, None))
        self.bits = check_bits(bits, allow_none=True)
        self.activation = Activation.get(activation, negative_slope)
        self.normalization = check_choice(normalization, "normalization", NORMALIZATIONS)
        self.squeeze_excite = SqueezeExcite.get(squeeze_excite)
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
            activation=self.activation,
            normalization=(
                self._normalization() if self._normalization() in ("batch", "layer") else "none"
            ),
            squeeze_excite=self.squeeze_excite,
        )

    def _normalization(self):
        """The normalisation in effect: "frozen" for a "batch" block made non-trainable."""
        if self.normalization == "batch" and not self.trainable:
            return "frozen"
        return self.normalization

    @property
    def _single_output(self):
        return len(self.heads) + self.return_activation == 1

    def _head_shapes(self, input_shape):
        """Each head's NHWC output shape for `input_shape` (in the layer's data format).

        Raises a ValueError where a "valid" kernel does not fit the input (an
        empty output), as Conv2D does.
        """
        shape = _permute(tuple(input_shape), _TO_NHWC[self.data_format])
        channels = shape[3]
        outs = []
        for head in self.heads:
            spatial = [head.output_size(size, axis) for axis, size in enumerate(shape[1:3])]
            if any(size is not None and size < 1 for size in spatial):
                padded = "" if head.explicit_padding is None else (
                    f", explicit_padding={head.explicit_padding}"
                )
                raise ValueError(
                    f"ApproxConvBlock's {head.kernel_size} kernel (padding={head.padding!r}"
                    f"{padded}, strides={head.strides}) does not fit the input's spatial "
                    f"size {shape[1:3]}: the output would be empty. Received: "
                    f"input_shape={tuple(input_shape)}, kernel_size={head.kernel_size}"
                )
            outs.append((shape[0], *spatial, head.output_channels(channels)))
        return outs

    def build(self, input_shape):
        check_rank4(input_shape, "ApproxConvBlock")
        axis = -1 if self.data_format == "channels_last" else 1
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                "ApproxConvBlock needs a known channel count. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        self._head_shapes(input_shape)
        self.input_spec = keras.layers.InputSpec(ndim=4, axes={axis: channels})
        self._build_normalization(channels)
        self.kernels, self.biases = [], []
        for i, head in enumerate(self.heads):
            suffix = f"_{i}" if i else ""
            self.kernels.append(
                self.add_weight(
                    name=f"kernel{suffix}",
                    shape=head.kernel_shape(channels),
                    initializer=self.kernel_initializer,
                    regularizer=head.kernel_regularizer,
                    constraint=head.kernel_constraint,
                )
            )
            self.biases.append(
                self.add_weight(
                    name=f"bias{suffix}",
                    shape=(head.output_channels(channels),),
                    initializer="zeros",
                    regularizer=head.bias_regularizer,
                    constraint=head.bias_constraint,
                )
                if head.use_bias
                else None
            )
        self.kernel, self.bias = (self.kernels[0], self.biases[0]) if self.heads else (None, None)
        self.gate_weights = []
        if self.squeeze_excite is not None:
            for name, shape in self.squeeze_excite.weight_shapes(channels):
                initializer = self.kernel_initializer if name.endswith("kernel") else "zeros"
                self.gate_weights.append(
                    self.add_weight(name=name, shape=shape, initializer=initializer)
                )

    def _build_normalization(self, channels):
        """The BN weights (none for normalization="none"; frozen: not trainable)."""
        self.gamma = self.beta = self.moving_mean = self.moving_variance = None
        if self.normalization == "none":
            return
        vector = dict(shape=(channels,), autocast=False)
        trainable = self.normalization in ("batch", "layer")
        if self.scale:
            self.gamma = self.add_weight(
                name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=trainable,
                **vector,
            )
        if self.center:
            self.beta = self.add_weight(
                name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=trainable,
                **vector,
            )
        if self.normalization == "layer":
            return  # LayerNormalization: no moving statistics
        self.moving_mean = self.add_weight(
            name="moving_mean", initializer="zeros", trainable=False, **vector
        )
        self.moving_variance = self.add_weight(
            name="moving_variance", initializer="ones", trainable=False, **vector
        )

    def _bn_vectors(self, dtype):
        """gamma, beta, moving mean and variance as `dtype` tensors (gamma ones /
        beta zeros without scale / center)."""

        def read(variable):
            return keras.ops.cast(self._backend.read(variable), dtype)

        channels = self.moving_mean.shape[0]
        gamma = read(self.gamma) if self.scale else keras.ops.ones([channels], dtype)
        beta = read(self.beta) if self.center else keras.ops.zeros([channels], dtype)
        return gamma, beta, read(self.moving_mean), read(self.moving_variance)

    def call(self, inputs, training=None):
        # One call for both backends (keras.ops); only the convolution and the
        # compressed training step are the backend's.
        self._head_shapes(inputs.shape)  # input sizes known only now (eager, or a static graph)
        # BatchNormalization's statistics dtype: float32, float64 under a float64 policy.
        dtype = keras.backend.result_type(self.compute_dtype, "float32")
        x = keras.ops.cast(_permute(inputs, _TO_NHWC[self.data_format]), dtype)
        ops = self._backend
        kernels = [keras.ops.cast(ops.read(k), self.compute_dtype) for k in self.kernels]
        gate_weights = [
            keras.ops.cast(ops.read(w), self.compute_dtype) for w in self.gate_weights
        ]
        normalization = self._normalization()
        compress = bool(training) and self.bits is not None
        if normalization == "layer":
            gamma, beta, mean, variance = self._layer_norm_vectors(x, dtype, compress)
        elif normalization != "none":
            gamma, beta, mean, variance = self._bn_vectors(dtype)
            if bool(training) and normalization == "batch":
                mean, variance = self._batch_statistics(x, mean, variance)
        if compress and normalization in ("batch", "layer"):
            vectors = (x, gamma, beta, mean, variance)
        else:
            pre = x
            if normalization == "layer":
                pre = keras.ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=self.epsilon)
            elif normalization != "none":
                scale = gamma * keras.ops.rsqrt(variance + self.epsilon)
                pre = x * scale + (beta - mean * scale)
            if compress:
                # A frozen BN is computed here (autodiff gives d_x = scale * dL/dy);
                # the block codes its output as an unnormalised input, sized by
                # batch statistics computed for that only (no gradient, no state).
                code_mean, code_variance = self._moments(keras.ops.stop_gradient(pre))
                ones = keras.ops.ones_like(code_mean)
                vectors = (pre, ones, keras.ops.zeros_like(code_mean), code_mean, code_variance)
        if compress:
            # The code and the fused kernels are float32 (casts are no-ops but
            # under a float64 policy; autodiff casts their gradients back).
            vectors = [keras.ops.cast(v, "float32") for v in vectors]
            outs, activation = ops.compressed(
                *vectors, kernels, self._block_config(), gate_weights
            )
        else:
            activation = keras.ops.cast(self.activation(pre), self.compute_dtype)
            gated = activation
            if self.squeeze_excite is not None:
                _, s = self.squeeze_excite.squeeze(activation, gate_weights)
                gated = self.squeeze_excite.excite(activation, s)
            outs = [ops.conv(gated, k, head) for k, head in zip(kernels, self.heads)]
        outs = [
            o if b is None else o + keras.ops.cast(b, o.dtype)
            for o, b in zip(outs, self.biases)
        ]
        outs += [activation] if self.return_activation else []
        outs = [_permute(o, _FROM_NHWC[self.data_format]) for o in outs]
        return outs[0] if self._single_output else outs

    def _layer_norm_vectors(self, x, dtype, compress):
        """(gamma, beta, mean, variance) of normalization "layer": gamma ones / beta
        zeros without scale / center; the per-position moments over the channels
        (N, H, W, 1), keras.layers.LayerNormalization's, only when `compress` (the
        compressed backward computes their gradient itself), else None."""
        channels = x.shape[-1]

        def read(variable, fill):
            if variable is None:
                return fill([channels], dtype)
            return keras.ops.cast(self._backend.read(variable), dtype)

        gamma, beta = read(self.gamma, keras.ops.ones), read(self.beta, keras.ops.zeros)
        if not compress:
            return gamma, beta, None, None
        mean, variance = keras.ops.moments(keras.ops.stop_gradient(x), axes=[3], keepdims=True)
        return gamma, beta, mean, variance

    def _moments(self, x):
        """Per-channel mean and variance of NHWC `x`, across replicas when synchronized.

        Where a distributed batch is one global array (JAX under
        keras.distribution), these moments and the backward's per-channel sums
        are global already (XLA inserts the all-reduces).
        """
        return keras.ops.moments(
            x, axes=[0, 1, 2],
            synchronized=self.synchronized and self._backend.EXPLICIT_CROSS_REPLICA,
        )

    def _batch_statistics(self, x, moving_mean, moving_variance):
        """The batch mean and variance, with the moving statistics updated as
        keras.layers.BatchNormalization updates them."""
        # Exact mode differentiates through the statistics like stock Keras;
        # the compressed backward computes their gradient itself.
        stats_input = x if self.bits is None else keras.ops.stop_gradient(x)
        mean, variance = self._moments(stats_input)
        self.moving_mean.assign(moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            moving_variance * self.momentum + variance * (1.0 - self.momentum)
        )
        return mean, variance

    def compute_output_shape(self, input_shape):
        check_rank4(input_shape, "ApproxConvBlock")
        order = _FROM_NHWC[self.data_format]
        outs = [_permute(shape, order) for shape in self._head_shapes(input_shape)]
        outs += [tuple(input_shape)] if self.return_activation else []
        return outs[0] if self._single_output else outs

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
                "data_format": self.data_format,
                "activation": self.activation.get_config(),
                "normalization": self.normalization,
                "squeeze_excite": (
                    None if self.squeeze_excite is None else self.squeeze_excite.get_config()
                ),
            }
        )
        config.update(
            {
                name: option_module(name).serialize(getattr(self, name))
                for name in WEIGHT_OPTIONS + _BN_OPTIONS
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
                    "kind": self.kind,
                    "depth_multiplier": self.depth_multiplier,
                }
            )
        return config

    @classmethod
    def from_config(cls, config):
        # Configs saved before data_format existed (0.1.0) are channels_last.
        return super().from_config({"data_format": "channels_last", **config})


def shortcut_adapter(x_shape, shortcut_shape, data_format="channels_last"):
    """(pool stride, pool padding, channels to add) that map the shortcut onto x.

    The paper's parameter-free shortcut: average-pool by the stride, zero-pad the
    extra channels. Raises ValueError when no such mapping exists or the sizes
    are unknown.
    """
    received = f"input shape={tuple(x_shape)}, shortcut shape={tuple(shortcut_shape)}"

    def fail():
        return ValueError(
            "ResidualBuffer cannot map the shortcut onto the input without "
            "parameters (needs the same or an integer-stride smaller spatial size "
            f"and no fewer channels). Received: {received}"
        )

    if len(x_shape) != 4 or len(shortcut_shape) != 4:
        raise fail()
    order = _TO_NHWC[data_format]
    (h, w, c), (hs, ws, cs) = (_permute(tuple(s), order)[1:] for s in (x_shape, shortcut_shape))
    if None in (h, w, c, hs, ws, cs):
        raise ValueError(
            "ResidualBuffer needs known spatial sizes and channel counts: its "
            f"parameter-free shortcut is sized from them when it is built. Received: {received}"
        )
    if cs > c:
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
    (before its BN+activation) or, with ``ApproxConvBlock(..., return_activation=True)``,
    the block's BN+activation output.

    Args:
        data_format: "channels_last" or "channels_first"; None:
            ``keras.config.image_data_format()``.
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Call arguments:
        inputs: ``[x, shortcut]``, 4D tensors with known sizes.

    Example:
    >>> y = ResidualBuffer()([block_output, block_input])
    """

    def __init__(self, data_format=None, **kwargs):
        self._backend = backends.get()
        super().__init__(**kwargs)
        self.data_format = _data_format(data_format)

    def _adapter(self, input_shape):
        if not isinstance(input_shape, (list, tuple)) or len(input_shape) != 2:
            raise ValueError(
                "ResidualBuffer expects a list [x, shortcut]. "
                f"Received: input_shape={input_shape!r}"
            )
        return shortcut_adapter(tuple(input_shape[0]), tuple(input_shape[1]), self.data_format)

    def build(self, input_shape):
        self._adapter(input_shape)

    def compute_output_shape(self, input_shape):
        self._adapter(input_shape)
        return tuple(input_shape[0])

    def call(self, inputs):
        x, shortcut = inputs
        stride, padding, extra = self._adapter([x.shape, shortcut.shape])
        x, shortcut = (_permute(t, _TO_NHWC[self.data_format]) for t in (x, shortcut))
        out = self._backend.residual_call(x, shortcut, stride, padding, extra)
        return _permute(out, _FROM_NHWC[self.data_format])

    def get_config(self):
        return {**super().get_config(), "data_format": self.data_format}

    @classmethod
    def from_config(cls, config):
        # Configs saved before data_format existed (0.1.0) are channels_last.
        return super().from_config({"data_format": "channels_last", **config})
