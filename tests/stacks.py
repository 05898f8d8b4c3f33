"""The allocator peak of one training step of a deep stack in its own process
(the stacks are `keras_blpa.benchmark.stacks`', shared with the block-step
benchmark), and the activations the tests use."""

import json
import os
import subprocess
import sys
import textwrap


# The block's activations with the arguments the tests use (leaky_relu: a slope
# other than the default).
ACTIVATIONS = [
    ("relu", None), ("relu6", None), ("leaky_relu", 0.1), ("linear", None),
    ("silu", None), ("gelu", None), ("gelu_approximate", None), ("hard_silu", None),
]
PIECEWISE_LINEAR = ("relu", "relu6", "leaky_relu", "linear")


_STEP = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf
    import keras_blpa

    from keras_blpa.benchmark.stacks import STACKS

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
    of `keras_blpa.benchmark.stacks.STACKS[stack]` in a fresh process (TensorFlow,
    CPU BFC statistics)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["KERAS_BLPA_PURE_TF"] = "1" if pure_tf else "0"
    args = [stack, mode, activation, str(depth), str(channels), str(size), str(batch)]
    out = subprocess.run([sys.executable, "-c", _STEP, *args], env=env, capture_output=True,
                         text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

