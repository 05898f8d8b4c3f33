"""The block against the stock Keras chain it replaces, one definition for the
TensorFlow tests (layers, activations, normalisations, heads, convert): outputs
and moving statistics, gradients, and the gradient goals."""

import numpy as np
import tensorflow as tf

# Gradient cosine against the stock chain, per variable, by activation kind and bits.
GOALS = {"piecewise_linear": {8: 0.999, 4: 0.99}, "smooth": {8: 0.99, 4: 0.97}}


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_gradients_meet_goal(got, want, goal):
    """Each gradient's cosine with the stock one is at least `goal`, and its relative
    error ``|got - want| / |want|`` at most ``sqrt(2 (1 - goal))``, what that cosine
    allows at equal norms (so a wrong scale fails too)."""
    bound = np.sqrt(2.0 * (1.0 - goal))
    cosines = [cosine(a, b) for a, b in zip(got, want)]
    errors = [float(np.linalg.norm(np.ravel(a) - np.ravel(b)) / np.linalg.norm(b))
              for a, b in zip(got, want)]
    assert len(got) == len(want) and min(cosines) >= goal, cosines
    assert max(errors) <= bound, (errors, bound)


def input_and_weight_gradients(layer, x, dy):
    """Gradients of ``sum(layer(x, training=True) * dy)`` w.r.t. x and the trainable weights."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * dy)
    return tape.gradient(loss, [x] + layer.trainable_weights)


def channels_first(*layers):
    """Stock channels_last `layers` on an NCHW tensor (NCHW in and out).

    The reference of a channels_first chain: TensorFlow's CPU Conv2D runs NCHW
    only through oneDNN (off by default on CPUs without AVX-512), so the stock
    layers run on the transposed tensor, as Keras' own channels_first fallback
    would."""
    import keras

    return keras.Sequential(
        [keras.layers.Permute((2, 3, 1)), *layers, keras.layers.Permute((3, 1, 2))]
    )


def assert_forward_and_statistics_match(block, stock, x):
    """Both modes' outputs equal the stock chain's, and the moving statistics are
    updated exactly as its keras.layers.BatchNormalization (its first) updates them."""
    for training in (True, False):
        np.testing.assert_allclose(
            block(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5
        )
    import keras

    bn = next(l for l in stock.layers if isinstance(l, keras.layers.BatchNormalization))
    np.testing.assert_allclose(block.moving_mean, bn.moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(block.moving_variance, bn.moving_variance, rtol=1e-6, atol=1e-6)
