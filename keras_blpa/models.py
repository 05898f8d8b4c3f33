"""ResNet factory: the paper's pre-activation bottleneck ResNets, compressed or stock.

`resnet(...)` builds a functional keras.Model. With ``bits`` in (2, 4, 8) every
BN -> ReLU -> Conv unit is a `keras_blpa.ApproxConvBlock` and every residual merge
a `keras_blpa.ResidualBuffer`; with ``bits=None`` the same architecture is built
from stock Keras layers only (BatchNormalization, ReLU, Conv2D, Add,
AveragePooling2D, Reshape + ZeroPadding3D for the zero channel padding): the
exact baseline every benchmark compares against, with the same parameter count.

The network is a stage plan (`stage_plan`: units, filters and strides per stage,
keras-hub's ``stackwise_num_blocks / _filters / _strides``) put together by three
block functions: `apply_stem`, `apply_stack` (one stage of `apply_bottleneck_unit`)
and `apply_head`. `PRESETS` names the paper's networks (`from_preset`).

Layer names are stable: ``stem_conv`` (``stem_pool``), ``stage{s}_unit{u}_conv{k}``
(and, for the stock model, ``..._conv{k}_bn``, ``..._conv{k}_relu``),
``stage{s}_unit{u}_add``, ``final_bn``, ``final_relu``, ``avg_pool``,
``predictions``.

Building blocks for benchmarks:
    * `apply_conv_unit` / `apply_bottleneck_unit`: the block functions the factory
      uses (work on KerasTensors and on eager tensors alike).
    * ``resnet(..., unit_wrapper=fn)``: each residual unit is first built as its
      own small functional keras.Model (named ``stage{s}_unit{u}``) and then
      ``fn(unit_model)`` is called on the unit input, e.g.
      ``unit_wrapper=RecomputeGrad`` wraps every unit in ``tf.recompute_grad``
      (``jax.checkpoint`` on the JAX backend).
    * ``keras.RematScope(mode="activations")`` around ``resnet(..., bits=None)``
      gives Keras' own rematerialisation of the stock model.
"""

import keras

from keras_blpa import backends
from keras_blpa import layers as blpa_layers
from keras_blpa import validation

__all__ = [
    "PRESETS",
    "STEMS",
    "RecomputeGrad",
    "apply_bottleneck_unit",
    "apply_conv_unit",
    "apply_head",
    "apply_shortcut_merge",
    "apply_stack",
    "apply_stem",
    "copy_weights",
    "from_preset",
    "resnet",
    "stage_plan",
]

STEMS = ("cifar", "imagenet")

# Stage plans: filters and strides per stage; units per stage from the depth.
_CIFAR_FILTERS = (16, 32, 64)
_CIFAR_STRIDES = (1, 2, 2)
_IMAGENET_BLOCKS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
_IMAGENET_FILTERS = (64, 128, 256, 512)
_IMAGENET_STRIDES = (1, 2, 2, 2)
_BOTTLENECK_EXPANSION = 4

# The paper's networks, as plain dicts of `resnet` arguments (keras-hub style).
PRESETS = {
    "resnet164_cifar10": dict(depth=164, num_classes=10, input_shape=(32, 32, 3)),
    "resnet164_cifar100": dict(depth=164, num_classes=100, input_shape=(32, 32, 3)),
    "resnet1001_cifar10": dict(depth=1001, num_classes=10, input_shape=(32, 32, 3)),
    "resnet152_imagenet": dict(
        depth=152, num_classes=1000, input_shape=(224, 224, 3), stem="imagenet"
    ),
}
# Every layer is channels last: input_shape is (height, width, channels)
# whatever keras.config.image_data_format() says.
_DATA_FORMAT = "channels_last"
# BatchNormalization settings shared by both builds (ApproxConvBlock defaults).
_BN_MOMENTUM = 0.99
_BN_EPSILON = 1e-3


