"""The configuration of a compressed block, shared by the layer and the backends.

`Activation` is the block's nonlinearity (the layer's ``activation=``
argument, standardised); `Head` is one convolution that reads the block's
activation (the layer's ``heads=[dict(...)]`` entries, standardised);
`BlockConfig` is everything the backend's compressed training step needs
besides tensors. All are frozen, so a backend may key compiled functions on
them.
"""

import dataclasses
from typing import Any
from typing import Optional

import keras

from keras_blpa.codes import PAPER_WINDOW
from keras_blpa.codes import WIDE_WINDOW
from keras_blpa.validation import check_choice
from keras_blpa.validation import check_int
from keras_blpa.validation import check_int_pair
from keras_blpa.validation import check_number

__all__ = [
    "ACTIVATIONS",
    "Activation",
    "BlockConfig",
    "HEAD_KINDS",
    "Head",
    "NORMALIZATIONS",
    "PADDINGS",
    "RELU",
    "SQUEEZE_EXCITE_GATES",
    "SqueezeExcite",
    "WEIGHT_OPTIONS",
    "option_module",
]

PADDINGS = ("same", "valid")
# Per-head weight options (Conv2D's names); the block's own arguments are their defaults.
WEIGHT_OPTIONS = (
    "kernel_regularizer", "kernel_constraint", "bias_regularizer", "bias_constraint",
)
_HEAD_KEYS = (
    "filters", "kernel_size", "strides", "padding", "use_bias", "explicit_padding",
) + WEIGHT_OPTIONS
# What reads the activation: Conv2D, DepthwiseConv2D, Dense (on the channel axis).
HEAD_KINDS = ("conv", "depthwise", "dense")


# The activations of the block, by canonical name: Keras' names, with gelu's two
# forms (``approximate`` False / True) named apart.
PIECEWISE_LINEAR = ("relu", "relu6", "leaky_relu", "linear")
SMOOTH = ("silu", "gelu", "gelu_approximate", "hard_silu")
# Activations whose 4- and 2-bit codes follow the batch (`Activation.follows_data`).
FOLLOWS_DATA = ("silu", "hard_silu")
ACTIVATIONS = PIECEWISE_LINEAR + SMOOTH
_ALIASES = {"swish": "silu", "hard_swish": "hard_silu"}
# Keras' default slope of keras.activations.leaky_relu.
DEFAULT_NEGATIVE_SLOPE = 0.2


