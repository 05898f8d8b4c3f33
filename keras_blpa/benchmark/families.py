"""Accuracy study of the model families `keras_blpa.convert` reaches beyond ResNet.

Three small Fashion-MNIST nets in stock Keras layers, each written as its family
writes it (keras.applications' layer names):

- ``mobilenetv2``: inverted residuals, Conv2D 1x1 expand -> BN -> ReLU(6.) ->
  DepthwiseConv2D 3x3 -> BN -> ReLU(6.) -> Conv2D 1x1 project -> BN (-> Add).
- ``efficientnet``: MBConv, expand -> BN -> swish -> DepthwiseConv2D -> BN ->
  swish -> squeeze-excite (GlobalAveragePooling2D -> Reshape -> Conv2D swish ->
  Conv2D sigmoid -> Multiply) -> Conv2D 1x1 project -> BN (-> Add).
- ``convnext``: DepthwiseConv2D 7x7 -> LayerNormalization -> Dense(4C) ->
  gelu -> Dense(C) -> layer scale -> Add, a patchify stem and LN downsampling.

Each has a small stem and a GlobalAveragePooling2D -> Dense(10) head. A mode's
model is the stock net (``exact``) or ``keras_blpa.convert`` of it (``blpa8``:
bits=8, ``blpa4``, ``naive4``: quantization="naive", ...), built from the same
seed, so every mode starts from the same weights (convert copies them) and
trains on the same data order and schedule (`accuracy.train_one`). Whatever
convert converts is what is compressed: the rows record how many blocks it
made of each family.

    python -m keras_blpa.benchmark --parts families --out OUT
    python -m keras_blpa.benchmark.families --out OUT --fam-epochs 1   # the same
"""

import sys

import keras

from keras_blpa import validation
from keras_blpa.benchmark import accuracy
from keras_blpa.benchmark import modes as modes_lib

__all__ = [
    "BUILDERS",
    "FAMILIES",
    "LayerScale",
    "build_family",
    "build_mode",
    "conversion_count",
    "convnext",
    "efficientnet",
    "main",
    "mobilenetv2",
    "study",
]

FAMILIES = ("mobilenetv2", "efficientnet", "convnext")
NUM_CLASSES = 10


def _divisible(value, divisor=8):
    """keras.applications' _make_divisible: channels rounded to a multiple of 8."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


# ------------------------------------------------------------- MobileNetV2


def _inverted_residual(x, expansion, filters, stride, block_id):
    """keras.applications.MobileNetV2's _inverted_res_block (no ZeroPadding:
    stride-2 depthwise convs use padding="same" on these small images)."""
    channels = x.shape[-1]
    prefix = f"block_{block_id}_"
    inputs = x
    if block_id:
        x = keras.layers.Conv2D(expansion * channels, 1, use_bias=False,
                                name=prefix + "expand")(x)
        x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.999,
                                            name=prefix + "expand_BN")(x)
        x = keras.layers.ReLU(6.0, name=prefix + "expand_relu")(x)
    else:
        prefix = "expanded_conv_"
    x = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                     name=prefix + "depthwise")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.999,
                                        name=prefix + "depthwise_BN")(x)
    x = keras.layers.ReLU(6.0, name=prefix + "depthwise_relu")(x)
    x = keras.layers.Conv2D(filters, 1, use_bias=False, name=prefix + "project")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.999,
                                        name=prefix + "project_BN")(x)
    if channels == filters and stride == 1:
        x = keras.layers.Add(name=prefix + "add")([inputs, x])
    return x


def mobilenetv2(input_shape=(28, 28, 1), width=16, num_classes=NUM_CLASSES):
    """A MobileNetV2-like net: stem, 5 inverted residuals (t=1, 6, 6, 6, 6) over
    three resolutions, a 1x1 head conv, GAP -> Dense (logits).

    Args:
        width: channels of the stem and first stage (stages: 1x, 1.5x, 2x).
    """
    validation.check_int(width, "width")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="Conv1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.999, name="bn_Conv1")(x)
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)
    # (expansion t, output channels, stride) of each block.
    stages = [(1, width, 1), (6, _divisible(1.5 * width), 2), (6, _divisible(1.5 * width), 1),
              (6, 2 * width, 2), (6, 2 * width, 1)]
    for block_id, (t, filters, stride) in enumerate(stages):
        x = _inverted_residual(x, t, filters, stride, block_id)
    x = keras.layers.Conv2D(4 * width, 1, use_bias=False, name="Conv_1")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.999, name="Conv_1_bn")(x)
    x = keras.layers.ReLU(6.0, name="out_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name="mobilenetv2_small")


# ------------------------------------------------------------- EfficientNet


def _mbconv(x, expand_ratio, filters, stride, kernel_size, name, se_ratio=0.25):
    """keras.applications.EfficientNet's block (no dropout)."""
    filters_in = x.shape[-1]
    inputs = x
    expanded = filters_in * expand_ratio
    if expand_ratio != 1:
        x = keras.layers.Conv2D(expanded, 1, padding="same", use_bias=False,
                                name=name + "expand_conv")(x)
        x = keras.layers.BatchNormalization(name=name + "expand_bn")(x)
        x = keras.layers.Activation("swish", name=name + "expand_activation")(x)
    x = keras.layers.DepthwiseConv2D(kernel_size, strides=stride, padding="same",
                                     use_bias=False, name=name + "dwconv")(x)
    x = keras.layers.BatchNormalization(name=name + "bn")(x)
    x = keras.layers.Activation("swish", name=name + "activation")(x)
    filters_se = max(1, int(filters_in * se_ratio))
    se = keras.layers.GlobalAveragePooling2D(name=name + "se_squeeze")(x)
    se = keras.layers.Reshape((1, 1, expanded), name=name + "se_reshape")(se)
    se = keras.layers.Conv2D(filters_se, 1, padding="same", activation="swish",
                             name=name + "se_reduce")(se)
    se = keras.layers.Conv2D(expanded, 1, padding="same", activation="sigmoid",
                             name=name + "se_expand")(se)
    x = keras.layers.Multiply(name=name + "se_excite")([x, se])
    x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False,
                            name=name + "project_conv")(x)
    x = keras.layers.BatchNormalization(name=name + "project_bn")(x)
    if stride == 1 and filters_in == filters:
        x = keras.layers.Add(name=name + "add")([x, inputs])
    return x