def _nearby_cifar_depths(near, count=3):
    """Valid CIFAR depths (9n + 2, n >= 1) around `near`."""
    n = max(1, round((near - 2) / 9))
    lo = max(1, n - count // 2)
    return [9 * k + 2 for k in range(lo, lo + count)]


def _cifar_units(depth):
    """Bottleneck units per stage of the CIFAR ResNet (depth = 9n + 2)."""
    if (
        isinstance(depth, bool)
        or not isinstance(depth, int)
        or depth < 11
        or (depth - 2) % 9
    ):
        near = depth if isinstance(depth, (int, float)) else 164
        raise ValueError(
            "Expected depth = 9n + 2 (n >= 1) for stem='cifar', e.g. "
            f"{_nearby_cifar_depths(near)} (164 and 1001 are the paper's). "
            f"Received: depth={depth!r}"
        )
    return (depth - 2) // 9


def stage_plan(depth, stem="cifar"):
    """Units, filters and strides of each stage of the ResNet of `depth`.

    Args:
        depth: 9n + 2 for "cifar" (n units per stage); 26, 50, 101 or 152 for
            "imagenet".
        stem: "cifar" or "imagenet".

    Returns:
        ``(blocks, filters, strides)``: three tuples with one entry per stage
        (filters before the 4x bottleneck expansion and the width multiplier),
        e.g. ``((18, 18, 18), (16, 32, 64), (1, 2, 2))`` for depth 164.

    Raises:
        ValueError: for an unknown stem or a depth the stem does not have (the
            message lists nearby valid CIFAR depths).
    """
    validation.check_choice(stem, "stem", STEMS)
    if stem == "cifar":
        return (_cifar_units(depth),) * 3, _CIFAR_FILTERS, _CIFAR_STRIDES
    validation.check_choice(depth, "depth", tuple(_IMAGENET_BLOCKS))
    return _IMAGENET_BLOCKS[depth], _IMAGENET_FILTERS, _IMAGENET_STRIDES


def _regularizer(weight_decay):
    """L2 penalty whose gradient is weight_decay * w (SGD-style weight decay)."""
    if weight_decay is None:
        return None
    weight_decay = validation.check_number(weight_decay, "weight_decay", low=0)
    return keras.regularizers.L2(weight_decay / 2.0) if weight_decay else None


def _batch_norm(momentum, synchronized, name):
    """A stock BatchNormalization. `synchronized` only where the backend needs an
    explicit all-reduce: Keras refuses it on JAX, where a distributed model's
    statistics are global already."""
    return keras.layers.BatchNormalization(
        momentum=momentum,
        epsilon=_BN_EPSILON,
        synchronized=synchronized and backends.get().EXPLICIT_CROSS_REPLICA,
        name=name,
    )


def apply_conv_unit(
    x,
    filters,
    kernel_size,
    strides=1,
    bits=4,
    quantization="blpa",
    synchronized=False,
    kernel_regularizer=None,
    return_activation=False,
    bn_momentum=_BN_MOMENTUM,
    name=None,
):
    """BN -> ReLU -> Conv2D on `x`, compressed (bits set) or stock (bits=None).

    Args:
        x: 4D tensor.
        filters, kernel_size, strides: of the convolution ("same" padding, no bias).
        bits: 2, 4, 8 (one `ApproxConvBlock` named `name`) or None (stock
            `BatchNormalization` ``{name}_bn``, `ReLU` ``{name}_relu``, `Conv2D`
            ``{name}``).
        quantization, synchronized: passed to ApproxConvBlock; for the stock
            build `synchronized=True` makes the BN a synchronised
            BatchNormalization.
        kernel_regularizer: regulariser of the kernel.
        return_activation: if True return ``(conv_output, bn_relu_output)``.
        bn_momentum: momentum of the BN moving statistics.
        name: layer-name prefix.

    Returns:
        The conv output, or ``(conv_output, activation)``.
    """
    if bits is not None:
        out = blpa_layers.ApproxConvBlock(
            filters,
            kernel_size,
            strides=strides,
            bits=bits,
            momentum=bn_momentum,
            epsilon=_BN_EPSILON,
            kernel_regularizer=kernel_regularizer,
            quantization=quantization,
            synchronized=synchronized,
            return_activation=return_activation,
            data_format=_DATA_FORMAT,
            name=name,
        )(x)
        return tuple(out) if return_activation else out
    a = _batch_norm(bn_momentum, synchronized, f"{name}_bn")(x)
    a = keras.layers.ReLU(name=f"{name}_relu")(a)
    out = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=kernel_regularizer,
        data_format=_DATA_FORMAT,
        name=name,
    )(a)
    return (out, a) if return_activation else out


