"""keras_blpa.convert / memory_report on keras.applications, Sequential and factory models."""

import itertools
import json
import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from chains import input_and_weight_gradients
from keras_blpa import ApproxConvBlock
from keras_blpa import ArgmaxPooling2D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8


def randomize_bn(model, seed=0):
    """Trained-looking BN parameters (gamma of both signs, beta != 0, moving stats)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            if layer.scale:
                sign = np.where(rng.random(c) < 0.2, -1.0, 1.0)
                layer.gamma.assign(sign * rng.uniform(0.5, 1.5, c))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.3, c))
            layer.moving_mean.assign(rng.normal(0.0, 0.2, c))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, c))


def variable_map(original, report):
    """{(layer, variable) in the original: (layer, variable) in the converted model}."""
    mapping = {}
    for block, names in report.blocks.items():
        convs = [n for n in names if isinstance(original.get_layer(n), keras.layers.Conv2D)]
        for v in original.get_layer(names[0]).trainable_variables:  # the BN
            mapping[(names[0], v.name)] = (block, v.name)
        for i, name in enumerate(convs):
            suffix = f"_{i}" if i else ""
            for v in original.get_layer(name).trainable_variables:
                mapping[(name, v.name)] = (block, v.name + suffix)
    for layer in original.layers:
        for v in layer.trainable_variables:
            mapping.setdefault((layer.name, v.name), (layer.name, v.name))
    return mapping


def gradients(model, x, y):
    """Training-mode output and {(layer name, variable name): gradient}."""
    keys = [(l.name, v.name) for l in model.layers for v in l.trainable_variables]
    variables = [v for l in model.layers for v in l.trainable_variables]
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, out))
    grads = tape.gradient(loss, variables)
    return out, {k: g.numpy() for k, g in zip(keys, grads)}


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_conversion(original, bits=8, blocks=None, input_shape=(32, 32, 3), classes=10, cancelling=(),
                     min_cosine=0.99):
    """Converts, then checks exact outputs and per-variable gradient cosines.

    The forward pass is exact, so the outputs equal the original's at inference
    and in training. Gradients: cosine >= `min_cosine` per variable, except:

    * exact zeros: a conv bias feeding a training-mode BatchNormalization has a
      zero gradient (the BN removes any per-channel shift); float round-off
      leaves < 1e-6 of the largest gradient norm, and the converted gradient
      must stay within the half bin width 3 / 2^K of it (the code's relative
      error, not round-off);
    * `cancelling`: variables named by the caller whose exact gradient is a sum
      of nearly cancelling terms (a stem whose output reaches the loss only
      through BatchNormalizations, invariant to its scale and shift except at
      zero-padded borders). The ~1% error of each 8-bit BN backward does not
      cancel there: their error must stay within the half bin width 3 / 2^K of
      the largest gradient norm (cosine printed, not asserted).
    """
    randomize_bn(original)
    report = keras_blpa.memory_report(original, BATCH, bits=bits)
    converted = keras_blpa.convert(original, bits=bits)
    if blocks is not None:
        assert len(report.blocks) == blocks
    found = [l for l in converted.layers if isinstance(l, ApproxConvBlock)]
    assert sorted(l.name for l in found) == sorted(report.blocks)
    assert all(l.bits == bits for l in found)
    assert [t.shape for t in converted.inputs] == [t.shape for t in original.inputs]
    assert [t.shape for t in converted.outputs] == [t.shape for t in original.outputs]
    kept = {l.name for l in original.layers} - {n for names in report.blocks.values() for n in names}
    assert kept <= {l.name for l in converted.layers}

    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, *input_shape)).astype(np.float32)
    y = keras.utils.to_categorical(rng.integers(0, classes, BATCH), classes)
    np.testing.assert_allclose(converted(x, training=False), original(x, training=False), rtol=1e-5, atol=1e-7)
    out, g_ref = gradients(original, x, y)
    out_conv, g_conv = gradients(converted, x, y)
    np.testing.assert_allclose(out_conv, out, rtol=1e-5, atol=1e-7)
    # Moving statistics moved identically.
    for layer in converted.layers:
        if isinstance(layer, ApproxConvBlock) and layer.normalization != "none":
            bn = original.get_layer(report.blocks[layer.name][0])
            np.testing.assert_allclose(layer.moving_mean, bn.moving_mean, rtol=1e-5, atol=1e-6)
    mapping = variable_map(original, report)
    assert sorted(mapping.values()) == sorted(g_conv)
    largest = max(np.linalg.norm(g) for g in g_ref.values())
    worst, small = 1.0, {}
    for path, g in g_ref.items():
        other = g_conv[mapping[path]]
        if np.linalg.norm(g) < 1e-6 * largest:
            assert np.linalg.norm(other) <= 3 / 2**bits * largest, path
        elif path in cancelling:
            small[path] = round(cosine(g, other), 3)
            assert np.linalg.norm(other - g) <= 3 / 2**bits * largest, path
        else:
            worst = min(worst, cosine(g, other))
            assert cosine(g, other) >= min_cosine, (path, cosine(g, other))
    print(f"{original.name}: min cosine {worst:.4f}; cancelling (cosine): {small}")
    return converted, report, small


def test_resnet50v2():
    model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)
    converted, report, _ = check_conversion(model, blocks=16 * 3 + 1, cancelling={("conv1_conv", "bias")})
    # Pre-activation with a projection shortcut: one block, two heads, one code.
    block = converted.get_layer("conv2_block1_1_conv")
    assert len(block.heads) == 2 and block.heads[1].use_bias
    assert report.blocks["conv2_block1_1_conv"] == [
        "conv2_block1_preact_bn", "conv2_block1_preact_relu", "conv2_block1_1_conv", "conv2_block1_0_conv",
    ]
    # The ZeroPadding2D before each 3x3 conv is folded into it.
    assert converted.get_layer("conv2_block1_2_conv").heads[0].explicit_padding == ((1, 1), (1, 1))
    assert "conv2_block1_2_pad" not in {l.name for l in converted.layers}
    still = {row.name: row.reason for row in report.still_float}
    # The stem's MaxPooling2D keeps its one-byte argmax code (argmax_pooling is on by default).
    assert "pool1_pool" not in still and type(converted.get_layer("pool1_pool")) is ArgmaxPooling2D
    stem = {row.name: row for row in report.layers}["pool1_pool"]
    assert stem.codes and 0 < stem.after * 16 < stem.before, stem  # a byte per output vs float32 input + output
    # The strided shortcuts' 1x1 max poolings are subsamples that keep nothing.
    ones = [l.name for l in model.layers if isinstance(l, keras.layers.MaxPooling2D) and l.pool_size == (1, 1)]
    rows = {row.name: row for row in report.layers}
    assert len(ones) == 3
    for name in ones:
        assert type(converted.get_layer(name)) is ArgmaxPooling2D
        assert rows[name].before > 0 and rows[name].after == 0, rows[name]
        assert "keeps nothing" in rows[name].reason
    assert "not from BN -> activation" in still["conv1_conv"]
    # post_bn -> post_relu feeds only the pooling: a block without heads.
    assert report.blocks["post_bn"] == ["post_bn", "post_relu"] and "post_bn" not in still


def test_densenet121():
    # Seeded: the stem BN's beta cosine at 8 bits is 0.995-0.9996 over seeds 0-4, but
    # 0.9885 from the weights the global generator gave after this file's earlier tests.
    keras.utils.set_random_seed(0)
    model = keras.applications.DenseNet121(weights=None, input_shape=(32, 32, 3), classes=10)
    # 58 conv blocks of two BN-ReLU-Conv units, 3 transitions; not the stem
    # (its ReLU feeds a MaxPooling2D) nor the final BN-ReLU (pooling).
    _, report, _ = check_conversion(model, blocks=58 * 2 + 3 + 2, cancelling={("conv1_bn", "gamma")})
    assert report.saved_bytes > 0.5 * report.before_bytes


def test_resnet50_post_activation():
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    # Per bottleneck block: 1_bn->1_relu->2_conv and 2_bn->2_relu->3_conv; and the
    # ReLU after each Add but the last (which feeds the pooling) reads no BN: it
    # becomes a normalization="none" block with the next block's 1x1 conv (and
    # returns its activation for the shortcut). Each BN read only by an Add (16 3_bn
    # and 4 projection 0_bn) and the stem's BN -> ReLU before the padding of its max
    # pooling become blocks without heads.
    converted, report, _ = check_conversion(model, blocks=16 * 2 + 15 + 21 + 1, cancelling={("conv1_conv", "bias")})
    assert report.blocks["conv2_block2_1_conv"] == ["conv2_block1_out", "conv2_block2_1_conv"]
    block = converted.get_layer("conv2_block2_1_conv")
    assert block.normalization == "none" and block.return_activation
    # The projection blocks' first ReLU feeds two convs: one block, two heads.
    assert len(converted.get_layer("conv3_block1_1_conv").heads) == 2
    for name in ("conv2_block1_3_bn", "conv2_block1_0_bn"):
        assert report.blocks[name] == [name] and not converted.get_layer(name).heads
        assert converted.get_layer(name).activation.name == "linear"
    assert report.blocks["conv1_bn"] == ["conv1_bn", "conv1_relu"]
    # The stem pooling keeps its argmax code, so the two convs reading it (the first
    # projection and conv) become one linear block without normalisation.
    assert type(converted.get_layer("pool1_pool")) is ArgmaxPooling2D
    assert report.blocks["conv2_block1_1_conv"] == ["conv2_block1_1_conv", "conv2_block1_0_conv"]
    stem = converted.get_layer("conv2_block1_1_conv")
    assert stem.normalization == "none" and stem.activation.name == "linear" and len(stem.heads) == 2
    assert "pool1_pool" not in {row.name for row in report.still_float}
    assert report.after_bytes < report.before_bytes


def vgg(input_shape=(16, 16, 3), classes=10):
    keras.utils.set_random_seed(0)
    layers = [keras.Input(input_shape)]
    for filters in (8, 16):
        for _ in range(2):
            layers += [
                keras.layers.Conv2D(filters, 3, padding="same"),
                keras.layers.BatchNormalization(),
                keras.layers.ReLU(),
            ]
        layers.append(keras.layers.MaxPooling2D())
    layers += [keras.layers.Flatten(), keras.layers.Dense(classes, activation="softmax")]
    return keras.Sequential(layers, name="vgg")


def test_sequential_vgg(ops_path):
    # Conv-BN-ReLU x2, pool, x2, pool: the first ReLU of each stage feeds a conv, the
    # second a max pooling (a block without heads; the pooling keeps its argmax code),
    # and the conv after the first pooling reads it: a linear block.
    converted, report, _ = check_conversion(vgg(), blocks=5, input_shape=(16, 16, 3))
    blocks = [b for b in converted.layers if isinstance(b, ApproxConvBlock)]
    assert sum(not b.heads for b in blocks) == 2
    assert sum(b.normalization == "none" for b in blocks) == 1
    assert all(type(l) is not keras.layers.MaxPooling2D for l in converted.layers)
    # argmax_pooling=False: the poolings keep their float input and output.
    _, kept = keras_blpa.convert(vgg(), return_report=True, argmax_pooling=False)
    still = {row.name: row.reason for row in kept.still_float}
    assert [r for r in still.values() if "MaxPooling2D keeps its input and output" in r]


@pytest.mark.parametrize("bits", [8, 4])
def test_factory_resnet_converts_to_the_compressed_factory(bits):
    """convert(resnet(bits=None)) is resnet(bits=K) in blocks, outputs and gradients,
    the final BN -> ReLU before the pooling included (a block without heads in both)."""
    keras.utils.set_random_seed(0)
    stock = keras_blpa.resnet(11, 10, (16, 16, 3), bits=None)
    randomize_bn(stock)
    converted = keras_blpa.convert(stock, bits=bits)
    factory = keras_blpa.resnet(11, 10, (16, 16, 3), bits=bits)
    blocks = {l.name: l.get_config() for l in converted.layers if isinstance(l, ApproxConvBlock)}
    expected = {l.name: l.get_config() for l in factory.layers if isinstance(l, ApproxConvBlock)}
    assert blocks.keys() == expected.keys() and len(blocks) == 10
    assert expected["final_bn"]["heads"] == [] and expected["final_bn"]["return_activation"]
    for name, config in blocks.items():
        for key in ("filters", "kernel_size", "strides", "padding", "bits", "momentum", "epsilon", "use_bias", "return_activation", "heads"):
            assert config.get(key) == expected[name].get(key), (name, key)
    keras_blpa.models.copy_weights(stock, factory)
    x = np.random.default_rng(2).normal(size=(4, 16, 16, 3)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(converted(x, training=training), factory(x, training=training), rtol=1e-5, atol=1e-6)
    y = keras.utils.to_categorical(np.arange(4), 10)
    _, ga = gradients(converted, x, y)
    _, gb = gradients(factory, x, y)
    assert ga.keys() == gb.keys()
    for key, g in ga.items():
        np.testing.assert_allclose(g, gb[key], rtol=1e-4, atol=1e-6)


def test_bits_none_is_equivalent_and_exact():
    model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)
    randomize_bn(model)
    converted = keras_blpa.convert(model, bits=None)
    x = np.random.default_rng(3).normal(size=(4, 32, 32, 3)).astype(np.float32)
    y = keras.utils.to_categorical(np.arange(4), 10)
    _, g_ref = gradients(model, x, y)
    _, g = gradients(converted, x, y)
    mapping = variable_map(model, keras_blpa.memory_report(model, 4, bits=None))
    largest = max(np.linalg.norm(v) for v in g_ref.values())
    for path, v in g_ref.items():
        np.testing.assert_allclose(g[mapping[path]], v, rtol=1e-3, atol=1e-5 * largest)


def small_patterns_model(dtype=None):
    """Every pattern in one small functional model.

    BN(center=False)+ReLU feeding a 1x1 stride-2 conv with bias, a ZeroPadding2D
    + 3x3 stride-2 "valid" conv, and a residual Add; BN(scale=False) +
    Activation("relu") feeding one conv; a BN+ReLU feeding only pooling.
    The K-bit code covers about +-3 standard deviations: the sums and pools
    before bn2 give heavier tails than a real network's, and the clipped
    outliers dominate conv2's kernel-gradient error (seeded, cosine 0.997).
    """
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 9, 4))
    h = keras.layers.Conv2D(6, 3, padding="same", dtype=dtype, name="stem")(inp)
    a = keras.layers.BatchNormalization(center=False, dtype=dtype, name="bn1")(h)
    a = keras.layers.ReLU(dtype=dtype, name="relu1")(a)
    s = keras.layers.Conv2D(6, 1, strides=2, use_bias=True, dtype=dtype, name="proj")(a)
    p = keras.layers.ZeroPadding2D(((1, 1), (0, 2)), dtype=dtype, name="pad")(a)
    c = keras.layers.Conv2D(6, 3, strides=2, padding="valid", use_bias=False, dtype=dtype, name="conv1")(p)
    r = keras.layers.Add(dtype=dtype, name="add")([keras.layers.Conv2D(6, 1, dtype=dtype, name="mix")(a), a])
    r = keras.layers.AveragePooling2D(2, padding="same", dtype=dtype, name="pool")(r)
    z = keras.layers.Add(dtype=dtype, name="add2")([s, c, r])
    b = keras.layers.BatchNormalization(scale=False, epsilon=1.001e-5, dtype=dtype, name="bn2")(z)
    b = keras.layers.Activation("relu", dtype=dtype, name="relu2")(b)
    b = keras.layers.Conv2D(8, 3, padding="same", dtype=dtype, name="conv2")(b)
    f = keras.layers.BatchNormalization(dtype=dtype, name="bn3")(b)
    f = keras.layers.ReLU(dtype=dtype, name="relu3")(f)
    # The head also reads z directly, so that bn1's gradients do not reach the
    # loss only through a (scale-invariant) BatchNormalization.
    pooled = [keras.layers.GlobalAveragePooling2D(dtype=dtype)(t) for t in (f, z)]
    out = keras.layers.Dense(10, activation="softmax", dtype=dtype, name="head")(keras.layers.Concatenate(dtype=dtype)(pooled))
    return keras.Model(inp, out, name="patterns")


def test_patterns_model(ops_path):
    model = small_patterns_model()
    converted, report, _ = check_conversion(model, blocks=3, input_shape=(9, 9, 4))
    (name, names), = [(b, n) for b, n in report.blocks.items() if "bn1" in n]
    block = converted.get_layer(name)
    convs = [n for n in names if n in ("proj", "conv1", "mix")]
    assert sorted(convs) == ["conv1", "mix", "proj"] and "pad" in names and name in convs
    assert [h.explicit_padding for h in block.heads] == [
        ((1, 1), (0, 2)) if conv == "conv1" else None for conv in convs
    ]
    assert [h.use_bias for h in block.heads] == [conv != "conv1" for conv in convs]
    assert block.return_activation and not block.center and block.scale
    assert converted.get_layer("conv2").center and not converted.get_layer("conv2").scale
    # bn3 -> relu3 feeds only a GlobalAveragePooling2D: a block without heads.
    assert report.blocks["bn3"] == ["bn3", "relu3"] and not converted.get_layer("bn3").heads


def test_unsupported_conv_keeps_the_activation_with_its_reason():
    """A dilated conv reading the same BN+ReLU stays a Conv2D fed by the block's
    activation output; the report names the dilation."""
    inp = keras.Input((8, 8, 3))
    a = keras.layers.ReLU(name="relu")(keras.layers.BatchNormalization(name="bn")(inp))
    u = keras.layers.Conv2D(4, 3, padding="same", name="conv")(a)
    v = keras.layers.Conv2D(4, 3, padding="same", dilation_rate=2, name="dilated")(a)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(keras.layers.Add()([u, v])))
    converted, report = keras_blpa.convert(model, bits=8, return_report=True, batch_size=2)
    assert converted.get_layer("conv").return_activation
    assert isinstance(converted.get_layer("dilated"), keras.layers.Conv2D)
    assert "dilation_rate=(2, 2)" in {r.name: r.reason for r in report.still_float}["dilated"]
    x = np.random.default_rng(6).normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), rtol=1e-5, atol=1e-6)


def test_save_load_fit_and_mixed_precision(tmp_path, ops_path):
    converted = keras_blpa.convert(small_patterns_model(), bits=4)
    x = np.random.default_rng(4).normal(size=(8, 9, 9, 4)).astype(np.float32)
    y = keras.utils.to_categorical(np.arange(8) % 10, 10)
    converted.compile(keras.optimizers.SGD(0.05), "categorical_crossentropy")
    before = [v.numpy().copy() for v in converted.trainable_variables]
    history = converted.fit(x, y, batch_size=4, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(not np.array_equal(v.numpy(), b) for v, b in zip(converted.trainable_variables, before))
    path = tmp_path / "converted.keras"
    converted.save(path)
    loaded = keras.saving.load_model(path)
    for training in (False, True):
        np.testing.assert_array_equal(loaded(x, training=training), converted(x, training=training))

    mixed = small_patterns_model(dtype="mixed_float16")
    mixed_converted = keras_blpa.convert(mixed, bits=8)
    blocks = [l for l in mixed_converted.layers if isinstance(l, ApproxConvBlock)]
    assert blocks and all(l.compute_dtype == "float16" for l in blocks)
    np.testing.assert_allclose(
        mixed_converted(x, training=True), mixed(x, training=True), rtol=1e-3, atol=1e-3
    )


def test_report_of_a_converted_model_counts_codes_not_floats():
    model = vgg()
    converted = keras_blpa.convert(model, bits=4)
    before = keras_blpa.memory_report(model, 4, bits=4)
    again = keras_blpa.memory_report(converted, 4, bits=4)
    assert not again.blocks and again.saved_bytes == 0
    assert again.after_bytes == before.after_bytes
    codes = [r for r in again.layers if r.layer_type == "ApproxConvBlock"]
    assert len(codes) == 5 and all(r.converted_into == r.name for r in codes)
    # 4-bit codes of the BN inputs: 4 x 16 x 16 x 8 and 4 x 8 x 8 x 16 values, each
    # stage twice (a block before its conv, a block without heads before the pooling),
    # and of the first pooling's output, 4 x 8 x 8 x 8 (the linear block reading it).
    assert sorted(r.after for r in codes) == sorted(
        [4 * 16 * 16 * 8 // 2, 4 * 8 * 8 * 16 // 2] * 2 + [4 * 8 * 8 * 8 // 2])
    assert {r.name for r in again.still_float} == {r.name for r in before.still_float}


def test_mobilenet_v2_relu6_chains_become_relu6_blocks():
    """MobileNetV2's 17 BN -> ReLU(6.0) -> DepthwiseConv2D chains become depthwise
    blocks and its 17 BN -> ReLU(6.0) -> 1x1 project convs relu6 conv blocks (34);
    the 7 project BNs read by the next 1x1 conv directly (and by a residual Add)
    become linear blocks; the 10 expand convs reading a residual Add become linear
    normalization="none" blocks; the ZeroPadding2D before each strided depthwise
    conv is folded; the forward is the original's, bit for bit."""
    model = keras.applications.MobileNetV2(weights=None, input_shape=(32, 32, 3), classes=10)
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    all_blocks = {l.name: l for l in converted.layers if isinstance(l, ApproxConvBlock)}
    assert len(all_blocks) == len(report.blocks) == 62
    after_add = {n for n, b in all_blocks.items() if b.normalization == "none"}
    assert len(after_add) == 10 and all(n.endswith("_expand") for n in after_add)
    for name in after_add:
        assert report.blocks[name] == [name] and all_blocks[name].activation.name == "linear"
        producer = model.get_layer(name).input._keras_history[0]
        assert isinstance(producer, keras.layers.Add), (name, producer)
    all_blocks = {n: b for n, b in all_blocks.items() if n not in after_add}
    # 11 without heads: the 10 project BNs read only by a residual Add, and the last
    # BN -> ReLU(6.0) before the pooling.
    headless = {n for n, b in all_blocks.items() if not b.heads}
    assert len(headless) == 11 and "Conv_1_bn" in headless
    assert all(n.endswith("project_BN") for n in headless - {"Conv_1_bn"})
    all_blocks = {n: b for n, b in all_blocks.items() if n not in headless}
    blocks = {n: b for n, b in all_blocks.items() if b.activation.name == "relu6"}
    linear = set(all_blocks) - set(blocks)
    assert {all_blocks[n].activation.name for n in linear} == {"linear"}
    assert all(report.blocks[n][0].endswith("project_BN") for n in linear) and len(linear) == 7
    depthwise = {n for n in blocks if n.endswith("_depthwise")}
    assert len(depthwise) == 17 and len(set(blocks) - depthwise) == 17
    assert all(n.endswith("_project") for n in set(blocks) - depthwise)
    for name in depthwise:
        (head,) = blocks[name].heads
        original = model.get_layer(name)
        assert head.kind == "depthwise" and head.strides == tuple(original.strides)
        np.testing.assert_array_equal(blocks[name].kernel.numpy(), original.kernel.numpy())
    # block_1's stride-2 depthwise conv reads a ZeroPadding2D of the activation.
    assert blocks["block_1_depthwise"].heads[0].explicit_padding == ((0, 1), (0, 1))
    assert report.blocks["expanded_conv_depthwise"] == [
        "bn_Conv1", "Conv1_relu", "expanded_conv_depthwise"
    ]
    reasons = {r.name: r.reason for r in report.layers}
    assert not any("DepthwiseConv2D '" in (r or "") for r in reasons.values())
    x = np.random.default_rng(5).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(converted(x, training=True), model(x, training=True))


