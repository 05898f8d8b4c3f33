"""Heads other than Conv2D: DepthwiseConv2D, Dense on the channel axis, SeparableConv2D.

Each is checked against the stock Keras chain BatchNormalization -> activation
-> layer (an independent reference): the forward pass equal, the gradients
close (cosine per variable; the BN shift's gradient exact for piecewise-linear
activations, whose derivative the code gives exactly), saving and loading,
`keras_blpa.convert`, and the allocator peak of a deep depthwise stack.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from chains import cosine
from keras_blpa import ApproxConvBlock
from keras_blpa.blocks import Head
from stacks import peak_bytes

SHAPE = (4, 10, 10, 6)
# name: (stock layer, block arguments); a SeparableConv2D is a depthwise block
# followed by a stock 1x1 Conv2D with its pointwise kernel and bias.
CASES = {
    "depthwise": (
        lambda: keras.layers.DepthwiseConv2D(3, padding="same", use_bias=True),
        dict(kind="depthwise", kernel_size=3, padding="same", use_bias=True),
    ),
    "depthwise_s2_valid_m2": (
        lambda: keras.layers.DepthwiseConv2D(3, strides=2, padding="valid", depth_multiplier=2),
        dict(kind="depthwise", kernel_size=3, strides=2, padding="valid", depth_multiplier=2,
             use_bias=True),
    ),
    "dense": (lambda: keras.layers.Dense(7), dict(kind="dense", filters=7, use_bias=True)),
    "separable": (
        lambda: keras.layers.SeparableConv2D(7, 3, padding="same"),
        dict(kind="depthwise", kernel_size=3, padding="same"),
    ),
    "separable_s2_valid_m2": (
        lambda: keras.layers.SeparableConv2D(5, 3, strides=2, padding="valid", depth_multiplier=2),
        dict(kind="depthwise", kernel_size=3, strides=2, padding="valid", depth_multiplier=2),
    ),
}
ACTIVATIONS = {
    "relu": lambda: keras.layers.ReLU(),
    "relu6": lambda: keras.layers.ReLU(6.0),
    "swish": lambda: keras.layers.Activation("swish"),
}
BLOCK_ACTIVATION = {"relu": "relu", "relu6": "relu6", "swish": "silu"}


def stock_and_block(case, activation, bits, seed=0):
    """(stock model, block model) with the same weights: Input -> BN -> activation
    -> layer, and Input -> ApproxConvBlock [-> 1x1 Conv2D for a SeparableConv2D].

    BN: gamma of both signs, beta and moving statistics random; the stock layer's
    kernels and biases random (biases nonzero)."""
    rng = np.random.default_rng(seed)
    make, arguments = CASES[case]
    inp = keras.Input(SHAPE[1:])
    bn = keras.layers.BatchNormalization()
    layer = make()
    stock = keras.Model(inp, layer(ACTIVATIONS[activation]()(bn(inp))))
    channels = SHAPE[-1]
    gamma = rng.uniform(0.3, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    bn.set_weights([gamma, rng.normal(0, 0.5, channels), rng.normal(0, 0.3, channels),
                    rng.uniform(0.5, 2.0, channels)])
    layer.set_weights([rng.normal(0, 0.5, w.shape) for w in layer.get_weights()])

    block = ApproxConvBlock(**arguments, bits=bits, activation=BLOCK_ACTIVATION[activation])
    inp = keras.Input(SHAPE[1:])
    out = block(inp)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        getattr(block, name).assign(getattr(bn, name))
    if case.startswith("separable"):
        pointwise = keras.layers.Conv2D(layer.filters, 1)
        out = pointwise(out)
        pointwise.set_weights([layer.pointwise_kernel.numpy(), layer.bias.numpy()])
        block.kernel.assign(layer.depthwise_kernel)
    else:
        block.kernel.assign(layer.kernel)
        block.bias.assign(layer.bias)
    return stock, keras.Model(inp, out)


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    offset = rng.normal(0, 1, SHAPE[-1])
    return (rng.normal(size=SHAPE) + offset).astype(np.float32)


def gradients(model, x):
    """[d_x] + the trainable variables' gradients of sum(sin(y) * y), y = model(x) in
    training (the forward is exact, so dL/dy is too)."""
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = model(x, training=True)
        loss = tf.reduce_sum(tf.sin(y) * y)
    return [g.numpy() for g in tape.gradient(loss, [x] + model.trainable_variables)]


def test_block_weights_have_the_stock_layers_shapes():
    stock, blpa = stock_and_block("depthwise_s2_valid_m2", "relu", 4)
    block = blpa.layers[1]
    assert block.kernel.shape == (3, 3, 6, 2) and block.kernel.shape == stock.layers[-1].kernel.shape
    assert block.compute_output_shape((None,) + SHAPE[1:]) == (None, 4, 4, 12)
    stock, blpa = stock_and_block("dense", "relu", 4)
    assert blpa.layers[1].kernel.shape == (6, 7) and blpa.layers[1].bias.shape == (7,)
    assert blpa.layers[1].compute_output_shape((2, 5, 3, 6)) == (2, 5, 3, 7)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_stock(ops_path, case, activation, training):
    stock, blpa = stock_and_block(case, activation, bits=4)
    x = inputs()
    np.testing.assert_allclose(
        blpa(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_close_to_stock(ops_path, case, activation, bits):
    """Cosine per variable >= 0.999 at 8 bits, >= 0.99 at 4 (0.97 for swish, whose
    derivative is the mean over the code's bin); d_beta exact for relu and relu6
    (the forward is exact, so dL/da is too, and the code gives the exact mask)."""
    stock, blpa = stock_and_block(case, activation, bits)
    x = inputs()
    g_stock, g = gradients(stock, x), gradients(blpa, x)
    assert [a.shape for a in g] == [a.shape for a in g_stock]
    bound = 0.999 if bits == 8 else (0.97 if activation == "swish" else 0.99)
    for i, (a, b) in enumerate(zip(g, g_stock)):
        print(f"cosine {case} {activation} {bits} bits, gradient {i}: {cosine(a, b):.5f}")
        assert cosine(a, b) >= bound, (i, cosine(a, b))
    if activation != "swish":
        np.testing.assert_allclose(g[2], g_stock[2], rtol=1e-4, atol=1e-4)  # d_beta


def test_heads_of_every_kind_share_one_code(ops_path):
    """One block with a conv, a depthwise and a dense head: each output is the
    stock layer's on the same activation, and d_beta sums the three heads' exactly."""
    rng = np.random.default_rng(3)
    block = ApproxConvBlock(heads=[
        dict(filters=5, kernel_size=3),
        dict(kind="depthwise", kernel_size=3, strides=2, depth_multiplier=2, use_bias=True),
        dict(kind="dense", filters=4),
    ], activation="relu6", bits=4)
    x = inputs()
    outs = block(x, training=True)
    assert [tuple(o.shape) for o in outs] == [(4, 10, 10, 5), (4, 5, 5, 12), (4, 10, 10, 4)]
    for w in block.weights:
        if w.trainable:
            w.assign(rng.normal(0, 0.5, w.shape))
    stock_layers = [keras.layers.Conv2D(5, 3, padding="same", use_bias=False),
                    keras.layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2),
                    keras.layers.Dense(4, use_bias=False)]
    bn = keras.layers.BatchNormalization()
    inp = keras.Input(SHAPE[1:])
    a = keras.layers.ReLU(6.0)(bn(inp))
    stock = keras.Model(inp, [layer(a) for layer in stock_layers])
    bn.set_weights([w.numpy() for w in (block.gamma, block.beta, block.moving_mean, block.moving_variance)])
    stock_layers[0].set_weights([block.kernels[0].numpy()])
    stock_layers[1].set_weights([block.kernels[1].numpy(), block.biases[1].numpy()])
    stock_layers[2].set_weights([block.kernels[2].numpy()])

    def grads(model, variables):
        with tf.GradientTape() as tape:
            loss = sum(tf.reduce_sum(tf.sin(o) * o) for o in model(x, training=True))
        return tape.gradient(loss, variables)

    g = grads(block, [block.beta] + block.kernels)
    g_stock = grads(stock, [bn.beta] + [layer.kernel for layer in stock_layers])
    np.testing.assert_allclose(g[0], g_stock[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(g[1:], g_stock[1:]):
        assert cosine(a, b) >= 0.99
    for o, o_stock in zip(block(x, training=True), stock(x, training=True)):
        np.testing.assert_allclose(o, o_stock, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["depthwise_s2_valid_m2", "dense", "separable"])
def test_keras_file_round_trip(tmp_path, case):
    stock, blpa = stock_and_block(case, "relu6", bits=4)
    path = os.path.join(tmp_path, "model.keras")
    blpa.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[1].heads == blpa.layers[1].heads
    assert loaded.layers[1].get_config() == blpa.layers[1].get_config()
    x = inputs()
    for training in (False, True):
        np.testing.assert_allclose(loaded(x, training=training), blpa(x, training=training), rtol=1e-6)


def test_head_arguments_are_checked():
    with pytest.raises(ValueError, match="depth_multiplier, not filters"):
        Head.from_dict(dict(kind="depthwise", filters=4, kernel_size=3))
    with pytest.raises(ValueError, match="kind='depthwise' heads only"):
        Head.from_dict(dict(filters=4, kernel_size=3, depth_multiplier=2))
    with pytest.raises(ValueError, match="kernel_size must be 1"):
        Head.from_dict(dict(kind="dense", filters=4, kernel_size=3))
    with pytest.raises(ValueError, match="kind"):
        Head.from_dict(dict(kind="pointwise", filters=4, kernel_size=1))
    with pytest.raises(ValueError, match="heads, not both"):
        ApproxConvBlock(kind="depthwise", heads=[dict(filters=4, kernel_size=3)])
    with pytest.raises(ValueError, match="does not fit"):
        ApproxConvBlock(kernel_size=5, kind="depthwise", padding="valid")(np.zeros((1, 4, 4, 2)))
    # A head config without a kind (saved before kinds existed) is a conv head.
    assert Head.from_dict(dict(filters=4, kernel_size=3)).kind == "conv"
    config = ApproxConvBlock(4, 3).get_config()
    del config["kind"], config["depth_multiplier"]
    assert ApproxConvBlock.from_config(config).heads[0].kind == "conv"


def mixed_model():
    """Conv2D stem, then BN -> ReLU6 -> ZeroPadding2D -> DepthwiseConv2D(stride 2),
    BN -> swish -> SeparableConv2D, BN -> ReLU -> Dense (on NHWC), classifier."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 12, 3))
    # No stem bias: its gradient through the BN is round-off only.
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    h = keras.layers.ReLU(6.0, name="relu6")(keras.layers.BatchNormalization(name="bn1")(h))
    h = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="pad")(h)
    h = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid", depth_multiplier=2,
                                     use_bias=False, name="dw")(h)
    h = keras.layers.Activation("swish", name="swish")(keras.layers.BatchNormalization(name="bn2")(h))
    h = keras.layers.SeparableConv2D(10, 3, padding="same", use_bias=False, name="sep")(h)
    h = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn3")(h))
    h = keras.layers.Dense(6, name="pointwise")(h)
    out = keras.layers.Dense(3, name="classifier")(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out)