def apply_shortcut_merge(x, shortcut, bits=4, name=None):
    """``x + shortcut`` with the paper's parameter-free shortcut adapter.

    The shortcut is average-pooled by the integer stride and zero-padded in
    channels. bits set: one `ResidualBuffer` named `name`; bits=None: stock
    AveragePooling2D (``{name}_pool``), Reshape + ZeroPadding3D + Reshape
    (``{name}_pad*``) and Add (`name`).
    """
    if bits is not None:
        return blpa_layers.ResidualBuffer(data_format=_DATA_FORMAT, name=name)([x, shortcut])
    stride, padding, extra = blpa_layers.shortcut_adapter(
        tuple(x.shape), tuple(shortcut.shape)
    )
    s = shortcut
    if stride > 1:
        s = keras.layers.AveragePooling2D(
            stride,
            stride,
            padding=padding.lower(),
            data_format=_DATA_FORMAT,
            name=f"{name}_pool",
        )(s)
    if extra:
        h, w, c = s.shape[1:]
        s = keras.layers.Reshape((h, w, c, 1), name=f"{name}_pad_expand")(s)
        s = keras.layers.ZeroPadding3D(
            ((0, 0), (0, 0), (0, extra)), data_format=_DATA_FORMAT, name=f"{name}_pad"
        )(s)
        s = keras.layers.Reshape((h, w, c + extra), name=f"{name}_pad_squeeze")(s)
    return keras.layers.Add(name=name)([x, s])


def apply_bottleneck_unit(
    x,
    filters,
    strides=1,
    shortcut_from_activation=False,
    bits=4,
    quantization="blpa",
    synchronized=False,
    kernel_regularizer=None,
    bn_momentum=_BN_MOMENTUM,
    name="unit",
):
    """Pre-activation bottleneck unit: 3 x (BN-ReLU-Conv) 1x1 / 3x3 / 1x1 + shortcut.

    The output has ``4 * filters`` channels; `strides` is on the 3x3 conv. The
    shortcut is the unit input, or with ``shortcut_from_activation=True`` the
    output of the first BN+ReLU (He et al.'s pre-activation ResNet at a stage
    transition), mapped through `apply_shortcut_merge`.

    Layer names: ``{name}_conv1``, ``{name}_conv2``, ``{name}_conv3``, ``{name}_add``.
    """
    common = dict(
        bits=bits,
        quantization=quantization,
        synchronized=synchronized,
        kernel_regularizer=kernel_regularizer,
        bn_momentum=bn_momentum,
    )
    shortcut = x
    if shortcut_from_activation:
        y, shortcut = apply_conv_unit(
            x, filters, 1, return_activation=True, name=f"{name}_conv1", **common
        )
    else:
        y = apply_conv_unit(x, filters, 1, name=f"{name}_conv1", **common)
    y = apply_conv_unit(y, filters, 3, strides=strides, name=f"{name}_conv2", **common)
    y = apply_conv_unit(
        y, _BOTTLENECK_EXPANSION * filters, 1, name=f"{name}_conv3", **common
    )
    return apply_shortcut_merge(y, shortcut, bits=bits, name=f"{name}_add")


def apply_stem(x, filters, stem="cifar", kernel_regularizer=None):
    """The stem: ``stem_conv``, a 3x3 conv ("cifar") or a 7x7 stride-2 conv and
    a 3x3 stride-2 max pool ``stem_pool`` ("imagenet"); stock layers in every build."""
    imagenet = stem == "imagenet"
    x = keras.layers.Conv2D(
        filters,
        7 if imagenet else 3,
        strides=2 if imagenet else 1,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=kernel_regularizer,
        data_format=_DATA_FORMAT,
        name="stem_conv",
    )(x)
    if imagenet:
        x = keras.layers.MaxPooling2D(
            3, 2, padding="same", data_format=_DATA_FORMAT, name="stem_pool"
        )(x)
    return x


