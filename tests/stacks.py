"""The deep residual stack the memory tests measure, one definition for both backends."""

import keras

from keras_blpa import ApproxConvBlock
from keras_blpa import ResidualBuffer


def residual_stack(mode, depth=30, channels=64, size=32):
    """`depth` BN -> ReLU -> 3x3 conv blocks with identity shortcuts (seed 0).

    mode: "stock" (stock Keras layers) or a bit width as a string ("8", "4",
    "2": ApproxConvBlock + ResidualBuffer).
    """
    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, channels))
    x = inp
    for _ in range(depth):
        if mode == "stock":
            y = keras.layers.BatchNormalization()(x)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)(y)
            x = keras.layers.Add()([y, x])
        else:
            y = ApproxConvBlock(channels, 3, bits=int(mode))(x)
            x = ResidualBuffer()([y, x])
    return keras.Model(inp, x)
