"""A folded ZeroPadding2D in the backward ops (backends/tensorflow/block.py).

TensorFlow's CPU Conv2DBackpropInput is slow with "EXPLICIT" padding, so the
block's backward passes a folded padding that equals "SAME" as "SAME", and any
other one as the gradient of the VALID conv of the padded input, cropped. The
gradients must be those of the raw ops with "EXPLICIT" padding (the code before
the change, rebuilt here), and close to the stock chain's
BN -> ReLU -> ZeroPadding2D -> conv.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from chains import cosine
from keras_blpa import ApproxConvBlock
from keras_blpa.backends.tensorflow import block as tf_block

# (kind, kernel, strides, explicit padding, input shape): the SAME case
# (ResNet50V2's 3x3 heads, here at 2x2 as conv5 at 64x64), stride-2 (1, 1) and
# MobileNet's/EfficientNet's stride-2 ((0, 1), (0, 1)) and a 5x5 depthwise, an
# asymmetric stride-1 padding (not SAME).
CASES = [
    ("conv", 3, 1, ((1, 1), (1, 1)), (4, 2, 2, 6)),
    ("conv", 3, 2, ((1, 1), (1, 1)), (4, 6, 6, 6)),
    ("conv", 3, 1, ((1, 0), (0, 2)), (4, 5, 5, 6)),
    ("depthwise", 3, 2, ((0, 1), (0, 1)), (4, 7, 7, 6)),
    ("depthwise", 5, 1, ((2, 2), (2, 2)), (4, 6, 6, 6)),
]


def _explicit_args(head):
    (top, bottom), (left, right) = head.explicit_padding
    return {"strides": (1,) + head.strides + (1,), "padding": "EXPLICIT",
            "explicit_paddings": [0, 0, top, bottom, left, right, 0, 0]}


def _explicit_input_gradient(a_shape, kernel, d_out, head):
    op = (tf.raw_ops.DepthwiseConv2dNativeBackpropInput if head.kind == "depthwise"
          else tf.raw_ops.Conv2DBackpropInput)
    return op(input_sizes=a_shape, filter=kernel, out_backprop=d_out, **_explicit_args(head))


def _block(kind, kernel, strides, pad):
    head = dict(kind=kind, kernel_size=kernel, strides=strides, padding="valid",
                explicit_padding=pad)
    if kind == "conv":
        head["filters"] = 5
    return ApproxConvBlock(heads=[head], bits=8)


def _gradients(layer, x, dy):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * dy)
    return [g.numpy() for g in tape.gradient(loss, [x] + layer.trainable_weights)]


@pytest.mark.parametrize("kind,kernel,strides,pad,shape", CASES)
def test_padded_backward_equals_explicit_ops(ops_path, monkeypatch, kind, kernel, strides, pad, shape):
    rng = np.random.default_rng(7)
    x = rng.normal(0.3, 1.2, shape).astype(np.float32)
    layer = _block(kind, kernel, strides, pad)
    y = layer(x, training=True)
    layer.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) + (1.0 if i == 0 else 0.0)
                       for i, w in enumerate(layer.get_weights())])
    dy = rng.normal(size=y.shape).astype(np.float32)
    got = _gradients(layer, x, dy)
    # The code before: every backward op with "EXPLICIT" padding.
    monkeypatch.setattr(tf_block, "_same_padding", lambda head: False)
    monkeypatch.setattr(tf_block, "_input_gradient", _explicit_input_gradient)
    want = _gradients(layer, x, dy)
    assert len(got) == len(want) == 1 + len(layer.trainable_weights)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    # And close to the stock chain (8-bit backward).
    conv = (keras.layers.DepthwiseConv2D(kernel, strides=strides, use_bias=False) if kind == "depthwise"
            else keras.layers.Conv2D(5, kernel, strides=strides, use_bias=False))
    stock = keras.Sequential([keras.layers.BatchNormalization(), keras.layers.ReLU(),
                              keras.layers.ZeroPadding2D(pad), conv])
    stock.build(shape)
    block_weights = {w.name: w.numpy() for w in layer.weights}
    stock.layers[0].set_weights([block_weights[n] for n in ("gamma", "beta", "moving_mean",
                                                             "moving_variance")])
    conv.set_weights([block_weights["kernel"]])
    np.testing.assert_allclose(layer(x, training=True), stock(x, training=True), rtol=1e-5, atol=1e-5)
    ref = _gradients(stock, x, dy)
    for g, r in zip(got, ref):
        assert cosine(g, r) >= 0.99, (kind, pad, cosine(g, r))


def test_same_padding_is_recognised():
    from keras_blpa.blocks import Head

    def head(kernel, strides, pad):
        return Head(kind="conv", filters=1, kernel_size=kernel, strides=strides,
                    padding="valid", explicit_padding=pad)

    assert tf_block._same_padding(head((3, 3), (1, 1), ((1, 1), (1, 1))))
    assert tf_block._same_padding(head((4, 2), (1, 1), ((1, 2), (0, 1))))
    assert not tf_block._same_padding(head((3, 3), (2, 2), ((1, 1), (1, 1))))
    assert not tf_block._same_padding(head((3, 3), (1, 1), ((0, 2), (1, 1))))
    assert tf_block._conv_args(head((3, 3), (1, 1), ((1, 1), (1, 1))))["padding"] == "EXPLICIT"
    assert tf_block._conv_args(head((3, 3), (1, 1), ((1, 1), (1, 1))), backward=True)["padding"] == "SAME"