def _wrapped_unit(x, unit_wrapper, name, **unit_args):
    """Builds one unit as a functional sub-model and applies unit_wrapper to it."""
    inputs = keras.Input(shape=tuple(x.shape[1:]), name=f"{name}_input")
    outputs = apply_bottleneck_unit(inputs, name=name, **unit_args)
    unit = keras.Model(inputs, outputs, name=name)
    return unit_wrapper(unit)(x)


def apply_stack(x, blocks, filters, strides, stage, unit_wrapper=None, **unit_args):
    """One stage: `blocks` bottleneck units ``stage{stage}_unit{u}``.

    The first unit has the stage's `strides` and takes its shortcut after its
    first BN+ReLU; the others have stride 1 and take the unit input.

    Args:
        x: 4D tensor.
        blocks: number of units.
        filters: bottleneck width (the output has ``4 * filters`` channels).
        strides: stride of the first unit.
        stage: stage number (1-based), part of the layer names.
        unit_wrapper: optional callable applied to each unit built as a small
            keras.Model (see `resnet`).
        **unit_args: bits, quantization, synchronized, kernel_regularizer and
            bn_momentum for `apply_bottleneck_unit`.
    """
    for u in range(1, blocks + 1):
        args = dict(
            filters=filters,
            strides=strides if u == 1 else 1,
            shortcut_from_activation=u == 1,
            **unit_args,
        )
        name = f"stage{stage}_unit{u}"
        if unit_wrapper is None:
            x = apply_bottleneck_unit(x, name=name, **args)
        else:
            x = _wrapped_unit(x, unit_wrapper, name, **args)
    return x


def apply_head(
    x,
    num_classes,
    classifier_activation="softmax",
    kernel_regularizer=None,
    synchronized=False,
    bn_momentum=_BN_MOMENTUM,
    bits=None,
    quantization="blpa",
):
    """The head: ``final_bn`` -> ReLU, global average pooling ``avg_pool`` and the
    float32 dense classifier ``predictions``.

    With `bits` set, the BN -> ReLU is an `ApproxConvBlock` without heads named
    ``final_bn``: the pooling's backward needs only shapes, so the block keeps
    only its code, and its backward makes two float tensors of the last stage
    instead of stock BN's five or six (the step's peak is at the start of the
    backward pass, where every code is alive). With bits=None, stock
    BatchNormalization ``final_bn`` and ReLU ``final_relu``.
    """
    if bits is None:
        x = _batch_norm(bn_momentum, synchronized, "final_bn")(x)
        x = keras.layers.ReLU(name="final_relu")(x)
    else:
        x = blpa_layers.ApproxConvBlock(
            heads=[],
            return_activation=True,
            bits=bits,
            momentum=bn_momentum,
            epsilon=_BN_EPSILON,
            quantization=quantization,
            synchronized=synchronized,
            data_format=_DATA_FORMAT,
            name="final_bn",
        )(x)
    x = keras.layers.GlobalAveragePooling2D(data_format=_DATA_FORMAT, name="avg_pool")(x)
    return keras.layers.Dense(
        num_classes,
        activation=classifier_activation,
        kernel_regularizer=kernel_regularizer,
        dtype="float32",
        name="predictions",
    )(x)


@keras.saving.register_keras_serializable(package="keras_blpa")
class RecomputeGrad(keras.layers.Layer):
    """Runs a sub-model under activation checkpointing (exact recomputation).

    The in-ecosystem peer of keras_blpa: only the unit input is kept and the
    unit's forward pass is recomputed during backprop. Use as
    ``resnet(..., bits=None, unit_wrapper=RecomputeGrad)``.

    The backend's `recompute_call` runs it: ``tf.recompute_grad`` on TensorFlow
    (whose recomputation updates the BN moving statistics a second time), and
    ``jax.checkpoint`` around ``block.stateless_call`` on JAX (statistics
    updated once).

    Args:
        block: a built keras.Model (one residual unit).
    """

    def __init__(self, block, **kwargs):
        kwargs.setdefault("name", f"{block.name}_recompute")
        super().__init__(**kwargs)
        self.block = block

    def build(self, input_shape):
        if not self.block.built:
            self.block.build(input_shape)

    def call(self, inputs, training=None):
        return backends.get().recompute_call(self.block, inputs, training)

    def compute_output_shape(self, input_shape):
        return self.block.compute_output_shape(input_shape)

    def get_config(self):
        config = super().get_config()
        config["block"] = keras.saving.serialize_keras_object(self.block)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = keras.saving.deserialize_keras_object(config["block"])
        return cls(**config)