def activation_chain_model(activation_layer):
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 1, name="stem")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = h if activation_layer is None else activation_layer(h)
    h = keras.layers.Conv2D(5, 3, padding="same", name="conv")(h)
    return keras.Model(inp, keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(h)))


@pytest.mark.parametrize(
    "layer, expected",
    [
        (lambda: keras.layers.ReLU(6.0), ("relu6", 0.0)),
        (lambda: keras.layers.LeakyReLU(), ("leaky_relu", 0.3)),
        (lambda: keras.layers.ReLU(negative_slope=0.1), ("leaky_relu", 0.1)),
        (lambda: keras.layers.Activation("swish"), ("silu", 0.0)),
        (lambda: keras.layers.Activation("gelu"), ("gelu", 0.0)),
        (lambda: keras.layers.Activation("hard_swish"), ("hard_silu", 0.0)),
        (lambda: keras.layers.Activation("leaky_relu"), ("leaky_relu", 0.2)),
        (lambda: None, ("linear", 0.0)),  # BN -> Conv2D: a linear block
        (lambda: keras.layers.Activation("linear"), ("linear", 0.0)),
    ],
)
def test_activation_layers_become_blocks_of_that_activation(layer, expected):
    """Each activation layer as stock Keras writes it becomes one block with that
    activation (and Keras' slope); the converted model computes the original's
    outputs, and with bits=None its gradients too."""
    original = activation_chain_model(layer())
    rng = np.random.default_rng(41)
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    y = rng.normal(size=(4, 2)).astype(np.float32)
    for bits in (None, 4):
        converted = keras_blpa.convert(original, bits=bits)
        block = converted.get_layer("conv")
        assert isinstance(block, ApproxConvBlock)
        assert (block.activation.name, block.activation.negative_slope) == pytest.approx(expected)
        np.testing.assert_allclose(converted(x, training=True), original(x, training=True),
                                   rtol=1e-6, atol=1e-6)
    for model in (original, converted):  # the last one: bits=4, the step runs
        model.compile(keras.optimizers.SGD(0.1), "mse")
    exact = keras_blpa.convert(original, bits=None)
    exact.compile(keras.optimizers.SGD(0.1), "mse")
    np.testing.assert_allclose(exact.train_on_batch(x, y), original.train_on_batch(x, y), rtol=1e-5)
    assert np.isfinite(converted.train_on_batch(x, y))


