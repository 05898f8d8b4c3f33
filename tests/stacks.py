"""The deep stacks the memory tests measure (one definition for both backends), the
allocator peak of one training step of a stack in its own process, and the stock
Keras layer a user writes for each activation of the block."""

import json
import os
import subprocess
import sys
import textwrap

import keras

from keras_blpa import ApproxConvBlock
from keras_blpa import ResidualBuffer
from keras_blpa.blocks import Activation

# The block's activations with the arguments the tests use (leaky_relu: a slope
# other than the default).
ACTIVATIONS = [
    ("relu", None), ("relu6", None), ("leaky_relu", 0.1), ("linear", None),
    ("silu", None), ("gelu", None), ("gelu_approximate", None), ("hard_silu", None),
]
PIECEWISE_LINEAR = ("relu", "relu6", "leaky_relu", "linear")


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


STACKS = {"residual": residual_stack, "depthwise": depthwise_stack, "layer_norm": layer_norm_stack}

_STEP = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    import keras_blpa

    from stacks import STACKS

    stack, mode, activation = sys.argv[1:4]
    depth, channels, size, batch = map(int, sys.argv[4:])
    model = STACKS[stack](mode, depth, channels, size, activation=activation)
    data = tf.random.normal([batch, size, size, channels])

    @tf.function
    def step(d):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(d, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        return loss, tf.add_n([tf.reduce_sum(g) for g in grads])

    step(data)
    with keras_blpa.memory.PeakMemory() as peak:
        step(data)
    print(json.dumps({"peak": peak.peak_bytes, "native": keras_blpa.native_ops_available()}))
    """
)


def peak_bytes(stack, mode, pure_tf, depth=30, channels=64, size=32, batch=64, activation="relu"):
    """{"peak": allocator peak bytes of one training step, "native": native ops used}
    of `STACKS[stack]` in a fresh process (TensorFlow, CPU BFC statistics)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BLPA_PURE_TF"] = "1" if pure_tf else "0"
    tests = os.path.dirname(os.path.abspath(__file__))  # for this module
    env["PYTHONPATH"] = os.pathsep.join(p for p in (tests, env.get("PYTHONPATH")) if p)
    args = [stack, mode, activation, str(depth), str(channels), str(size), str(batch)]
    out = subprocess.run([sys.executable, "-c", _STEP, *args], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])