def resnet(
    depth,
    num_classes,
    input_shape,
    bits=4,
    width=1,
    stem="cifar",
    quantization="blpa",
    weight_decay=0.0,
    synchronized=False,
    classifier_activation="softmax",
    unit_wrapper=None,
    bn_momentum=_BN_MOMENTUM,
    name=None,
):
    """Pre-activation bottleneck ResNet built from keras_blpa (or stock) layers.

    `apply_stem`, then one `apply_stack` per stage of `stage_plan`, then
    `apply_head`. ``stem="cifar"``: the paper's ResNet for 32x32 inputs (any size >= 4 works,
    e.g. 28x28x1): a 3x3 conv (16 * width channels), three stages of
    n = (depth - 2) / 9 bottleneck units with widths 16/32/64 (times `width`,
    outputs x4) and strides 1/2/2, final BN-ReLU, global average pooling and a
    dense classifier. ``stem="imagenet"``: ResNet-152-style, a 7x7 stride-2
    conv (64 * width) and 3x3 stride-2 max pool, then stages of [3, 8, 36, 3]
    units with widths 64/128/256/512 (depth 152; 26, 50 and 101 give the
    [2, 2, 2, 2], [3, 4, 6, 3] and [3, 4, 23, 3] variants).

    Shortcuts are parameter-free (average pool by the stride, zero channel
    padding); at each stage's first unit the shortcut is taken after the unit's
    first BN+ReLU. The stem conv and the classifier are stock Keras layers in
    both builds; with `bits` set the final BN-ReLU is a block without heads
    (`apply_head`).

    Args:
        depth: 9n + 2 for "cifar" (164 and 1001 in the paper); 152 (or 26, 50,
            101) for "imagenet".
        num_classes: number of classes (> 0).
        input_shape: (height, width, channels), all known; every layer is
            channels last, whatever ``keras.config.image_data_format()`` says.
        bits: 2, 4 or 8 for ApproxConvBlock / ResidualBuffer layers; None for
            the same network from stock Keras layers only.
        width: channel multiplier (int >= 1), the paper's "1001 (4x)".
        stem: "cifar" or "imagenet".
        quantization: "blpa" or "naive" (see ApproxConvBlock).
        weight_decay: SGD-style weight decay on conv and dense kernels, applied
            as ``keras.regularizers.L2(weight_decay / 2)`` (the paper: 2e-4).
        synchronized: cross-replica batch statistics (ApproxConvBlock
            ``synchronized`` / BatchNormalization ``synchronized``).
        classifier_activation: activation of the (float32) dense classifier;
            None for logits.
        bn_momentum: momentum of every BN's moving statistics (Keras'
            default 0.99; 0.9 suits short runs).
        unit_wrapper: optional callable applied to each residual unit built as
            a small keras.Model; returns a layer (e.g. `RecomputeGrad`).
        name: model name (default ``resnet{depth}_{bits}bit`` / ``_exact``).

    Returns:
        A functional keras.Model.

    Raises:
        ValueError: for an invalid depth (the message lists nearby valid
            depths), stem, quantization, width, bits, num_classes,
            input_shape (unknown sizes included) or weight_decay.

    Example:
    >>> model = resnet(164, 10, (32, 32, 3), bits=4)
    >>> baseline = resnet(164, 10, (32, 32, 3), bits=None)
    """
    backends.check()
    bits = validation.check_bits(bits, allow_none=True)
    blocks, filters, strides = stage_plan(depth, stem)
    validation.check_choice(quantization, "quantization", blpa_layers.QUANTIZATION_MODES)
    validation.check_int(width, "width")
    validation.check_int(num_classes, "num_classes")
    input_shape = validation.check_shape(input_shape, "input_shape", 3)
    if None in input_shape:
        raise ValueError(
            "resnet needs a known input_shape (height, width, channels): its "
            "parameter-free shortcuts are sized from it when the model is built. "
            f"Received: input_shape={input_shape}"
        )
    regularizer = _regularizer(weight_decay)
    unit_args = dict(
        bits=bits,
        quantization=quantization,
        synchronized=synchronized,
        kernel_regularizer=regularizer,
        bn_momentum=bn_momentum,
    )

    inputs = keras.Input(shape=input_shape, name="image")
    x = apply_stem(inputs, filters[0] * width, stem, regularizer)
    for stage, (count, base, stride) in enumerate(zip(blocks, filters, strides), 1):
        x = apply_stack(x, count, base * width, stride, stage, unit_wrapper, **unit_args)
    outputs = apply_head(
        x, num_classes, classifier_activation, regularizer, synchronized, bn_momentum,
        bits=bits, quantization=quantization,
    )
    if name is None:
        name = f"resnet{depth}_" + ("exact" if bits is None else f"{bits}bit")
    return keras.Model(inputs, outputs, name=name)