@pytest.mark.parametrize(
    "layer, reason",
    [
        (lambda: keras.layers.ReLU(max_value=4.0), "its activation is ReLU(max_value=4.0, "),
        (lambda: keras.layers.ReLU(threshold=0.5), "negative_slope=0.0, threshold=0.5), not one the"),
        (lambda: keras.layers.Activation("tanh"), "its activation is tanh, not one the block computes"),
    ],
)
def test_other_activations_stay_with_the_reason(layer, reason):
    original = activation_chain_model(layer())
    with pytest.warns(UserWarning, match="no BatchNormalization -> activation -> Conv2D chain"):
        _, report = keras_blpa.convert(original, bits=4, return_report=True, batch_size=2)
    assert not report.blocks
    assert reason in {r.name: r.reason for r in report.layers}["bn"]


def test_python_lambda_layers_are_shared_and_the_chain_converts():
    """A Lambda layer and an Activation of a Python lambda do not load back from
    their configs; convert shares them (they hold no state) instead of failing."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Lambda(lambda t: t * 2.0, name="double")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(h)
    out = keras.layers.Activation(lambda v: keras.activations.gelu(v, approximate=True), name="act")(h)
    original = keras.Model(inp, out)
    converted = keras_blpa.convert(original, bits=4)
    assert isinstance(converted.get_layer("conv"), ApproxConvBlock)
    assert converted.get_layer("double") is original.get_layer("double")
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 3)).astype(np.float32)
    np.testing.assert_allclose(converted(x, training=True), original(x, training=True), rtol=1e-6, atol=1e-6)


def test_subclassed_model_is_rejected_by_name():
    class MyNet(keras.Model):
        def __init__(self):
            super().__init__()
            self.conv = keras.layers.Conv2D(4, 3)

        def call(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="MyNet.*functional API"):
        keras_blpa.convert(MyNet())
    with pytest.raises(ValueError, match="built Sequential"):
        keras_blpa.convert(keras.Sequential([keras.layers.Conv2D(2, 3)]))
    with pytest.raises(ValueError, match="bits=3"):
        keras_blpa.convert(vgg(), bits=3)
    with pytest.raises(ValueError, match="input_shape"):
        inp = keras.Input((None, None, 3))
        keras_blpa.memory_report(keras.Model(inp, keras.layers.Conv2D(2, 3)(inp)), 2)


# Subprocess tests: the allocator peak and MirroredStrategy need their own process.

PEAK_STEP = textwrap.dedent(
    """
    import json, os, sys
    import keras
    import keras_blpa
    sys.path.insert(0, os.path.join(os.getcwd(), "examples"))
    from convert_applications import peak_bytes  # the example's own measurement

    size, batch, bits = map(int, sys.argv[1:])
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50V2(weights=None, input_shape=(size, size, 3), classes=10)
    report = keras_blpa.memory_report(model, batch, bits=bits)
    stock = peak_bytes(model, batch, size)
    converted = peak_bytes(keras_blpa.convert(model, bits=bits), batch, size)
    print(json.dumps(dict(stock=stock, converted=converted, saved=report.saved_bytes,
                          transient=report.transient_bytes,
                          native=keras_blpa.native_ops_available())))
    """
)


def run_python(code, args=(), env=None):
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], cwd=REPO,
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {})),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_reported_saving_matches_allocator_peak(ops_path):
    """ResNet50V2, 64x64, batch 32, 4 bits: the measured peak difference equals
    report.saved_bytes to within report.transient_bytes (see keras_blpa.activation_report).
    (At batch 16 the converted step's peak comes once the float32 weight gradients
    exist, not where the kept activations peak: measured 66 of the 79 MiB saved, the
    three 1x1 strided poolings' inputs and outputs among them.)"""
    env = {"TF_CPU_ALLOCATOR_USE_BFC": "true", "KERAS_BLPA_PURE_TF": "1" if ops_path == "reference" else "0"}
    r = run_python(PEAK_STEP, (64, 32, 4), env)
    assert r["native"] == (ops_path == "native")
    measured = r["stock"] - r["converted"]
    print(f"{ops_path}: peak {r['stock'] / 2**20:.0f} -> {r['converted'] / 2**20:.0f} MiB, "
          f"measured saving {measured / 2**20:.1f} MiB, reported {r['saved'] / 2**20:.1f} MiB "
          f"(transient {r['transient'] / 2**20:.1f} MiB)")
    assert abs(measured - r["saved"]) <= r["transient"]
    assert measured > 0.5 * r["saved"] > 0


MIRRORED = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import keras_blpa

    strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])
    with strategy.scope():
        model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)
        converted = keras_blpa.convert(model, bits=4)
        converted.compile(keras.optimizers.SGD(0.01), "categorical_crossentropy")
    block = converted.get_layer("conv2_block1_1_conv")
    mirrored = isinstance(block.kernels[1].value, tf.distribute.DistributedValues)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(np.arange(16) % 10, 10)
    before = block.kernels[1].numpy().copy()
    history = converted.fit(x, y, batch_size=8, epochs=1, verbose=0)
    replicas = [v.numpy() for v in block.kernels[1].value.values] if mirrored else []
    print(json.dumps(dict(
        replicas=strategy.num_replicas_in_sync, mirrored=mirrored,
        loss=history.history["loss"][-1],
        moved=float(np.abs(block.kernels[1].numpy() - before).max()),
        in_sync=all(np.array_equal(replicas[0], r) for r in replicas))))
    """
)


def test_mirrored_strategy_convert_in_scope_and_fit():
    r = run_python(MIRRORED)
    assert r["replicas"] == 2 and r["mirrored"] and r["in_sync"]
    assert np.isfinite(r["loss"]) and r["moved"] > 0


def test_example_script_prints_the_report(capsys):
    sys.path.insert(0, os.path.join(REPO, "examples"))
    import convert_applications

    convert_applications.main(["--model", "DenseNet121", "--input_size", "32", "--batch_size", "2", "--rows", "3"])
    out = capsys.readouterr().out
    assert "converted: 121 blocks" in out and "conv1_conv" in out


# Faults and edge cases: what changes the loss or the update is carried over, or the
# chain stays unconverted with the reason; the model keeps its input/output structure.


def regularized_model(bn_kwargs=None, relu_kwargs=None, conv_kwargs=None, pad_kwargs=None):
    """stem -> BN -> ReLU -> [ZeroPadding2D ->] Conv2D -> pool -> dense, with the given options."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 1, name="stem")(inp)
    h = keras.layers.BatchNormalization(name="bn", **(bn_kwargs or {}))(h)
    h = keras.layers.ReLU(name="relu", **(relu_kwargs or {}))(h)
    if pad_kwargs is not None:
        h = keras.layers.ZeroPadding2D(1, name="pad", **pad_kwargs)(h)
    h = keras.layers.Conv2D(5, 3, padding="valid" if pad_kwargs is not None else "same",
                            name="conv", **(conv_kwargs or {}))(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    return keras.Model(inp, out)


def fit_step(model, lr=0.5):
    """The loss of one SGD step (the regularizers included)."""
    rng = np.random.default_rng(40)
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    y = rng.normal(size=(4, 2)).astype(np.float32)
    model.compile(keras.optimizers.SGD(lr), "mse")
    return model.train_on_batch(x, y)


def test_regularizers_and_constraints_are_carried_over(ops_path):
    """BN gamma/beta regularizers and constraints, the conv's kernel constraint and bias
    regularizer and constraint: the block carries them (and serialises them), so the
    training loss equals the original's, and the exact block's update too (constraints
    applied); gamma starts with negative entries that NonNeg clips."""
    options = dict(
        bn_kwargs=dict(gamma_regularizer=keras.regularizers.L2(0.3), beta_regularizer=keras.regularizers.L1(0.2),
                       gamma_constraint=keras.constraints.NonNeg(), beta_constraint=keras.constraints.MaxNorm(0.05, axis=0)),
        conv_kwargs=dict(kernel_regularizer="l2", kernel_constraint=keras.constraints.UnitNorm(axis=[0, 1, 2]),
                         bias_regularizer=keras.regularizers.L2(0.5), bias_constraint=keras.constraints.NonNeg()),
    )
    for bits in (None, 4):
        original = regularized_model(**options)
        original.get_layer("bn").gamma.assign([1.0, -0.5, 0.8, -0.1])
        original.get_layer("conv").bias.assign([0.3, -0.2, 0.1, 0.0, -0.4])
        converted, report = keras_blpa.convert(original, bits=bits, return_report=True, batch_size=4)
        assert report.blocks == {"conv": ["bn", "relu", "conv"]}
        block = converted.get_layer("conv")
        clone = ApproxConvBlock.from_config(block.get_config())
        for name in ("gamma_regularizer", "beta_regularizer", "gamma_constraint", "beta_constraint",
                     "kernel_regularizer", "kernel_constraint", "bias_regularizer", "bias_constraint"):
            assert type(getattr(clone, name)) is type(getattr(block, name)) is not type(None), name
        assert len(converted.losses) == len(original.losses) == 4
        np.testing.assert_allclose(sum(converted.losses), sum(original.losses), rtol=1e-6)
        np.testing.assert_allclose(fit_step(converted), fit_step(original), rtol=1e-5)
        bn, conv = original.get_layer("bn"), original.get_layer("conv")
        assert bn.gamma.numpy().min() == 0.0  # NonNeg acted
        if bits is None:
            pairs = [(block.gamma, bn.gamma), (block.beta, bn.beta), (block.kernel, conv.kernel), (block.bias, conv.bias)]
            for new, old in pairs:
                np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(relu_kwargs=dict(activity_regularizer="l2")), "its activation layer has an activity_regularizer"),
        (dict(conv_kwargs=dict(activity_regularizer="l2")), "Conv2D 'conv' has an activity_regularizer"),
        (dict(pad_kwargs=dict(activity_regularizer="l2")), "ZeroPadding2D 'pad' before Conv2D 'conv' has an activity_regularizer"),
    ],
)
def test_activity_regularizers_leave_the_chain_unconverted(options, reason):
    """An activity regularizer on the activation, the padded activation or the conv
    output needs that float tensor, which the block does not keep. The chain stays as
    it was, the report says why, and the training loss is the original's."""
    original = regularized_model(**options)
    with pytest.warns(UserWarning, match="no BatchNormalization -> activation -> Conv2D chain"):
        converted, report = keras_blpa.convert(original, bits=4, return_report=True, batch_size=4)
    assert not report.blocks
    assert any(reason in (row.reason or "") for row in report.layers), [r.reason for r in report.layers]
    assert not any(isinstance(layer, ApproxConvBlock) for layer in converted.layers)
    np.testing.assert_allclose(fit_step(converted), fit_step(original), rtol=1e-6)


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(bn_kwargs=dict(activity_regularizer="l2")), "BatchNormalization with an activity_regularizer"),
        (dict(conv_kwargs=dict(trainable=False)), "Conv2D 'conv' has trainable=False while its BatchNormalization trains"),
    ],
)
def test_bn_that_cannot_join_stays_and_the_activation_converts_alone(options, reason):
    """A BN with an activity regularizer (its output must stay float), or a frozen conv
    after a training BN: the BN stays a stock layer, with the reason, and the
    activation -> conv becomes a normalization="none" block on the BN's output (the
    conv's trainable flag carried over); the training loss is the original's."""
    original = regularized_model(**options)
    converted, report = keras_blpa.convert(original, bits=None, return_report=True, batch_size=4)
    assert report.blocks == {"conv": ["relu", "conv"]}
    assert reason in {r.name: r.reason for r in report.layers}["bn"]
    block = converted.get_layer("conv")
    assert block.normalization == "none"
    assert block.trainable == original.get_layer("conv").trainable
    assert isinstance(converted.get_layer("bn"), keras.layers.BatchNormalization)
    np.testing.assert_allclose(fit_step(converted), fit_step(original), rtol=1e-5)