@dataclasses.dataclass(frozen=True)
class Activation:
    """The block's activation a = f(y) of the BN output y.

    ``name`` is one of `ACTIVATIONS`; ``negative_slope`` is leaky_relu's slope
    below 0 (0.0 for the others). Piecewise-linear activations keep every
    breakpoint on a bin edge of the code (0, and 6 for relu6), so their
    derivative read back from the code is exact; smooth ones read the mean
    derivative over the code's bin (`keras_blpa.backends.tensorflow.reference`).
    """

    name: str = "relu"
    negative_slope: float = 0.0

    @classmethod
    def get(cls, activation, negative_slope=None):
        """The Activation of a layer's arguments.

        `activation` is a name (Keras' "relu", "relu6", "leaky_relu", "linear",
        "silu"/"swish", "gelu", "gelu_approximate" (``gelu(approximate=True)``),
        "hard_silu"/"hard_swish"), a dict ``{"name": ..., "negative_slope": ...}``
        (`get_config`'s form) or an Activation. `negative_slope` (>= 0, for
        leaky_relu only) defaults to Keras' 0.2.
        """
        if isinstance(activation, Activation):
            return activation
        if isinstance(activation, dict):
            unknown = sorted(set(activation) - {"name", "negative_slope"})
            if unknown or "name" not in activation:
                raise ValueError(
                    "Expected an activation dict with key 'name' and optionally "
                    f"'negative_slope'. Received: activation={activation!r}"
                )
            return cls.get(activation["name"], activation.get("negative_slope"))
        name = activation.lower() if isinstance(activation, str) else activation
        name = check_choice(_ALIASES.get(name, name), "activation", ACTIVATIONS)
        if negative_slope is not None and name != "leaky_relu":
            raise ValueError(
                "negative_slope applies to activation='leaky_relu' only. Received: "
                f"activation={activation!r}, negative_slope={negative_slope!r}"
            )
        if name != "leaky_relu":
            return cls(name)
        slope = DEFAULT_NEGATIVE_SLOPE if negative_slope is None else negative_slope
        return cls(name, check_number(slope, "negative_slope", low=0.0))

    @property
    def piecewise_linear(self):
        """Whether f is piecewise linear (its derivative from the code is exact)."""
        return self.name in PIECEWISE_LINEAR

    def window(self, bits):
        """Width of the `bits`-bit code's window in units of |gamma| (`codes.PAPER_WINDOW`).

        The paper's 6 (beta +- 3 |gamma|), except for the 8-bit codes of linear
        and smooth activations: 16 (beta +- 8 |gamma|). Those codes are read back
        as values (and smooth derivatives) with no exact mask to fall back on, and
        BN outputs are heavy-tailed in such nets (EfficientNetB0: up to 9.5
        |gamma|), so at 8 bits clipping, not rounding, was the code's error.
        ReLU, ReLU6 and LeakyReLU keep the paper's codes at every width. The
        4- and 2-bit codes of silu and hard_silu are sized by the batch instead
        (`follows_data`).
        """
        wide = bits == 8 and (self.name == "linear" or self.name in SMOOTH)
        return WIDE_WINDOW if wide else PAPER_WINDOW

    def follows_data(self, bits):
        """Whether the blocks size the `bits`-bit code's window per channel by the
        batch (`codes.data_window`): the 4- and 2-bit codes of silu and
        hard_silu. Their 16 (or 4) bins cannot cover a heavy tail at the paper's
        resolution, and the fixed +-3 |gamma| clipped it: in a chain of 32 BN ->
        silu -> conv units, 62% of the last BN output's energy lay beyond 3
        |gamma| and the last kernel gradient came out 0.69x of stock (0.88x with
        the batch's window). gelu keeps the paper's window: its derivative bends
        within +-2 |gamma|, and there the coarser bins cost more than the tail
        gained (the chain's gradient 32 convs from the loss: cosine 0.90 with the
        paper's window, 0.85 with the batch's). linear keeps it too: on Gaussian
        batches the wider bins cost a linear block's kernel gradient (cosine
        0.978-0.994 against 0.986-0.997), and MobileNetV2's 4-bit training, whose
        linear project blocks were the only ones it changed, came out 0.5 points
        further from stock over 4 seeds.
        """
        return bits < 8 and self.name in FOLLOWS_DATA

    def get_config(self):
        """The name, or {name, negative_slope} for leaky_relu (`get` reads both)."""
        if self.name != "leaky_relu":
            return self.name
        return {"name": self.name, "negative_slope": self.negative_slope}

    def stock_layer(self, **kwargs):
        """The stock Keras layer that computes this activation, as models write it."""
        if self.name == "relu6":
            return keras.layers.ReLU(6.0, **kwargs)
        if self.name == "leaky_relu":
            return keras.layers.LeakyReLU(self.negative_slope, **kwargs)
        if self.name == "gelu_approximate":
            return keras.layers.Activation(
                lambda v: keras.activations.gelu(v, approximate=True), **kwargs
            )
        return keras.layers.Activation(self.name, **kwargs)

    def __call__(self, y):
        """f(y) with Keras' own ops: bit for bit what the stock activation layer gives."""
        ops = keras.ops
        if self.name == "relu":
            return ops.relu(y)
        if self.name == "relu6":
            return ops.relu6(y)
        if self.name == "leaky_relu":
            return ops.leaky_relu(y, negative_slope=self.negative_slope)
        if self.name == "linear":
            return y
        if self.name == "silu":
            return ops.silu(y)
        if self.name == "hard_silu":
            return ops.hard_silu(y)
        return ops.gelu(y, approximate=self.name == "gelu_approximate")


RELU = Activation()

# What normalises the block's input before the activation (the layer's argument).
NORMALIZATIONS = ("batch", "frozen", "none", "layer")


# The gate functions of a squeeze-excite (EfficientNet: sigmoid; MobileNetV3: hard_sigmoid).
SQUEEZE_EXCITE_GATES = ("sigmoid", "hard_sigmoid")
_SQUEEZE_EXCITE_KEYS = ("filters", "activation", "gate", "use_bias")


