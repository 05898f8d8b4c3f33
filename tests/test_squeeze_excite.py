"""The squeeze-excite gate between the block's activation and its heads.

Checked against the stock Keras chain it replaces, written as EfficientNet
writes it (an independent reference): BatchNormalization -> activation ->
[GlobalAveragePooling2D -> Reshape -> Conv2D(1x1, activation) -> Conv2D(1x1,
sigmoid)] -> Multiply -> head. The forward pass equal, the gradients close
(cosine per variable, the gate's four weights included), saving and loading,
`return_activation`, and the allocator peak of a deep stack.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from chains import GOALS
from chains import assert_gradients_meet_goal
from chains import cosine
from keras_blpa import ApproxConvBlock
from keras_blpa.benchmark.stacks import stock_activation
from keras_blpa.blocks import SqueezeExcite
from stacks import peak_bytes

SHAPE = (4, 8, 8, 6)
REDUCED = 3
# (block activation, gate's inner activation, gate): EfficientNet's (silu, silu,
# sigmoid), MobileNetV3's (hard_silu, relu, hard_sigmoid), and a ReLU block.
CASES = [("silu", "silu", "sigmoid"), ("hard_silu", "relu", "hard_sigmoid"),
         ("relu", "relu", "sigmoid")]
HEADS = {
    "conv": (lambda: keras.layers.Conv2D(5, 1, use_bias=False), dict(filters=5, kernel_size=1)),
    "depthwise": (lambda: keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False),
                  dict(kind="depthwise", kernel_size=3)),
}


def stock_gate(a, channels, inner, gate):
    """The stock squeeze-excite of `a` (EfficientNet's layers): returns (a * s, layers)."""
    reduce = keras.layers.Conv2D(REDUCED, 1, padding="same", activation=inner)
    gate_fn = "sigmoid" if gate == "sigmoid" else keras.activations.hard_sigmoid
    expand = keras.layers.Conv2D(channels, 1, padding="same", activation=gate_fn)
    s = keras.layers.GlobalAveragePooling2D()(a)
    s = expand(reduce(keras.layers.Reshape((1, 1, channels))(s)))
    return keras.layers.Multiply()([a, s]), (reduce, expand)


def stock_and_block(case, head, bits, seed=0, return_activation=False):
    """(stock model, block model) with the same random weights (gamma of both signs)."""
    activation, inner, gate = case
    rng = np.random.default_rng(seed)
    channels = SHAPE[-1]
    make, arguments = HEADS[head]
    inp = keras.Input(SHAPE[1:])
    bn = keras.layers.BatchNormalization()
    a = stock_activation(activation)(bn(inp))
    gated, (reduce, expand) = stock_gate(a, channels, inner, gate)
    layer = make()
    outs = [layer(gated)] + ([a] if return_activation else [])
    stock = keras.Model(inp, outs)
    gamma = rng.uniform(0.3, 1.5, channels) * rng.choice([-1.0, 1.0], channels)
    bn.set_weights([gamma, rng.normal(0, 0.5, channels), rng.normal(0, 0.3, channels),
                    rng.uniform(0.5, 2.0, channels)])
    for stock_layer in (layer, reduce, expand):
        stock_layer.set_weights([rng.normal(0, 0.5, w.shape) for w in stock_layer.get_weights()])

    block = ApproxConvBlock(**arguments, bits=bits, activation=activation,
                            return_activation=return_activation,
                            squeeze_excite=dict(filters=REDUCED, activation=inner, gate=gate))
    inp = keras.Input(SHAPE[1:])
    out = block(inp)
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        getattr(block, name).assign(getattr(bn, name))
    block.kernel.assign(layer.kernel)
    gate = [reduce.kernel, reduce.bias, expand.kernel, expand.bias]
    for w, source in zip(block.gate_weights, gate):
        w.assign(source)
    # The stock variables in the block's order: gamma, beta, kernel, the gate's.
    stock.ordered_variables = [bn.gamma, bn.beta, layer.kernel] + gate
    return stock, keras.Model(inp, out)


def inputs(seed=1):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=SHAPE) + rng.normal(0, 1, SHAPE[-1])).astype(np.float32)