def test_frozen_bn_before_a_trainable_conv_becomes_a_frozen_block():
    """The fine-tuning recipe: BN layers frozen, convs trainable. Each chain becomes a
    normalization="frozen" block whose conv trains and whose BN statistics stay."""
    original = regularized_model()
    original.get_layer("bn").trainable = False
    randomize_bn(original)
    converted, report = keras_blpa.convert(original, bits=None, return_report=True, batch_size=4)
    assert report.blocks == {"conv": ["bn", "relu", "conv"]}
    block = converted.get_layer("conv")
    assert block.normalization == "frozen" and block.trainable
    assert {v.name for v in block.trainable_weights} == {"kernel", "bias"}
    stats = [block.moving_mean.numpy().copy(), block.moving_variance.numpy().copy()]
    np.testing.assert_allclose(fit_step(converted), fit_step(original), rtol=1e-5)
    np.testing.assert_array_equal(block.moving_mean, stats[0])
    np.testing.assert_array_equal(block.moving_variance, stats[1])
    four = keras_blpa.convert(original, bits=4)
    assert four.get_layer("conv").normalization == "frozen"
    assert np.isfinite(fit_step(four))


def test_dict_and_list_structures_are_kept():
    """Two dict inputs and dict outputs come back as dicts with the same keys; a
    one-element output list stays a list."""
    keras.utils.set_random_seed(0)
    image = keras.Input((6, 6, 3), name="image")
    mask = keras.Input((6, 6, 3), name="mask")
    h = keras.layers.Add()([image, mask])
    h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv")(h)
    pooled = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(
        {"image": image, "mask": mask},
        {"logits": keras.layers.Dense(3, name="logits")(pooled), "features": pooled},
    )
    converted = keras_blpa.convert(model, bits=4)
    assert isinstance(converted.get_layer("conv"), ApproxConvBlock)
    rng = np.random.default_rng(41)
    data = {k: rng.normal(size=(2, 6, 6, 3)).astype(np.float32) for k in ("image", "mask")}
    out, ref = converted(data, training=True), model(data, training=True)
    assert isinstance(out, dict) and out.keys() == ref.keys() == {"logits", "features"}
    for key in ref:
        np.testing.assert_allclose(out[key], ref[key], rtol=1e-5, atol=1e-6)
    assert isinstance(converted.input, dict) and converted.input.keys() == {"image", "mask"}
    one = regularized_model()
    as_list = keras_blpa.convert(keras.Model(one.input, [one.output]), bits=4)
    assert isinstance(as_list.output, list) and len(as_list.output) == 1