@dataclasses.dataclass(frozen=True)
class SqueezeExcite:
    """A squeeze-excite gate between the block's activation a and its heads.

    The heads read ``a * s``, with the per-sample, per-channel gate
    ``s = gate(W2 f(W1 mean_hw(a) + b1) + b2)`` (EfficientNet's and
    MobileNetV3's squeeze-excite: GlobalAveragePooling2D -> 1x1 Conv2D with
    activation f -> 1x1 Conv2D -> gate -> Multiply). ``filters`` is W1's
    output width. The weights are the two 1x1 convs' (Conv2D's shapes:
    ``(1, 1, C, filters)``, ``(1, 1, filters, C)``, biases if ``use_bias``).

    In the compressed backward, dL/ds and the kernel gradients are computed
    from the decoded activation, so neither ``a`` nor ``a * s`` is kept as
    floats; the pooled vector and ``s`` (per sample and channel) are.
    """

    filters: int
    activation: Activation = RELU
    gate: str = "sigmoid"
    use_bias: bool = True

    @classmethod
    def get(cls, value):
        """None, a SqueezeExcite, or a dict of its fields (`get_config`'s form)."""
        if value is None or isinstance(value, SqueezeExcite):
            return value
        if not isinstance(value, dict) or "filters" not in value or (
            set(value) - set(_SQUEEZE_EXCITE_KEYS)
        ):
            raise ValueError(
                "Expected squeeze_excite to be None or a dict with key 'filters' and "
                f"optionally {list(_SQUEEZE_EXCITE_KEYS[1:])}. Received: squeeze_excite={value!r}"
            )
        gate = value.get("gate", "sigmoid")
        return cls(
            filters=check_int(value["filters"], "squeeze_excite filters"),
            activation=Activation.get(value.get("activation", "relu")),
            gate=check_choice(gate, "squeeze_excite gate", SQUEEZE_EXCITE_GATES),
            use_bias=bool(value.get("use_bias", True)),
        )

    def get_config(self):
        return {
            "filters": self.filters,
            "activation": self.activation.get_config(),
            "gate": self.gate,
            "use_bias": self.use_bias,
        }

    def weight_shapes(self, channels):
        """[(name, shape)] of the gate's weights, in the order `__call__` reads them."""
        shapes = [("se_reduce_kernel", (1, 1, channels, self.filters))]
        shapes += [("se_reduce_bias", (self.filters,))] if self.use_bias else []
        shapes += [("se_expand_kernel", (1, 1, self.filters, channels))]
        shapes += [("se_expand_bias", (channels,))] if self.use_bias else []
        return shapes

    def squeeze(self, a, weights):
        """(pooled, s): the spatial mean of the NHWC activation `a` (batch, C) and the gate."""
        pooled = keras.ops.mean(a, axis=(1, 2))
        return pooled, self(pooled, weights)

    @staticmethod
    def excite(a, s):
        """``a * s``, the gate broadcast over the spatial axes (Multiply's)."""
        return a * keras.ops.expand_dims(keras.ops.expand_dims(s, 1), 1)

    def __call__(self, pooled, weights):
        """The gate s (batch, C) of the pooled activation (batch, C), with keras.ops."""
        ops = keras.ops
        weights = list(weights)

        def dense(v):
            kernel = weights.pop(0)
            out = ops.matmul(v, ops.reshape(kernel, kernel.shape[2:]))
            return out + weights.pop(0) if self.use_bias else out

        s = dense(self.activation(dense(pooled)))
        return ops.sigmoid(s) if self.gate == "sigmoid" else ops.hard_sigmoid(s)


def option_module(name):
    """The keras module (regularizers or constraints) that gets and serialises option `name`."""
    return keras.regularizers if name.endswith("regularizer") else keras.constraints