def from_preset(preset, /, **overrides):
    """`resnet` with the arguments of one of `PRESETS`, updated by `overrides`.

    Args:
        preset: a key of `PRESETS`, e.g. "resnet164_cifar10".
        **overrides: any `resnet` argument, e.g. ``bits=None`` or ``width=4``.

    Raises:
        ValueError: for an unknown preset name.

    Example:
    >>> model = from_preset("resnet1001_cifar10", bits=4, width=4)
    """
    validation.check_choice(preset, "preset", tuple(PRESETS))
    return resnet(**{**PRESETS[preset], **overrides})


def _all_layers(model):
    """Layers of a model, with sub-models and RecomputeGrad wrappers flattened."""
    out, todo = [], list(model.layers)
    while todo:
        layer = todo.pop(0)
        if isinstance(layer, RecomputeGrad):
            todo[:0] = list(layer.block.layers)
        elif isinstance(layer, keras.Model):
            todo[:0] = list(layer.layers)
        else:
            out.append(layer)
    return out


def _unit_weights(model):
    """{name: variables}: an ApproxConvBlock ``n`` and the stock pair ``n_bn`` +
    ``n`` both give [gamma, beta, moving_mean, moving_variance, kernel]."""
    layers = {layer.name: layer for layer in _all_layers(model)}
    found = {}
    for name, layer in layers.items():
        if isinstance(layer, blpa_layers.ApproxConvBlock):
            # A block without heads (the head's final BN -> ReLU) is a stock BN's weights.
            found[name] = [
                layer.gamma,
                layer.beta,
                layer.moving_mean,
                layer.moving_variance,
            ] + ([layer.kernel] if layer.heads else [])
        elif isinstance(layer, keras.layers.Conv2D) and f"{name}_bn" in layers:
            bn = layers[f"{name}_bn"]
            found[name] = [
                bn.gamma,
                bn.beta,
                bn.moving_mean,
                bn.moving_variance,
                layer.kernel,
            ]
        elif layer.weights and not (
            name.endswith("_bn") and name[: -len("_bn")] in layers
        ):
            found[name] = list(layer.weights)
    return found


def copy_weights(source, target):
    """Copies all weights between two `resnet` builds of the same architecture.

    Works across builds (bits=2/4/8/None, with or without `unit_wrapper`):
    an ApproxConvBlock ``n`` maps onto the stock layers ``n_bn`` + ``n``.

    Raises:
        ValueError: if the two models do not have the same layers and shapes.
    """
    src, dst = _unit_weights(source), _unit_weights(target)
    if sorted(src) != sorted(dst):
        raise ValueError(
            "copy_weights needs two builds of the same architecture. Layers only "
            f"in source: {sorted(set(src) - set(dst))[:5]}, only in target: "
            f"{sorted(set(dst) - set(src))[:5]}"
        )
    for key, variables in src.items():
        if len(variables) != len(dst[key]):
            raise ValueError(f"Layer {key!r} has different weights in the two models.")
        for s, d in zip(variables, dst[key]):
            if tuple(s.shape) != tuple(d.shape):
                raise ValueError(
                    f"Layer {key!r}: weight shape {tuple(s.shape)} != {tuple(d.shape)}"
                )
            # A copy: on JAX assign would alias the source array, which
            # model.fit donates (and deletes) on its first step.
            d.assign(keras.ops.copy(s))