def test_conversion_under_a_channels_first_config_stays_channels_last():
    """The chains converted are channels last; blocks made while keras.config says
    channels_first must not follow the configuration."""
    model = regularized_model()
    x = np.random.default_rng(42).normal(size=(2, 6, 6, 3)).astype(np.float32)
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        converted = keras_blpa.convert(model, bits=4)
    finally:
        keras.config.set_image_data_format(previous)
    assert converted.get_layer("conv").data_format == "channels_last"
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), rtol=1e-5, atol=1e-6)


def test_trained_batch_norm_statistics_keep_block_gradients():
    """BN statistics from a network trained on Fashion-MNIST (stock layers, 2 epochs on
    4096 images): each of its BN -> ReLU -> conv chains, converted and fed its real
    input (the trained network's activations of 256 images), against the stock chain.

    Measured (min over the chains and variables): 0.9928 at 8 bits, 0.9791 at 4
    bits (d_gamma and the kernel; d_x, d_beta and the bias are exact to 1e-4).
    Below the 0.999 / 0.99 of Gaussian inputs: these activations are heavy-tailed,
    and the values beyond the code's window (beta +- 3 |gamma|) saturate whatever
    the bit width. The bounds below are that measurement with margin."""
    from keras_blpa.benchmark.accuracy import load_data

    (x_train, y_train), _ = load_data(train_samples=4096, test_samples=1)
    keras.utils.set_random_seed(0)
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", name="stem")(inp)
    chains = []
    for i, (filters, strides) in enumerate(((32, 2), (32, 1), (64, 2))):
        chain = [keras.layers.BatchNormalization(name=f"bn{i}"), keras.layers.ReLU(name=f"relu{i}"),
                 keras.layers.Conv2D(filters, 3, strides=strides, padding="same", name=f"conv{i}")]
        chains.append((h, chain))
        for layer in chain:
            h = layer(h)
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, batch_size=128, epochs=2, verbose=0)
    rng = np.random.default_rng(7)
    for (chain_input, chain), bits in itertools.product(chains, (8, 4)):
        x = keras.Model(inp, chain_input)(x_train[:256]).numpy()
        stock = keras.Sequential([keras.Input(x.shape[1:])] + [
            type(layer).from_config(layer.get_config()) for layer in chain])
        for new, trained in zip(stock.layers, chain):
            new.set_weights(trained.get_weights())
        block = keras_blpa.convert(stock, bits=bits)
        assert sum(isinstance(l, ApproxConvBlock) for l in block.layers) == 1
        dy = rng.normal(size=(len(x),) + tuple(stock(x[:1]).shape[1:])).astype(np.float32)
        got = input_and_weight_gradients(block, x, dy)
        want = input_and_weight_gradients(stock, x, dy)
        cosines = [round(cosine(a, b), 4) for a, b in zip(got, want)]
        assert min(cosines) >= {8: 0.99, 4: 0.97}[bits], (chain[0].name, bits, cosines)
        assert min(cosines[0], cosines[2], cosines[4]) >= 0.9999, (chain[0].name, bits, cosines)



