"""The deep stacks that the memory tests and the block-step benchmark measure.

Each builder returns a functional model of `depth` units of one chain, in the
stock Keras layers a user writes ("stock") or as keras_blpa layers (a bit
width as a string, "8", "4", "2"), with the same shapes and seed.
"""

import keras

from keras_blpa import ApproxConvBlock
from keras_blpa import ArgmaxPooling2D
from keras_blpa import ResidualBuffer
from keras_blpa.blocks import Activation

__all__ = ["STACKS", "depthwise_stack", "layer_norm_stack", "pool_stack", "residual_stack",
           "squeeze_excite_stack", "stock_activation"]


def stock_activation(name, negative_slope=None):
    """The stock Keras layer of the block's activation `name`, as models write it."""
    return Activation.get(name, negative_slope).stock_layer()


def residual_stack(mode, depth=30, channels=64, size=32, activation="relu"):
    """`depth` BN -> activation -> 3x3 conv blocks with identity shortcuts (seed 0).

    mode: "stock" (stock Keras layers) or a bit width as a string ("8", "4",
    "2": ApproxConvBlock + ResidualBuffer).
    """
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, channels))
    x = inp
    for _ in range(depth):
        if mode == "stock":
            y = keras.layers.BatchNormalization()(x)
            y = stock_activation(activation)(y)
            y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
            x = keras.layers.Add()([y, x])
        else:
            y = ApproxConvBlock(channels, 3, bits=int(mode), activation=activation)(x)
            x = ResidualBuffer()([y, x])
    return keras.Model(inp, x)


def depthwise_stack(mode, depth=20, channels=64, size=32, activation="relu6"):
    """`depth` BN -> activation -> 3x3 DepthwiseConv2D units with identity adds (seed 0).

    mode: "stock" or a bit width as a string (depthwise-head ApproxConvBlocks).
    """
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, channels))
    x = inp
    for _ in range(depth):
        if mode == "stock":
            h = stock_activation(activation)(keras.layers.BatchNormalization()(x))
            h = keras.layers.DepthwiseConv2D(3, padding="same")(h)
        else:
            h = ApproxConvBlock(kernel_size=3, kind="depthwise", use_bias=True,
                                activation=activation, bits=int(mode))(x)
        x = keras.layers.Add()([x, h])
    return keras.Model(inp, x)


def squeeze_excite_stack(mode, depth=20, channels=64, size=32, activation="silu"):
    """`depth` BN -> activation -> squeeze-excite (EfficientNet's: GAP, 1x1 convs to
    channels / 4 with silu and back with sigmoid, Multiply) -> 1x1 conv units with
    identity adds (seed 0). mode: "stock" or a bit width as a string."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, channels))
    x = inp
    reduced = channels // 4
    for _ in range(depth):
        if mode == "stock":
            a = stock_activation(activation)(keras.layers.BatchNormalization()(x))
            s = keras.layers.Reshape((1, 1, channels))(keras.layers.GlobalAveragePooling2D()(a))
            s = keras.layers.Conv2D(reduced, 1, activation="silu")(s)
            s = keras.layers.Conv2D(channels, 1, activation="sigmoid")(s)
            h = keras.layers.Conv2D(channels, 1, use_bias=False)(keras.layers.Multiply()([a, s]))
        else:
            h = ApproxConvBlock(channels, 1, activation=activation, bits=int(mode),
                                squeeze_excite=dict(filters=reduced, activation="silu"))(x)
        x = keras.layers.Add()([x, h])
    return keras.Model(inp, x)


def pool_stack(mode, depth=8, channels=32, size=32, activation="relu"):
    """`depth` 4-bit blocks, each followed by a 3x3 stride-1 "same" max pooling (seed 0).

    mode: "stock" (keras.layers.MaxPooling2D) or "argmax" / a bit width
    (ArgmaxPooling2D; the blocks are 4-bit in every mode). A
    block keeps the 4-bit code of its input, not its float output, so the
    pooling's input (and its output, which the next block codes) is kept only
    by a stock pooling's backward.
    """
    keras.utils.set_random_seed(0)
    pool = keras.layers.MaxPooling2D if mode == "stock" else ArgmaxPooling2D
    inp = keras.Input((size, size, channels))
    x = inp
    for _ in range(depth):
        x = ApproxConvBlock(channels, 3, bits=4, activation=activation)(x)
        x = pool(3, strides=1, padding="same")(x)
    return keras.Model(inp, x)


def layer_norm_stack(mode, depth=20, channels=64, size=32, activation="linear"):
    """`depth` ConvNeXt-like LayerNormalization(epsilon=1e-6) -> activation -> Dense(C)
    units with identity adds (seed 0).

    mode: "stock" or a bit width as a string (normalization="layer" dense-head blocks).
    """
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, channels))
    x = inp
    for _ in range(depth):
        if mode == "stock":
            h = stock_activation(activation)(keras.layers.LayerNormalization(epsilon=1e-6)(x))
            h = keras.layers.Dense(channels, use_bias=False)(h)
        else:
            h = ApproxConvBlock(channels, kind="dense", normalization="layer", epsilon=1e-6,
                                activation=activation, bits=int(mode))(x)
        x = keras.layers.Add()([x, h])
    return keras.Model(inp, x)


STACKS = {"residual": residual_stack, "depthwise": depthwise_stack,
          "squeeze_excite": squeeze_excite_stack, "pool": pool_stack,
          "layer_norm": layer_norm_stack}