def _check_explicit_padding(explicit, padding, received):
    """((top, bottom), (left, right)) of ints >= 0 with "valid", None if all zero."""
    if explicit is None:
        return None
    try:
        explicit = tuple(tuple(int(v) for v in pair) for pair in explicit)
        ok = len(explicit) == 2 and all(len(pair) == 2 and min(pair) >= 0 for pair in explicit)
    except (TypeError, ValueError):
        ok = False
    if not ok or padding != "valid":
        raise ValueError(
            "Expected explicit_padding ((top, bottom), (left, right)) of ints >= 0 "
            f"with padding='valid'. Received: explicit_padding={received!r}, padding={padding!r}"
        )
    return explicit if any(any(pair) for pair in explicit) else None


@dataclasses.dataclass(frozen=True)
class Head:
    """One layer that reads the block's activation: NHWC input, channels last.

    ``kind`` is what it computes, with Keras' kernel shape (``C`` input channels):

    * "conv": Conv2D, kernel ``kernel_size + (C, filters)`` (HWIO), ``filters``
      output channels;
    * "depthwise": DepthwiseConv2D, kernel ``kernel_size + (C, depth_multiplier)``,
      ``C * depth_multiplier`` output channels (channel ``c * depth_multiplier + m``
      from input channel c, Keras' order); ``filters`` is None;
    * "dense": Dense on the channel axis (ConvNeXt's pointwise layers), kernel
      ``(C, filters)``: ``filters`` is Dense's ``units``; numerically a 1x1 conv
      (kernel_size (1, 1), strides 1, "valid").

    ``explicit_padding`` (with padding "valid") is a folded ZeroPadding2D:
    ``((top, bottom), (left, right))`` zeros added before the convolution.
    The `WEIGHT_OPTIONS` are the regularizers and constraints of its kernel and
    bias, as Conv2D's.
    """

    filters: Optional[int]
    kernel_size: tuple
    strides: tuple = (1, 1)
    padding: str = "same"
    use_bias: bool = False
    explicit_padding: Optional[tuple] = None
    kernel_regularizer: Any = dataclasses.field(default=None, compare=False)
    kernel_constraint: Any = dataclasses.field(default=None, compare=False)
    bias_regularizer: Any = dataclasses.field(default=None, compare=False)
    bias_constraint: Any = dataclasses.field(default=None, compare=False)
    kind: str = "conv"
    depth_multiplier: int = 1

    @classmethod
    def from_dict(cls, head, defaults=None):
        """A validated Head from a user's dict.

        Keys: ``kind`` ("conv" if absent, as configs saved before kinds existed),
        the `Head` fields (``filters`` absent or None for "depthwise";
        ``depth_multiplier`` for "depthwise" only; for "dense" only ``filters``,
        ``use_bias`` and the weight options, ``kernel_size`` / ``strides`` 1 if
        given). `defaults` ({`WEIGHT_OPTIONS` name: value}, the block's
        arguments) fill the weight options the dict leaves out.
        """
        if not isinstance(head, dict):
            raise ValueError(f"Expected each head to be a dict. Received: head={head!r}")
        keys = _HEAD_KEYS + ("kind", "depth_multiplier")
        unknown = sorted(set(head) - set(keys))
        if unknown:
            raise ValueError(
                f"Unknown head keys {unknown}; expected some of {sorted(keys)}. "
                f"Received: head={head!r}"
            )
        kind = head.get("kind", "conv")
        kind = check_choice(kind.lower() if isinstance(kind, str) else kind, "kind", HEAD_KINDS)
        if kind != "depthwise" and head.get("depth_multiplier", 1) != 1:
            raise ValueError(
                "depth_multiplier applies to kind='depthwise' heads only. "
                f"Received: head={head!r}"
            )
        options = {
            name: option_module(name).get(head.get(name, (defaults or {}).get(name)))
            for name in WEIGHT_OPTIONS
        }
        use_bias = bool(head.get("use_bias", False))
        if kind == "dense":
            for name in ("kernel_size", "strides"):
                if head.get(name) not in (None, 1, (1, 1), [1, 1]):
                    raise ValueError(
                        f"A kind='dense' head is a 1x1 map of the channels: {name} must be "
                        f"1 or absent. Received: head={head!r}"
                    )
            if head.get("explicit_padding") is not None:
                raise ValueError(
                    "A kind='dense' head takes no explicit_padding. "
                    f"Received: head={head!r}"
                )
            return cls(
                filters=check_int(head.get("filters"), "filters"), kernel_size=(1, 1),
                padding="valid", use_bias=use_bias, kind=kind, **options,
            )
        if kind == "depthwise":
            if head.get("filters") is not None:
                raise ValueError(
                    "A kind='depthwise' head has C * depth_multiplier outputs: pass "
                    f"depth_multiplier, not filters. Received: head={head!r}"
                )
            filters = None
        else:
            filters = check_int(head.get("filters"), "filters")
        padding = head.get("padding", "same")
        padding = check_choice(
            padding.lower() if isinstance(padding, str) else padding, "padding", PADDINGS
        )
        return cls(
            filters=filters,
            kernel_size=check_int_pair(head.get("kernel_size"), "kernel_size"),
            strides=check_int_pair(head.get("strides", 1), "strides"),
            padding=padding,
            use_bias=use_bias,
            explicit_padding=_check_explicit_padding(
                head.get("explicit_padding"), padding, head.get("explicit_padding")
            ),
            kind=kind,
            depth_multiplier=check_int(head.get("depth_multiplier", 1), "depth_multiplier"),
            **options,
        )

    def get_config(self):
        """The dict `from_dict` reads back (regularizers and constraints serialised)."""
        keys = _HEAD_KEYS
        if self.kind == "dense":
            keys = ("filters", "use_bias") + WEIGHT_OPTIONS
        config = {k: getattr(self, k) for k in keys}
        if self.kind == "depthwise":
            del config["filters"]
            config["depth_multiplier"] = self.depth_multiplier
        for name in WEIGHT_OPTIONS:
            config[name] = option_module(name).serialize(config[name])
        return {"kind": self.kind, **config}

    def kernel_shape(self, channels):
        """The kernel's shape for `channels` input channels (Keras' layer's)."""
        if self.kind == "dense":
            return (channels, self.filters)
        last = self.depth_multiplier if self.kind == "depthwise" else self.filters
        return self.kernel_size + (channels, last)

    def output_channels(self, channels):
        """The number of output channels for `channels` input channels."""
        if self.kind == "depthwise":
            return None if channels is None else channels * self.depth_multiplier
        return self.filters

    def output_size(self, size, axis):
        """Output length along spatial `axis` (0: height, 1: width) for input length `size`."""
        if size is None:
            return None
        k, s = self.kernel_size[axis], self.strides[axis]
        if self.padding == "same":
            return -(-size // s)
        if self.explicit_padding is not None:
            size += sum(self.explicit_padding[axis])
        return (size - k) // s + 1


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """What the compressed training step needs besides tensors.

    Attributes:
        bits: 2, 4 or 8.
        epsilon: the BN epsilon.
        heads: tuple of `Head`.
        compute_dtype: dtype of the activation and the convolutions.
        naive: the quantised activation also feeds the forward convolutions.
        with_activation: also return the BN+activation output.
        synchronized: all-reduce the BN backward's per-channel sums across
            replicas (where the backend has `EXPLICIT_CROSS_REPLICA`).
        activation: an `Activation` (ReLU by default).
        normalization: "batch" (BN with the batch statistics, and the BN
            backward) or "none" (y = x; the code sized by the batch statistics,
            computed for that only). The layer's "frozen" is "none" on the
            frozen BN's output. "layer": LayerNormalization over the channels
            (mean and variance are then per position, shape (N, H, W, 1); the
            LN backward, `keras_blpa.backends.tensorflow.block`).
        squeeze_excite: a `SqueezeExcite` between the activation and the
            heads, or None.
    """

    bits: int
    epsilon: float
    heads: tuple
    compute_dtype: str
    naive: bool = False
    with_activation: bool = False
    synchronized: bool = False
    activation: Activation = RELU
    normalization: str = "batch"
    squeeze_excite: Optional[SqueezeExcite] = None

    def second_order_error(self):
        """The ValueError for differentiating the compressed backward again."""
        return ValueError(
            "ApproxConvBlock's compressed backward has no second derivative (it is "
            "computed from the K-bit code, not from the activation): for a gradient "
            "of a gradient, e.g. a gradient penalty, build the block with bits=None. "
            f"Received: bits={self.bits}"
        )
