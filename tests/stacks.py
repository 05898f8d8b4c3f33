"""The memory of one training step of a deep stack: the TensorFlow allocator's
peak in its own process, and JAX's compiled-step temp bytes (the stacks are
`keras_blpa.benchmark.stacks`', shared with the block-step benchmark); and the
activations the tests use."""

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



def step_temp_bytes(model, batch):
    """JAX: temp_size_in_bytes of the compiled training step of `model` (loss
    mean(y^2), gradients, new state), XLA's buffer assignment, without running it."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(trainable, fixed, data):
        y, fixed = model.stateless_call(trainable, fixed, data, training=True)
        return jnp.mean(jnp.square(y)), fixed

    def step(trainable, fixed, data):
        return jax.value_and_grad(loss, has_aux=True)(trainable, fixed, data)

    data = jax.ShapeDtypeStruct((batch,) + model.input_shape[1:], jnp.float32)
    compiled = jax.jit(step).lower(trainable, fixed, data).compile()
    return compiled.memory_analysis().temp_size_in_bytes