def efficientnet(input_shape=(28, 28, 1), width=16, num_classes=NUM_CLASSES):
    """An EfficientNet-like net: stem, 5 MBConv blocks with squeeze-excite
    (expand 1, 6, 6, 6, 6; kernels 3 and 5), a 1x1 top conv, GAP -> Dense.

    Args:
        width: channels of the stem and first stage (stages: 1x, 1.5x, 2x).
    """
    validation.check_int(width, "width")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.Activation("swish", name="stem_activation")(x)
    # (expand ratio, output channels, stride, kernel) of each block.
    stages = [(1, width, 1, 3), (6, _divisible(1.5 * width), 2, 3),
              (6, _divisible(1.5 * width), 1, 3), (6, 2 * width, 2, 5), (6, 2 * width, 1, 5)]
    for i, (t, filters, stride, kernel) in enumerate(stages):
        x = _mbconv(x, t, filters, stride, kernel, name=f"block{i + 1}a_")
    x = keras.layers.Conv2D(4 * width, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = keras.layers.BatchNormalization(name="top_bn")(x)
    x = keras.layers.Activation("swish", name="top_activation")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(num_classes, name="predictions")(x)
    return keras.Model(inputs, outputs, name="efficientnet_small")


# ----------------------------------------------------------------- ConvNeXt


@keras.saving.register_keras_serializable(package="keras_blpa")
class LayerScale(keras.layers.Layer):
    """ConvNeXt's layer scale (keras.applications.convnext.LayerScale): the
    input times a learned per-channel gamma.

    Args:
        init_values: initial value of every gamma.
        projection_dim: channels of the input.
    """

    def __init__(self, init_values, projection_dim, **kwargs):
        super().__init__(**kwargs)
        self.init_values = validation.check_number(init_values, "init_values", low=0,
                                                   low_open=True)
        self.projection_dim = validation.check_int(projection_dim, "projection_dim")

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma", shape=(self.projection_dim,),
            initializer=keras.initializers.Constant(self.init_values), trainable=True,
        )

    def call(self, x):
        return x * keras.ops.cast(self.gamma, x.dtype)

    def get_config(self):
        return {**super().get_config(), "init_values": self.init_values,
                "projection_dim": self.projection_dim}


def _convnext_block(x, name, layer_scale_init_value):
    """keras.applications.ConvNeXt's block (no stochastic depth)."""
    channels = x.shape[-1]
    inputs = x
    x = keras.layers.DepthwiseConv2D(7, padding="same", name=name + "_depthwise_conv")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name=name + "_layernorm")(x)
    x = keras.layers.Dense(4 * channels, name=name + "_pointwise_conv_1")(x)
    x = keras.layers.Activation("gelu", name=name + "_gelu")(x)
    x = keras.layers.Dense(channels, name=name + "_pointwise_conv_2")(x)
    if layer_scale_init_value:
        x = LayerScale(layer_scale_init_value, channels, name=name + "_layer_scale")(x)
    return keras.layers.Add(name=name + "_add")([inputs, x])