def test_convs_beside_a_max_pooling_on_a_concatenate_become_a_linear_block():
    """InceptionV3's reduction block: a Concatenate read by a 1x1 conv, a strided 3x3
    conv and a MaxPooling2D. The pooling keeps its argmax code, so the two convs
    become one linear block with two heads; argmax_pooling=False keeps them stock
    (the stock pooling keeps the Concatenate). Same forward; exact gradients at
    bits=None."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((9, 9, 3))
    branches = [keras.layers.ReLU()(keras.layers.BatchNormalization()(
        keras.layers.Conv2D(4, 1, name=f"stem{i}")(inp))) for i in range(2)]
    cat = keras.layers.Concatenate(name="mixed")(branches)
    a = keras.layers.Conv2D(4, 3, strides=2, name="reduce")(cat)
    b = keras.layers.Conv2D(4, 1, name="squeeze")(cat)
    b = keras.layers.MaxPooling2D(3, 2, name="squeeze_pool")(b)
    c = keras.layers.MaxPooling2D(3, 2, name="pool")(cat)
    out = keras.layers.Concatenate()([a, b, c])
    model = keras.Model(inp, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(out)))
    randomize_bn(model)
    converted, report = keras_blpa.convert(model, bits=None, return_report=True, batch_size=BATCH)
    linear = [n for n, layers in report.blocks.items() if set(layers) == {"reduce", "squeeze"}]
    assert len(linear) == 1, report.blocks
    block = converted.get_layer(linear[0])
    assert block.normalization == "none" and len(block.heads) == 2
    assert type(converted.get_layer("pool")) is ArgmaxPooling2D
    x = np.random.default_rng(0).normal(size=(BATCH, 9, 9, 3)).astype("float32")
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), rtol=1e-5, atol=1e-6)
    for a, b in zip(input_and_weight_gradients(converted, x, 1.0), input_and_weight_gradients(model, x, 1.0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    kept = keras_blpa.convert(model, argmax_pooling=False)
    assert type(kept.get_layer("reduce")) is keras.layers.Conv2D
    assert type(kept.get_layer("squeeze")) is keras.layers.Conv2D


def pooled_cnn(bn=False):
    """Conv -> [BN ->] ReLU -> MaxPooling2D(3, 2, "same") -> Conv -> pool -> Dense (seed 0).

    Without BN no BN chain converts (the ReLU feeds a pooling); with argmax pooling,
    conv2 becomes a linear block (the pooling no longer keeps its output).
    """
    keras.utils.set_random_seed(0)
    inp = keras.Input((15, 15, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inp)
    if bn:
        x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="pool1")(x)
    if bn:
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(8, 3, name="conv2")(x)
    x = keras.layers.MaxPooling2D(name="pool2")(x)
    return keras.Model(inp, keras.layers.Dense(4)(keras.layers.Flatten()(x)))


def test_max_pooling_becomes_argmax_pooling_with_the_same_forward_and_gradients():
    """No BN chain: the poolings become ArgmaxPooling2D (with the same config; the
    default); conv2, reading pool1's output, which the pooling no longer
    keeps, becomes a linear normalization="none" block (bits=None: exact). Outputs
    in both modes are bit-identical to the original's, and so are the gradients that
    only the poolings compute (ReLU -> pool: all-zero windows tie); those through the
    block's backward ops equal them to float rounding. argmax_pooling=False keeps
    the stock poolings, with that reason."""
    model = pooled_cnn()
    kept, kept_report = keras_blpa.convert(model, return_report=True, argmax_pooling=False)
    assert type(kept.get_layer("conv2")) is keras.layers.Conv2D
    assert type(kept.get_layer("pool1")) is keras.layers.MaxPooling2D
    still = {row.name: row.reason for row in kept_report.still_float}
    assert still["pool1"] == "MaxPooling2D keeps its input and output (argmax_pooling=False)"
    converted, report = keras_blpa.convert(model, bits=None, return_report=True, batch_size=BATCH)
    assert report.blocks == {"conv2": ["conv2"]}
    block = converted.get_layer("conv2")
    assert block.normalization == "none" and block.activation.name == "linear"
    for name in ("pool1", "pool2"):
        assert type(converted.get_layer(name)) is keras_blpa.ArgmaxPooling2D
        assert converted.get_layer(name).get_config() == model.get_layer(name).get_config()
    x = np.random.default_rng(0).normal(size=(BATCH, 15, 15, 3)).astype("float32")
    for training in (True, False):
        np.testing.assert_array_equal(converted(x, training=training), model(x, training=training))
    want = input_and_weight_gradients(model, x, 1.0)
    got = input_and_weight_gradients(converted, x, 1.0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    rows = {row.name: row for row in report.layers}
    pool = rows["pool1"]
    assert pool.codes and "pool1" not in {r.name for r in report.still_float}
    assert "uint8 index of each output's max" in pool.reason
    assert pool.after == BATCH * 8 * 8 * 8  # one byte per output
    assert pool.before > 0 and rows["pool2"].after == BATCH * 3 * 3 * 8
    again = {row.name: row for row in keras_blpa.memory_report(converted, BATCH).layers}
    assert again["pool1"].codes and again["pool1"].before == again["pool1"].after == pool.after


def test_max_pooling_converts_beside_chains_and_round_trips(tmp_path):
    model = pooled_cnn(bn=True)
    randomize_bn(model)
    kept = keras_blpa.convert(model, bits=8, argmax_pooling=False)
    assert type(kept.get_layer("pool1")) is keras.layers.MaxPooling2D
    converted = keras_blpa.convert(model, bits=8)
    assert isinstance(converted.get_layer("conv2"), ApproxConvBlock)
    assert type(converted.get_layer("pool1")) is keras_blpa.ArgmaxPooling2D
    x = np.random.default_rng(1).normal(size=(BATCH, 15, 15, 3)).astype("float32")
    np.testing.assert_array_equal(converted(x, training=False), model(x, training=False))
    path = str(tmp_path / "converted.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("pool1")) is keras_blpa.ArgmaxPooling2D
    np.testing.assert_array_equal(loaded(x, training=True), converted(x, training=True))


def convnext_like(channels=8, size=8, units=2, seed=0):
    """ConvNeXt's block, units times: DepthwiseConv2D 7x7 -> LayerNormalization(1e-6)
    -> Dense(4C) -> Activation("gelu") -> Dense(C) -> Add, trained-looking LN weights."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, channels))
    x = keras.layers.Conv2D(channels, 2, name="stem")(inp)
    for i in range(units):
        h = keras.layers.DepthwiseConv2D(7, padding="same", name=f"dw{i}")(x)
        h = keras.layers.LayerNormalization(epsilon=1e-6, name=f"ln{i}")(h)
        h = keras.layers.Dense(4 * channels, name=f"pw1_{i}")(h)
        h = keras.layers.Activation("gelu", name=f"gelu{i}")(h)
        h = keras.layers.Dense(channels, name=f"pw2_{i}")(h)
        x = keras.layers.Add(name=f"add{i}")([x, h])
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for i in range(units):
        ln = model.get_layer(f"ln{i}")
        ln.gamma.assign(rng.uniform(0.5, 1.5, channels) * np.where(rng.random(channels) < 0.3, -1, 1))
        ln.beta.assign(rng.normal(0.0, 0.3, channels))
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_convnext_layer_norm_dense_chains_convert(ops_path, bits, tmp_path):
    """LayerNormalization -> Dense becomes a normalization="layer" block (linear) and
    GELU -> Dense a "none" block, the second unit's depthwise conv (it reads the
    first unit's Add) a linear "none" block; the forward is the original's, every
    gradient within the goals (the GELU blocks' smooth goal), and a .keras round
    trip keeps it."""
    from chains import GOALS

    model = convnext_like()
    converted, report = keras_blpa.convert(model, bits=bits, return_report=True)
    blocks = {l.name: l for l in converted.layers if isinstance(l, ApproxConvBlock)}
    assert sorted(blocks) == ["dw1", "pw1_0", "pw1_1", "pw2_0", "pw2_1"]
    dw = blocks["dw1"]
    assert (dw.normalization, dw.activation.name, dw.kind) == ("none", "linear", "depthwise")
    for i in range(2):
        ln_block, gelu_block = blocks[f"pw1_{i}"], blocks[f"pw2_{i}"]
        assert (ln_block.normalization, ln_block.activation.name, ln_block.kind) == ("layer", "linear", "dense")
        assert ln_block.epsilon == 1e-6 and ln_block.bits == bits
        assert (gelu_block.normalization, gelu_block.activation.name) == ("none", "gelu")
        np.testing.assert_array_equal(ln_block.gamma.numpy(), model.get_layer(f"ln{i}").gamma.numpy())
        assert report.blocks[f"pw1_{i}"] == [f"ln{i}", f"pw1_{i}"]
    x = np.random.default_rng(1).normal(size=(BATCH, 8, 8, 8)).astype(np.float32)
    for training in (True, False):
        np.testing.assert_allclose(converted(x, training=training), model(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    y = np.random.default_rng(2).normal(size=(BATCH, 3)).astype(np.float32)
    _, got = gradients(converted, x, y)
    _, want = gradients(model, x, y)
    mapping = {("ln0", "gamma"): ("pw1_0", "gamma"), ("ln0", "beta"): ("pw1_0", "beta"),
               ("ln1", "gamma"): ("pw1_1", "gamma"), ("ln1", "beta"): ("pw1_1", "beta")}
    goal = GOALS["smooth"][bits]
    for key, g in want.items():
        cos = cosine(got[mapping.get(key, key)], g)
        assert cos >= goal, (key, cos)
    path = str(tmp_path / "convnext.keras")
    converted.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("pw1_0").normalization == "layer"
    np.testing.assert_array_equal(loaded(x, training=False), converted(x, training=False))


def test_layer_norm_that_cannot_join_stays_with_its_reason():
    """An LN over another axis is copied as it was, and says why."""
    inp = keras.Input((6, 6, 4))
    h = keras.layers.LayerNormalization(axis=[1, 2, 3], name="ln")(inp)
    out = keras.layers.Dense(5, name="pw")(h)
    model = keras.Model(inp, out)
    with pytest.warns(UserWarning, match="axis"):
        converted = keras_blpa.convert(model)
    assert not any(isinstance(l, ApproxConvBlock) for l in converted.layers)


def test_layer_norm_block_report_counts_code_and_rstd():
    """The report of a converted LN -> Dense chain: the 4-bit code and one float32 per
    position, the same before and after conversion's own report."""
    model = convnext_like(units=1)
    converted, report = keras_blpa.convert(model, bits=4, return_report=True)
    row = {r.name: r for r in report.layers}["ln0"]
    n = 1 * 7 * 7 * 8  # the stem's 7x7x8 output, batch 1
    assert row.after == n // 2 + (n // 8) * 4
    again = {r.name: r for r in keras_blpa.memory_report(converted, 1).layers}["pw1_0"]
    assert again.after == row.after


def linear_sources_cnn(seed=0):
    """Convs reading an Add, a Concatenate, an AveragePooling2D, a 1x1 strided
    MaxPooling2D and keras.ops.split's outputs directly (no BN, no activation)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((12, 12, 3))
    a = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", name="branch")(a)
    add = keras.layers.Add(name="add")([a, b])
    c = keras.layers.Conv2D(8, 1, name="after_add")(add)
    d = keras.layers.Conv2D(8, 3, name="after_add_pad")(keras.layers.ZeroPadding2D(name="pad")(add))
    cat = keras.layers.Concatenate(name="cat")([c, d])
    e = keras.layers.Conv2D(8, 3, padding="same", name="after_cat")(cat)
    left, right = keras.ops.split(e, 2, axis=-1)
    f = keras.layers.Conv2D(4, 1, name="after_split")(left)
    g = keras.layers.AveragePooling2D(2, name="avg")(keras.layers.Concatenate()([f, right]))
    h = keras.layers.Conv2D(8, 3, padding="same", name="after_avg")(g)
    i = keras.layers.MaxPooling2D(1, strides=2, name="subsample")(h)
    j = keras.layers.DepthwiseConv2D(3, padding="same", name="after_subsample")(i)
    out = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(j))
    return keras.Model(inp, out, name="linear_sources")


@pytest.mark.parametrize("bits", [8, 4])
def test_convs_reading_adds_concatenations_splits_and_poolings_become_linear_blocks(bits):
    """Each conv group reading such a tensor is one linear normalization="none" block
    (two heads where two convs read the Add, one through its ZeroPadding2D); the
    report counts its code instead of the float tensor; outputs are the original's
    and the gradients close to them (cosine per variable >= 0.995 at 8 bits, 0.98
    at 4: the code clips beyond 3 standard deviations and rounds, with no mask to
    make exact). The stem reads the model input: it stays."""
    model = linear_sources_cnn()
    # The Add's block is named after its first head (the one behind the padding).
    names = ["after_add_pad", "after_cat", "after_split", "after_avg", "after_subsample"]
    converted, report, _ = check_conversion(model, bits=bits, blocks=5, input_shape=(12, 12, 3),
                                            min_cosine={8: 0.995, 4: 0.98}[bits])
    assert sorted(report.blocks) == sorted(names)
    assert report.blocks["after_add_pad"] == ["pad", "after_add_pad", "after_add"]
    for name in names:
        block = converted.get_layer(name)
        assert block.normalization == "none" and block.activation.name == "linear"
        assert not block.return_activation
    assert len(converted.get_layer("after_add_pad").heads) == 2
    assert type(converted.get_layer("stem")) is keras.layers.Conv2D
    rows = {r.name: r for r in report.layers}
    n = BATCH * 12 * 12 * 8  # the Add's output elements
    assert rows["pad"].after == math.ceil(n * bits / 8)  # the block starts at the pad
    assert rows["after_add"].after == rows["after_add_pad"].after == 0
    assert rows["after_add"].before == n * 4
    # keras.ops.split keeps nothing for its backward (its gradient is a concatenation).
    (split,) = [r for r in report.layers if r.layer_type == "Split"]
    assert split.before == split.after == 0


def test_frozen_convs_reading_an_add_stay_stock():
    """A frozen conv's backward needs only its kernel: no code is made for its input."""
    model = linear_sources_cnn()
    model.get_layer("after_cat").trainable = False
    report = keras_blpa.memory_report(model, BATCH)
    assert "after_cat" not in report.blocks and "after_split" in report.blocks


def test_bn_read_by_drop_connect_becomes_a_block_without_heads():
    """EfficientNet's project BN -> Dropout(noise_shape=(None, 1, 1, 1)) -> Add: the
    Dropout keeps its own mask, not the BN output, so the BN becomes a linear block
    without heads whose output the Dropout reads; the same seeded masks give the
    original's outputs and close gradients."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="stem")(inp)
    y = keras.layers.Conv2D(6, 1, use_bias=False, name="project")(x)
    y = keras.layers.BatchNormalization(name="project_bn")(y)
    y = keras.layers.Dropout(0.5, noise_shape=(None, 1, 1, 1), seed=3, name="drop")(y)
    y = keras.layers.Add(name="add")([x, y])
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(y)))
    converted, report, _ = check_conversion(model, blocks=1, input_shape=(8, 8, 3))
    assert report.blocks == {"project_bn": ["project_bn"]}
    block = converted.get_layer("project_bn")
    assert not block.heads and block.activation.name == "linear"
    assert type(converted.get_layer("drop")) is keras.layers.Dropout