def test_convert_makes_heads_of_each_layer_kind(ops_path):
    """The three chains become blocks of kind depthwise (padding folded), depthwise
    (+ the SeparableConv2D's pointwise part, a stock 1x1 Conv2D named after it)
    and dense; the forward is the original's; the gradients are the original's with
    exact blocks (bits=None) and close at 8 bits (all together: a BN after a head
    makes some of its gradients small, e.g. bn1's gamma, so that their cosine
    measures round-off, checked per variable in the tests above); the report keeps
    the separable's float depthwise output and the codes."""
    model = mixed_model()
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.set_weights([rng.uniform(0.5, 1.5, layer.gamma.shape), rng.normal(0, 0.5, layer.beta.shape),
                               rng.normal(0, 0.2, layer.beta.shape), rng.uniform(0.5, 2, layer.beta.shape)])
    converted, report = keras_blpa.convert(model, bits=8, return_report=True, batch_size=2)
    blocks = {l.name: l for l in converted.layers if isinstance(l, ApproxConvBlock)}
    assert sorted(blocks) == ["dw", "pointwise", "sep_depthwise"]
    assert blocks["dw"].heads[0].explicit_padding == ((0, 1), (0, 1))
    assert [blocks[n].heads[0].kind for n in ("dw", "sep_depthwise", "pointwise")] == [
        "depthwise", "depthwise", "dense"
    ]
    assert blocks["dw"].heads[0].depth_multiplier == 2
    assert blocks["sep_depthwise"].activation.name == "silu"
    sep = converted.get_layer("sep")
    assert type(sep) is keras.layers.Conv2D and sep.kernel.shape == (1, 1, 16, 10)
    assert not sep.use_bias
    np.testing.assert_array_equal(blocks["pointwise"].kernel.numpy(), model.get_layer("pointwise").kernel.numpy())
    x = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(converted(x, training=training), model(x, training=training),
                                   rtol=1e-5, atol=1e-6)
    g, g_ref = gradients(converted, x), gradients(model, x)
    assert [a.shape for a in g] == [b.shape for b in g_ref]
    assert cosine(np.concatenate([a.ravel() for a in g]), np.concatenate([b.ravel() for b in g_ref])) >= 0.999
    for a, b in zip(gradients(keras_blpa.convert(model, bits=None), x), g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
    rows = {row.name: row for row in report.layers}
    # The separable's depthwise output (2 x 6 x 6 x 16 float32) stays float.
    assert rows["sep"].after == 2 * 6 * 6 * 16 * 4
    assert rows["sep"].before == 2 * 6 * 6 * 16 * 4 * 2
    assert rows["bn1"].after == 2 * 12 * 12 * 8  # the 8-bit code
    assert rows["dw"].after == rows["pointwise"].after == 0


def test_convert_keeps_dense_on_2d_and_activated_heads():
    """A Dense on a 2D input is no head (and gets no head reason); a DepthwiseConv2D
    with an activation stays float with that reason."""
    inp = keras.Input((8, 8, 4))
    h = keras.layers.ReLU(name="act")(keras.layers.BatchNormalization(name="bn")(inp))
    h = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.ReLU(name="act2")(keras.layers.BatchNormalization(name="bn2")(h))
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(h))
    with pytest.warns(UserWarning, match="nothing|no BatchNormalization"):
        _, report = keras_blpa.convert(model, return_report=True)
    reasons = {row.name: row.reason for row in report.layers}
    assert "DepthwiseConv2D 'dw' has an activation" in reasons["bn"]
    assert "Dense" not in (reasons["out"] or "").split(" has ")[0]


@pytest.mark.slow
def test_depthwise_stack_peak_is_lower_than_stock(ops_path):
    """20 BN -> ReLU6 -> DepthwiseConv2D(3x3) units with identity adds, 64 channels
    at 32x32, batch 64 (16 MiB per activation): stock keeps three float tensors a
    unit (BN input, ReLU6 input, depthwise input), the blocks a 4-bit code (2 MiB).
    Measured (CPU BFC allocator, TF 2.21): stock 704 MiB; 4-bit 128 MiB native
    (5.5x), 188 MiB pure-TF (3.7x, its decode temporaries are larger); asserted
    >= 3x, a margin below the pure-TF figure."""
    pure_tf = ops_path == "reference"
    sizes = dict(depth=20, activation="relu6")
    stock = peak_bytes("depthwise", "stock", pure_tf, **sizes)["peak"]
    result = peak_bytes("depthwise", "4", pure_tf, **sizes)
    assert result["native"] == (not pure_tf)
    ratio = stock / result["peak"]
    assert ratio >= 3.0, f"stock {stock / 2**20:.0f} MiB, 4-bit {result['peak'] / 2**20:.0f} MiB"