def convnext(input_shape=(28, 28, 1), width=24, num_classes=NUM_CLASSES,
             depths=(2, 2), layer_scale_init_value=1.0):
    """A ConvNeXt-like net: a 2x2/2 patchify stem with LayerNormalization, two
    stages of ConvNeXt blocks (width, 2 x width) with an LN -> Conv2D 2x2/2
    downsampling between them, GAP -> LayerNormalization -> Dense.

    Args:
        width: channels of the first stage.
        depths: blocks per stage.
        layer_scale_init_value: initial layer scale (0: none). keras.applications
            uses 1e-6, which scales every block's gradient by 1e-6: a few SGD
            epochs would leave the blocks (what convert compresses) untrained
            (measured, exact, 2 epochs of 4096 images: train loss 1.76 with 0.1,
            1.42 with 1.0).
    """
    validation.check_int(width, "width")
    inputs = keras.Input(input_shape)
    x = keras.layers.Conv2D(width, 2, strides=2, name="stem_conv")(inputs)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="stem_layernorm")(x)
    for stage, depth in enumerate(depths):
        if stage:
            x = keras.layers.LayerNormalization(
                epsilon=1e-6, name=f"downsampling_layernorm_{stage - 1}")(x)
            x = keras.layers.Conv2D(width * 2 ** stage, 2, strides=2,
                                    name=f"downsampling_conv_{stage - 1}")(x)
        for i in range(depth):
            x = _convnext_block(x, f"stage_{stage}_block_{i}", layer_scale_init_value)
    x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    x = keras.layers.LayerNormalization(epsilon=1e-6, name="head_layernorm")(x)
    outputs = keras.layers.Dense(num_classes, name="head_dense")(x)
    return keras.Model(inputs, outputs, name="convnext_small")


BUILDERS = {"mobilenetv2": mobilenetv2, "efficientnet": efficientnet, "convnext": convnext}


def build_family(family, input_shape=(28, 28, 1), width=None):
    """The stock net of `family` (default width if None)."""
    family = validation.check_choice(family, "family", FAMILIES)
    kwargs = {} if width is None else {"width": width}
    return BUILDERS[family](input_shape, **kwargs)


def build_mode(family, mode, input_shape=(28, 28, 1), width=None, seed=None,
               return_report=False):
    """The model of `mode`: the stock net for exact, else `keras_blpa.convert` of it
    with the mode's bits and quantization (`modes.code_args`).

    Returns:
        The model, or ``(model, blocks)`` with return_report, ``blocks`` the
        report's ``{block name: [original layers]}`` (empty for exact).
    """
    from keras_blpa import convert

    bits, quantization = modes_lib.code_args(mode)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    stock = build_family(family, input_shape, width)
    if bits is None:
        return (stock, {}) if return_report else stock
    model, report = convert(stock, bits=bits, quantization=quantization, return_report=True)
    return (model, report.blocks) if return_report else model


def conversion_count(family, input_shape=(28, 28, 1), width=None):
    """How many ApproxConvBlocks convert makes of `family`, and their layers."""
    _, blocks = build_mode(family, "blpa4", input_shape, width, return_report=True)
    return len(blocks), blocks


def study(families, modes, seeds, epochs, batch_size, train_samples=None,
          test_samples=None, data_dir=None, width=None, log=print, done=()):
    """Test error, final train loss and epoch time of each family and mode over
    seeds (`accuracy.study`); returns a list of dicts, one per (family, mode),
    with the family's conversion count. Rows for (family, mode) in `done` are
    skipped."""
    data = accuracy.load_data(train_samples, test_samples, data_dir)
    rows = []
    for family in families:
        todo = [m for m in modes if (family, m) not in set(done)]
        if not todo:
            continue
        count, blocks = conversion_count(family, data[0][0].shape[1:], width)
        log(f"families {family}: convert made {count} blocks")
        for row in accuracy.study(
            todo, None, seeds, epochs, batch_size, data=data, log=log, label=family,
            build=lambda mode, shape, family=family: build_mode(family, mode, shape, width),
        ):
            del row["depth"]
            row.update(family=family, width=width, blocks_converted=count,
                       blocks=sorted(blocks))
            rows.append(row)
    return rows


def main(argv=None):
    """``python -m keras_blpa.benchmark.families ...``: the benchmark CLI's
    families part (``--parts families`` added to the flags)."""
    from keras_blpa.benchmark import __main__ as cli

    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.main(["--parts", "families"] + argv)


if __name__ == "__main__":
    sys.exit(main())