def gradients(model, x):
    """[d_x] + the trainable variables' gradients of sum(sin(y) * y) over the outputs
    (a stock model's in the block's order)."""
    x = tf.constant(x)
    variables = getattr(model, "ordered_variables", model.trainable_variables)
    with tf.GradientTape() as tape:
        tape.watch(x)
        outs = tf.nest.flatten(model(x, training=True))
        loss = sum(tf.reduce_sum(tf.sin(o) * o) for o in outs)
    return [g.numpy() for g in tape.gradient(loss, [x] + variables)]


def goal(bits):
    """The smooth activations' goals for every gated block, ReLU's included.

    The gate adds a spatially uniform gradient per sample and channel, which
    the BN backward mostly cancels (``g - mean_g - x_hat * mean_gx``), so the
    bin error of the decoded x_hat weighs more in d_x: ReLU's 4-bit input
    gradient measured 0.988-0.998 over 4 seeds, the same with an exact dL/ds
    (the error is the BN backward's, not the gate's)."""
    return GOALS["smooth"][bits]


def test_gate_weights_have_the_stock_convs_shapes():
    block = ApproxConvBlock(5, 1, squeeze_excite=dict(filters=3, activation="swish"))
    block.build((None, 8, 8, 6))
    assert [(w.name, tuple(w.shape)) for w in block.gate_weights] == [
        ("se_reduce_kernel", (1, 1, 6, 3)), ("se_reduce_bias", (3,)),
        ("se_expand_kernel", (1, 1, 3, 6)), ("se_expand_bias", (6,)),
    ]
    assert block.squeeze_excite.activation.name == "silu"
    no_bias = ApproxConvBlock(5, 1, squeeze_excite=dict(filters=3, use_bias=False))
    no_bias.build((None, 8, 8, 6))
    assert [w.name for w in no_bias.gate_weights] == ["se_reduce_kernel", "se_expand_kernel"]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_forward_equals_stock(ops_path, case, head, training):
    stock, blpa = stock_and_block(case, head, bits=4)
    x = inputs()
    np.testing.assert_allclose(
        blpa(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_gradients_meet_the_goals(ops_path, case, head, bits):
    """Cosine per variable (input, BN, the head's kernel and the gate's four
    weights) at the goals of the block's activation. dL/ds is summed from the
    decoded activation, so d_beta is close, not exact, even for ReLU."""
    stock, blpa = stock_and_block(case, head, bits)
    x = inputs()
    g, g_stock = gradients(blpa, x), gradients(stock, x)
    assert [a.shape for a in g] == [a.shape for a in g_stock] and len(g) == 8
    assert_gradients_meet_goal(g, g_stock, goal(bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_unnormalised_gated_block_meets_the_goals(ops_path, bits):
    """normalization="none" (activation -> squeeze-excite -> conv, no BN to cancel a
    spatially uniform gradient): the input gradient carries the gate's pooled term
    dL/dpooled / HW in full, so it is checked here at the goals."""
    rng = np.random.default_rng(4)
    channels = SHAPE[-1]
    inp = keras.Input(SHAPE[1:])
    a = keras.layers.ReLU()(inp)
    gated, (reduce, expand) = stock_gate(a, channels, "relu", "sigmoid")
    conv = keras.layers.Conv2D(5, 1, use_bias=False)
    stock = keras.Model(inp, conv(gated))
    for layer in (conv, reduce, expand):
        layer.set_weights([rng.normal(0, 0.5, w.shape) for w in layer.get_weights()])
    block = ApproxConvBlock(5, 1, bits=bits, normalization="none",
                            squeeze_excite=dict(filters=REDUCED, activation="relu"))
    block.build(SHAPE)
    block.kernel.assign(conv.kernel)
    gate = [reduce.kernel, reduce.bias, expand.kernel, expand.bias]
    for w, source in zip(block.gate_weights, gate):
        w.assign(source)
    stock.ordered_variables = [conv.kernel] + gate
    x = inputs()
    np.testing.assert_allclose(block(x, training=True), stock(x, training=True), rtol=1e-5, atol=1e-5)
    g, g_stock = gradients(block, x), gradients(stock, x)
    assert len(g) == 6
    assert_gradients_meet_goal(g, g_stock, goal(bits))


def test_exact_block_gradients_equal_stock():
    """bits=None: the gate is the same computation, so the gradients are stock's."""
    stock, blpa = stock_and_block(CASES[0], "conv", bits=None)
    x = inputs()
    for a, b in zip(gradients(blpa, x), gradients(stock, x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


def test_returned_activation_is_the_ungated_one(ops_path):
    """With return_activation the block also returns a (not a * s), and the
    gradient through that output is added to the gate's."""
    stock, blpa = stock_and_block(CASES[0], "conv", bits=8, return_activation=True)
    x = inputs()
    for got, want in zip(blpa(x, training=True), stock(x, training=True)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert_gradients_meet_goal(gradients(blpa, x), gradients(stock, x), goal(8))


def test_keras_file_round_trip(tmp_path):
    _, blpa = stock_and_block(CASES[1], "depthwise", bits=4)
    path = os.path.join(tmp_path, "model.keras")
    blpa.save(path)
    loaded = keras.saving.load_model(path)
    block = loaded.layers[1]
    assert block.squeeze_excite == SqueezeExcite(REDUCED, block.activation.get("relu"), "hard_sigmoid")
    assert block.get_config() == blpa.layers[1].get_config()
    x = inputs()
    for training in (False, True):
        np.testing.assert_allclose(loaded(x, training=training), blpa(x, training=training), rtol=1e-6)


def test_bad_squeeze_excite_arguments_name_the_value():
    with pytest.raises(ValueError, match="gate"):
        ApproxConvBlock(4, 1, squeeze_excite=dict(filters=2, gate="tanh"))
    with pytest.raises(ValueError, match="filters"):
        ApproxConvBlock(4, 1, squeeze_excite=dict(filters=0))
    with pytest.raises(ValueError, match="squeeze_excite="):
        ApproxConvBlock(4, 1, squeeze_excite=dict(filter=2))
    with pytest.raises(ValueError, match="activation"):
        ApproxConvBlock(4, 1, squeeze_excite=dict(filters=2, activation="tanh"))


@pytest.mark.slow
def test_squeeze_excite_stack_peak_is_at_least_4x_lower_than_stock():
    """20 BN -> silu -> squeeze-excite -> 1x1 conv units with identity adds, 64
    channels at 32x32, batch 64: stock keeps four float tensors a unit (the BN
    input, the silu input, the Multiply's activation input, the conv's gated
    input), the blocks a 4-bit code. Measured: see the assertion message."""
    stock = peak_bytes("squeeze_excite", "stock", False, depth=20, activation="silu")["peak"]
    result = peak_bytes("squeeze_excite", "4", False, depth=20, activation="silu")
    ratio = stock / result["peak"]
    message = f"stock {stock / 2**20:.0f} MiB, 4-bit {result['peak'] / 2**20:.0f} MiB ({ratio:.1f}x)"
    print(message)
    assert ratio >= 4.0, message


# ------------------------------------------------------------------ convert


def mbconv_model(inner="swish", gate="sigmoid", activation="swish", extra_reader=False):
    """Stem, then two MBConv units as keras.applications' EfficientNet writes them
    (expand -> BN -> act -> DepthwiseConv2D -> BN -> act -> squeeze-excite ->
    project -> BN, the second with an Add), and a GAP -> Dense classifier.
    `extra_reader`: the first Multiply's output also feeds the classifier."""
    keras.utils.set_random_seed(0)
    act = lambda name: stock_activation(activation)  # noqa: E731
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(inp)
    x = act("stem")(keras.layers.BatchNormalization(name="stem_bn")(x))
    gated = []
    for i in range(2):
        h = keras.layers.Conv2D(16, 1, use_bias=False, name=f"b{i}_expand")(x)
        h = act(i)(keras.layers.BatchNormalization(name=f"b{i}_expand_bn")(h))
        h = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"b{i}_dw")(h)
        h = act(i)(keras.layers.BatchNormalization(name=f"b{i}_bn")(h))
        s = keras.layers.GlobalAveragePooling2D(name=f"b{i}_se_squeeze")(h)
        s = keras.layers.Reshape((1, 1, 16), name=f"b{i}_se_reshape")(s)
        s = keras.layers.Conv2D(4, 1, padding="same", activation=inner, name=f"b{i}_se_reduce")(s)
        s = keras.layers.Conv2D(16, 1, padding="same", activation=gate, name=f"b{i}_se_expand")(s)
        h = keras.layers.multiply([h, s], name=f"b{i}_se_excite")
        gated.append(h)
        h = keras.layers.Conv2D(8, 1, use_bias=False, name=f"b{i}_project")(h)
        h = keras.layers.BatchNormalization(name=f"b{i}_project_bn")(h)
        x = h if i == 0 else keras.layers.Add(name=f"b{i}_add")([h, x])
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    if extra_reader:
        pooled = keras.layers.Concatenate()([pooled, keras.layers.GlobalAveragePooling2D()(gated[0])])
    return keras.Model(inp, keras.layers.Dense(3, name="classifier")(pooled))


def all_gradients(model, x):
    """{(layer, variable): gradient} of sum(sin(y) * y) in training."""
    variables = [(l.name, v) for l in model.layers for v in l.trainable_variables]
    with tf.GradientTape() as tape:
        y = model(tf.constant(x), training=True)
        loss = tf.reduce_sum(tf.sin(y) * y)
    grads = tape.gradient(loss, [v for _, v in variables])
    return {(name, v.name): g.numpy() for (name, v), g in zip(variables, grads)}


def converted_key(report, key):
    """The converted model's (layer, variable) of the original's `key`."""
    layer, variable = key
    for block, names in report.blocks.items():
        if layer == names[0]:  # the BN
            return block, variable
        if layer.endswith(("_se_reduce", "squeeze_excite_conv")) and layer in names:
            return block, f"se_reduce_{variable}"
        if layer.endswith(("_se_expand", "squeeze_excite_conv_1")) and layer in names:
            return block, f"se_expand_{variable}"
        if layer == names[-1]:  # the head
            return block, variable
    return key


@pytest.mark.parametrize("inner, gate, activation", [
    ("swish", "sigmoid", "swish"), ("relu", "hard_sigmoid", "hard_silu"),
])
def test_convert_absorbs_the_squeeze_excite(ops_path, inner, gate, activation):
    """Each BN -> act -> squeeze-excite -> project chain becomes one block with the
    gate (its convs' weights copied); the forward is the original's; with exact
    blocks (bits=None) every gradient is the original's, and at 8 bits the whole
    gradient's cosine is >= 0.99; the report keeps neither the Multiply's input nor
    its output."""
    model = mbconv_model(inner, gate, activation)
    converted, report = keras_blpa.convert(model, bits=8, return_report=True, batch_size=2)
    blocks = {l.name: l for l in converted.layers if isinstance(l, ApproxConvBlock)}
    # b1_expand reads the project BN's output directly (no activation): a linear
    # block; b1_project_bn, read only by the Add, a block without heads.
    assert sorted(blocks) == ["b0_dw", "b0_expand", "b0_project", "b1_dw", "b1_expand", "b1_project",
                              "b1_project_bn"]
    assert blocks["b1_expand"].activation.name == "linear"
    for i in range(2):
        block = blocks[f"b{i}_project"]
        assert block.squeeze_excite == SqueezeExcite.get(dict(filters=4, activation=inner, gate=gate))
        reduce = model.get_layer(f"b{i}_se_reduce")
        np.testing.assert_array_equal(block.gate_weights[0].numpy(), reduce.kernel.numpy())
        assert report.blocks[f"b{i}_project"][2:] == [
            f"b{i}_se_squeeze", f"b{i}_se_reshape", f"b{i}_se_reduce", f"b{i}_se_expand",
            f"b{i}_se_excite", f"b{i}_project",
        ]
    assert not any(isinstance(l, keras.layers.Multiply) for l in converted.layers)
    rows = {r.name: r for r in report.layers}
    assert rows["b0_se_excite"].before > 0 and rows["b0_se_excite"].after == 0
    x = np.random.default_rng(0).normal(size=(2, 12, 12, 3)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(converted(x, training=training), model(x, training=training),
                                   rtol=1e-5, atol=1e-6)
    g_ref = all_gradients(model, x)
    for bits, check in ((None, "equal"), (8, "cosine")):
        got = all_gradients(keras_blpa.convert(model, bits=bits), x)
        assert sorted(got) == sorted(converted_key(report, k) for k in g_ref)
        pairs = [(got[converted_key(report, k)], g) for k, g in sorted(g_ref.items())]
        if check == "equal":  # to round-off of the largest gradient (some are round-off only)
            largest = max(np.abs(b).max() for _, b in pairs)
            for a, b in pairs:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * largest)
        else:
            whole = [np.concatenate([np.ravel(p[i]) for p in pairs]) for i in (0, 1)]
            assert cosine(*whole) >= 0.99


def test_convert_keeps_a_gate_whose_product_has_other_readers():
    """Where the Multiply's output also feeds another layer, the float product is
    needed anyway: the gate stays stock and its activation's chain is not converted."""
    model = mbconv_model(extra_reader=True)
    converted, report = keras_blpa.convert(model, bits=4, return_report=True, batch_size=2)
    blocks = {l.name: l for l in converted.layers if isinstance(l, ApproxConvBlock)}
    assert "b0_project" not in blocks and blocks["b1_project"].squeeze_excite is not None
    assert any(l.name == "b0_se_excite" for l in converted.layers)
    assert "feeds no convertible" in {r.name: r.reason for r in report.layers}["b0_bn"]


def test_efficientnet_b0_gates_become_blocks():
    """keras.applications.EfficientNetB0: each of its 16 MBConv units' BN -> swish ->
    squeeze-excite -> project chain is one gated block (32 blocks with the 16
    depthwise ones, 7 linear ones, 9 linear normalization="none" ones: the expand
    convs reading a residual Add, and 9 without heads: the project BNs read by the
    drop-connect Dropout); the inference forward is the original's."""
    model = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    converted, report = keras_blpa.convert(model, bits=4, return_report=True, batch_size=2)
    blocks = [l for l in converted.layers if isinstance(l, ApproxConvBlock)]
    # And 7 linear blocks (a project BN read by the next unit's expand conv directly)
    # and 1 without heads (the top BN -> swish before the pooling); the 9 project BNs
    # read by an Add and the next expand conv are linear blocks returning their output.
    assert len(blocks) == 58 and sum(b.squeeze_excite is not None for b in blocks) == 16
    linear = [b for b in blocks if b.activation.name == "linear"]
    assert sum(b.normalization == "batch" and bool(b.heads) for b in linear) == 7
    after_add = [b.name for b in linear if b.normalization == "none"]
    assert len(after_add) == 9 and all(n.endswith("_expand_conv") for n in after_add)
    headless = [b.name for b in blocks if not b.heads]
    assert len(headless) == 10 and headless[-1] == "top_bn"
    for name in headless[:-1]:
        assert name.endswith("_project_bn")
        (reader,) = [l for l in model.layers if model.get_layer(name).output is l.input]
        assert isinstance(reader, keras.layers.Dropout) and reader.rate > 0
    assert report.before_bytes > 5 * report.after_bytes
    x = np.random.default_rng(1).uniform(0, 255, size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False),
                               rtol=1e-5, atol=1e-6)


def test_mobilenet_v3_squeeze_excite_written_with_keras_ops_becomes_gated_blocks():
    """keras.applications.MobileNetV3Small writes its gate as a 1x1 conv, a ReLU
    layer, a 1x1 conv and hard_sigmoid as ops, ReLU(6.0)(x + 3.0) * (1.0 / 6.0):
    each such squeeze-excite is absorbed into a hard_sigmoid-gated block, with the
    forward the original's (to the one rounding of x * (1/6) against x / 6) and,
    with exact blocks, every gradient the original's."""
    model = keras.applications.MobileNetV3Small(weights=None, input_shape=(32, 32, 3), classes=10,
                                                dropout_rate=0.0)
    gates = [l.name for l in model.layers if l.name.endswith("squeeze_excite_mul")]
    converted, report = keras_blpa.convert(model, bits=4, return_report=True, batch_size=2)
    gated = [l for l in converted.layers if isinstance(l, ApproxConvBlock) and l.squeeze_excite]
    assert len(gated) == len(gates) == 9
    assert {(b.squeeze_excite.gate, b.squeeze_excite.activation.name) for b in gated} == {
        ("hard_sigmoid", "relu")}
    assert not set(gates) & {l.name for l in converted.layers}
    x = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(converted(x, training=training), model(x, training=training),
                                   rtol=1e-4, atol=1e-6)
    g_ref = all_gradients(model, x)
    got = all_gradients(keras_blpa.convert(model, bits=None), x)
    # To float round-off, which the BatchNormalizations over 2 samples of 1x1 or 2x2
    # positions at the top amplify (measured: at most 1.9e-4 of the largest gradient).
    largest = max(np.abs(g).max() for g in g_ref.values())
    for key, g in g_ref.items():
        np.testing.assert_allclose(got[converted_key(report, key)], g, rtol=1e-3, atol=1e-3 * largest)
