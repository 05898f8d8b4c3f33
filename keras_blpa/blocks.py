"""The configuration of a compressed block, shared by the layer and the backends.

`Head` is one convolution that reads the block's activation (the layer's
``heads=[dict(...)]`` entries, standardised); `BlockConfig` is everything the
backend's compressed training step needs besides tensors. Both are frozen, so
a backend may key compiled functions on them.
"""

import dataclasses
from typing import Any
from typing import Optional

import keras

from keras_blpa.validation import check_choice
from keras_blpa.validation import check_int
from keras_blpa.validation import check_int_pair

__all__ = ["BlockConfig", "Head", "PADDINGS", "WEIGHT_OPTIONS", "option_module"]

PADDINGS = ("same", "valid")
# Per-head weight options (Conv2D's names); the block's own arguments are their defaults.
WEIGHT_OPTIONS = (
    "kernel_regularizer", "kernel_constraint", "bias_regularizer", "bias_constraint",
)
_HEAD_KEYS = (
    "filters", "kernel_size", "strides", "padding", "use_bias", "explicit_padding",
) + WEIGHT_OPTIONS


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
    """One conv head: NHWC input, HWIO kernel.

    ``explicit_padding`` (with padding "valid") is a folded ZeroPadding2D:
    ``((top, bottom), (left, right))`` zeros added before the convolution.
    The `WEIGHT_OPTIONS` are the regularizers and constraints of its kernel and
    bias, as Conv2D's.
    """

    filters: int
    kernel_size: tuple
    strides: tuple = (1, 1)
    padding: str = "same"
    use_bias: bool = False
    explicit_padding: Optional[tuple] = None
    kernel_regularizer: Any = dataclasses.field(default=None, compare=False)
    kernel_constraint: Any = dataclasses.field(default=None, compare=False)
    bias_regularizer: Any = dataclasses.field(default=None, compare=False)
    bias_constraint: Any = dataclasses.field(default=None, compare=False)

    @classmethod
    def from_dict(cls, head, defaults=None):
        """A validated Head from a user's dict.

        `defaults` ({`WEIGHT_OPTIONS` name: value}, the block's arguments) fill
        the weight options the dict leaves out.
        """
        if not isinstance(head, dict):
            raise ValueError(f"Expected each head to be a dict. Received: head={head!r}")
        unknown = sorted(set(head) - set(_HEAD_KEYS))
        if unknown:
            raise ValueError(
                f"Unknown head keys {unknown}; expected some of {sorted(_HEAD_KEYS)}. "
                f"Received: head={head!r}"
            )
        padding = head.get("padding", "same")
        padding = check_choice(
            padding.lower() if isinstance(padding, str) else padding, "padding", PADDINGS
        )
        return cls(
            filters=check_int(head.get("filters"), "filters"),
            kernel_size=check_int_pair(head.get("kernel_size"), "kernel_size"),
            strides=check_int_pair(head.get("strides", 1), "strides"),
            padding=padding,
            use_bias=bool(head.get("use_bias", False)),
            explicit_padding=_check_explicit_padding(
                head.get("explicit_padding"), padding, head.get("explicit_padding")
            ),
            **{
                name: option_module(name).get(head.get(name, (defaults or {}).get(name)))
                for name in WEIGHT_OPTIONS
            },
        )

    def get_config(self):
        """The dict `from_dict` reads back (regularizers and constraints serialised)."""
        config = {k: getattr(self, k) for k in _HEAD_KEYS}
        for name in WEIGHT_OPTIONS:
            config[name] = option_module(name).serialize(config[name])
        return config

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
        with_activation: also return the BN+ReLU output.
        synchronized: all-reduce the BN backward's per-channel sums across
            replicas (where the backend has `EXPLICIT_CROSS_REPLICA`).
    """

    bits: int
    epsilon: float
    heads: tuple
    compute_dtype: str
    naive: bool = False
    with_activation: bool = False
    synchronized: bool = False

    def second_order_error(self):
        """The ValueError for differentiating the compressed backward again."""
        return ValueError(
            "ApproxConvBlock's compressed backward has no second derivative (it is "
            "computed from the K-bit code, not from the activation): for a gradient "
            "of a gradient, e.g. a gradient penalty, build the block with bits=None. "
            f"Received: bits={self.bits}"
        )
