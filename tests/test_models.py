"""Tests of the ResNet factory (keras_blpa.models).

The reference network is built here, independently of the factory, from plain
Keras layers and the paper's description (pre-activation bottleneck units,
stage widths 16/32/64 and strides 1/2/2 for CIFAR, a shortcut taken after the
first BN+ReLU at each stage's first unit, average pooling + zero channel padding
on the shortcut). Its weights are randomised and copied into the factory's model
by variable path, so the layer names are checked too.
"""

import math
import re

import numpy as np
import pytest
import keras
import tensorflow as tf

from keras_blpa import models

STOCK_LAYERS = (
    keras.layers.InputLayer,
    keras.layers.Conv2D,
    keras.layers.BatchNormalization,
    keras.layers.ReLU,
    keras.layers.Add,
    keras.layers.AveragePooling2D,
    keras.layers.MaxPooling2D,
    keras.layers.Reshape,
    keras.layers.ZeroPadding3D,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.Dense,
)
# The paper's stage plans: (units, bottleneck width, stride) per stage.
CIFAR_PLAN = lambda n: [(n, 16, 1), (n, 32, 2), (n, 64, 2)]  # depth 9n + 2
IMAGENET26_PLAN = [(2, 64, 1), (2, 128, 2), (2, 256, 2), (2, 512, 2)]


def _reference_resnet(plan, num_classes, input_shape, stem="cifar", activation=None):
    """The pre-activation bottleneck ResNet from plain Keras layers (no factory code)."""

    def bn_relu_conv(x, filters, kernel, strides, name):
        a = keras.layers.BatchNormalization(epsilon=1e-3, name=f"{name}_bn")(x)
        a = keras.layers.ReLU()(a)
        conv = keras.layers.Conv2D(filters, kernel, strides, padding="same",
                                   use_bias=False, name=name)
        return conv(a), a

    inputs = keras.Input(input_shape)
    if stem == "cifar":
        x = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    else:
        x = keras.layers.Conv2D(64, 7, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
        x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    for s, (units, width, stride) in enumerate(plan, 1):
        for u in range(1, units + 1):
            name = f"stage{s}_unit{u}"
            y, act = bn_relu_conv(x, width, 1, 1, f"{name}_conv1")
            shortcut = act if u == 1 else x
            y, _ = bn_relu_conv(y, width, 3, stride if u == 1 else 1, f"{name}_conv2")
            y, _ = bn_relu_conv(y, 4 * width, 1, 1, f"{name}_conv3")
            if u == 1 and stride > 1:
                shortcut = keras.layers.AveragePooling2D(stride, padding="same")(shortcut)
            extra = 4 * width - shortcut.shape[-1]
            if extra:
                shortcut = keras.layers.Lambda(
                    lambda t, e=extra: keras.ops.pad(t, [[0, 0], [0, 0], [0, 0], [0, e]])
                )(shortcut)
            x = keras.layers.Add()([y, shortcut])
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="final_bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    outputs = keras.layers.Dense(num_classes, activation=activation, name="predictions")(x)
    return keras.Model(inputs, outputs)


def _factory_path(path, bits):
    """The factory's variable path for a reference path: with bits set, the BN
    ``..._convK_bn`` and conv ``..._convK`` of a unit are one ApproxConvBlock."""
    if bits is None:
        return path
    return re.sub(r"^(stage\d+_unit\d+_conv\d)_bn/", r"\1/", path)


def _randomise_and_copy(reference, model, bits, seed=0):
    """Random non-trivial weights in the reference, copied into `model` by path."""
    rng = np.random.default_rng(seed)
    by_path = {v.path: v for v in model.weights}
    assert sorted(_factory_path(v.path, bits) for v in reference.weights) == sorted(by_path)
    for v in reference.weights:
        kind = v.path.rsplit("/", 1)[-1]
        if kind in ("gamma", "moving_variance"):
            value = rng.uniform(0.5, 1.5, v.shape)
        elif kind in ("beta", "moving_mean"):
            value = rng.normal(0.0, 0.5, v.shape)
        else:
            value = v.numpy() + rng.normal(0.0, 0.02, v.shape)
        v.assign(value.astype("float32"))
        by_path[_factory_path(v.path, bits)].assign(v)


def _gradients(model, x):
    """{variable path: gradient} of a training-mode loss."""
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(3.0 * model(x, training=True)))
    grads = tape.gradient(loss, model.trainable_variables)
    return {v.path: g.numpy() for v, g in zip(model.trainable_variables, grads)}


def _cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def bottleneck_params(c_in, c):
    """Parameters of one pre-activation bottleneck unit, counted by hand."""
    params = 0
    for cin, k, cout in ((c_in, 1, c), (c, 3, c), (c, 1, 4 * c)):
        params += 4 * cin + k * k * cin * cout  # BN (4 vectors) + kernel
    return params


def cifar_params(depth, num_classes, channels=3, width=1):
    """Independent count of the CIFAR ResNet's parameters."""
    n = (depth - 2) // 9
    total = 3 * 3 * channels * 16 * width  # stem conv
    c_in = 16 * width
    for c in (16 * width, 32 * width, 64 * width):
        for _ in range(n):
            total += bottleneck_params(c_in, c)
            c_in = 4 * c
    total += 4 * c_in  # final BN
    total += c_in * num_classes + num_classes  # dense
    return total


@pytest.mark.parametrize("bits", [None, 2, 4, 8])
def test_forward_matches_reference(bits):
    """Every build's forward pass is the reference network's (the forward is exact)."""
    model = models.resnet(20, 10, (28, 28, 1), bits=bits)
    reference = _reference_resnet(CIFAR_PLAN(2), 10, (28, 28, 1), activation="softmax")
    _randomise_and_copy(reference, model, bits)
    x = np.random.default_rng(1).normal(size=(4, 28, 28, 1)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            model(x, training=training), reference(x, training=training),
            rtol=1e-4, atol=1e-5,
        )


def test_imagenet_stem_matches_reference():
    model = models.resnet(26, 7, (32, 32, 3), bits=None, stem="imagenet",
                          classifier_activation=None)
    reference = _reference_resnet(IMAGENET26_PLAN, 7, (32, 32, 3), stem="imagenet")
    _randomise_and_copy(reference, model, None)
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=True), reference(x, training=True),
                               rtol=1e-4, atol=1e-4)


def _error_per_block(bits):
    """Bound on the variance of one block's decoded-activation error, in units of
    the normalised activation's variance: w^2/12 within the bins (w = 6/2^K, the
    bin width in std units; uniform error within a bin) plus the clipping of a
    Gaussian activation beyond the +-3 std that the 2^K bins span, independent
    of K: 2 E[(|X| - 3)^2; |X| > 3] = 2 ((1 + 9)(1 - Phi(3)) - 3 phi(3))."""
    tail = 0.5 * math.erfc(3 / math.sqrt(2))
    density = math.exp(-4.5) / math.sqrt(2 * math.pi)
    return (6 / 2**bits) ** 2 / 12 + 2 * (10 * tail - 3 * density)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_gradients_match_reference(bits):
    """Per-variable gradients, matched by path, against the exact reference.

    bits=None: equal. bits=K: each of the L compressed blocks adds an error of
    relative variance at most `_error_per_block(K)` to the gradients below it,
    so on average over the variables 1 - cos <= L * e, and for any one variable
    (small, cancelling gradients) the looser 1 - cos <= 12 * L * e (the bounds
    of tests/test_layers.py's deep stack, which has no clipping term).
    """
    depth = 11
    model = models.resnet(depth, 10, (16, 16, 3), bits=bits, classifier_activation=None)
    reference = _reference_resnet(CIFAR_PLAN(1), 10, (16, 16, 3))
    _randomise_and_copy(reference, model, bits)
    x = np.random.default_rng(3).normal(size=(8, 16, 16, 3)).astype("float32")
    got, want = _gradients(model, x), _gradients(reference, x)
    assert sorted(got) == sorted(_factory_path(p, bits) for p in want)
    if bits is None:
        for path, g in want.items():
            np.testing.assert_allclose(got[path], g, rtol=2e-3, atol=2e-5, err_msg=path)
        return
    cos = {p: _cosine(got[_factory_path(p, bits)], g) for p, g in want.items()}
    blocks = 3 * (3 * (depth - 2) // 9)  # 3 compressed blocks per unit
    bound = blocks * _error_per_block(bits)
    assert 1 - np.mean(list(cos.values())) <= bound, cos
    assert 1 - min(cos.values()) <= 12 * bound, cos
    # The same bound on the whole error, |g - g_exact|^2 / |g_exact|^2, catches a
    # wrong scale too (to which the cosine is blind).
    for p, g in want.items():
        error = np.sum((got[_factory_path(p, bits)] - g) ** 2) / np.sum(g**2)
        assert error <= 12 * bound, (p, error)
    # The classifier sees the exact forward activations: its gradient is exact.
    np.testing.assert_allclose(got["predictions/kernel"], want["predictions/kernel"],
                               rtol=1e-3, atol=1e-5)


def test_stage_plan_is_the_papers():
    assert models.stage_plan(164) == ((18, 18, 18), (16, 32, 64), (1, 2, 2))
    assert models.stage_plan(1001) == ((111, 111, 111), (16, 32, 64), (1, 2, 2))
    assert models.stage_plan(152, "imagenet") == ((3, 8, 36, 3), (64, 128, 256, 512),
                                                  (1, 2, 2, 2))
    assert models.stage_plan(50, "imagenet")[0] == (3, 4, 6, 3)


def test_from_preset(monkeypatch):
    model = models.from_preset("resnet164_cifar100", bits=None, name="baseline")
    assert model.name == "baseline" and model.output_shape == (None, 100)
    assert model.count_params() == cifar_params(164, 100)
    assert all(type(layer) in STOCK_LAYERS for layer in model.layers)
    # Every preset is a valid architecture (checked without building the big ones).
    calls = []
    monkeypatch.setattr(models, "resnet", lambda **kw: calls.append(kw))
    for name in models.PRESETS:
        models.from_preset(name, width=2)
        models.stage_plan(calls[-1]["depth"], calls[-1].get("stem", "cifar"))
        assert calls[-1]["width"] == 2
    assert calls[2]["depth"] == 1001 and calls[3]["input_shape"] == (224, 224, 3)
    with pytest.raises(ValueError, match="preset='resnet50'"):
        models.from_preset("resnet50")


def test_resnet164_cifar10_params():
    approx = models.resnet(164, 10, (32, 32, 3), bits=4)
    stock = models.resnet(164, 10, (32, 32, 3), bits=None)
    assert approx.count_params() == stock.count_params() == cifar_params(164, 10)
    assert 1.6e6 < approx.count_params() < 1.8e6  # "about 1.7M" (paper)
    assert approx.output_shape == (None, 10)


@pytest.mark.parametrize("depth,width", [(11, 1), (20, 2), (29, 1)])
def test_depth_and_width_param_counts(depth, width):
    model = models.resnet(depth, 100, (32, 32, 3), bits=4, width=width)
    assert model.count_params() == cifar_params(depth, 100, width=width)
    convs = [l for l in model.layers if l.name.endswith("_conv2")]
    assert len(convs) == 3 * (depth - 2) // 9
    assert model.get_layer("final_bn").output.shape[-1] == 256 * width


def test_stock_build_uses_stock_layers_only():
    model = models.resnet(20, 10, (32, 32, 3), bits=None)
    for layer in model.layers:
        assert type(layer) in STOCK_LAYERS, layer
        assert not type(layer).__module__.startswith("keras_blpa")
    blpa = models.resnet(20, 10, (32, 32, 3), bits=4)
    kinds = {type(l).__name__ for l in blpa.layers}
    assert {"ApproxConvBlock", "ResidualBuffer"} <= kinds


def test_copy_weights_across_builds():
    """copy_weights maps each ApproxConvBlock onto its stock BN + Conv2D pair."""
    model = models.resnet(20, 10, (16, 16, 3), bits=4, classifier_activation=None)
    stock = models.resnet(20, 10, (16, 16, 3), bits=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for v in model.weights:
        v.assign(v + rng.normal(0, 0.1, v.shape).astype("float32"))
    models.copy_weights(model, stock)
    source = {v.path: v.numpy() for v in model.weights}
    for v in stock.weights:
        path = re.sub(r"^(stage\d+_unit\d+_conv\d)_bn/", r"\1/", v.path)
        np.testing.assert_array_equal(v.numpy(), source[path], err_msg=v.path)
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            model(x, training=training), stock(x, training=training), rtol=1e-4, atol=1e-4
        )
    with pytest.raises(ValueError, match="same architecture"):
        models.copy_weights(model, models.resnet(11, 10, (16, 16, 3), bits=None))


def test_imagenet_stem():
    model = models.resnet(26, 7, (64, 64, 3), bits=4, stem="imagenet")
    assert model(np.zeros((1, 64, 64, 3), "float32")).shape == (1, 7)
    assert model.get_layer("final_bn").output.shape[1:] == (2, 2, 2048)
    big = models.resnet(152, 1000, (224, 224, 3), bits=None, stem="imagenet")
    n_units = sum(1 for l in big.layers if l.name.endswith("_add"))
    assert n_units == 3 + 8 + 36 + 3


@pytest.mark.parametrize("depth", [0, 10, 12, 165, "164"])
def test_invalid_depth_lists_valid_depths(depth):
    with pytest.raises(ValueError, match=r"9n \+ 2") as info:
        models.resnet(depth, 10, (32, 32, 3))
    if depth == 165:
        assert "164" in str(info.value) and "173" in str(info.value)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="depth"):
        models.resnet(164, 10, (224, 224, 3), stem="imagenet")
    with pytest.raises(ValueError, match="stem"):
        models.resnet(20, 10, (32, 32, 3), stem="mnist")
    with pytest.raises(ValueError, match="bits"):
        models.resnet(20, 10, (32, 32, 3), bits=3)
    with pytest.raises(ValueError, match="width"):
        models.resnet(20, 10, (32, 32, 3), width=0)
    with pytest.raises(ValueError, match="num_classes=0"):
        models.resnet(20, 0, (32, 32, 3))
    with pytest.raises(ValueError, match="quantization='fp8'"):
        models.resnet(20, 10, (32, 32, 3), quantization="fp8")
    with pytest.raises(ValueError, match=r"input_shape=\(32, 32\)"):
        models.resnet(20, 10, (32, 32))
    with pytest.raises(ValueError, match="weight_decay=-0.1"):
        models.resnet(20, 10, (32, 32, 3), weight_decay=-0.1)


@pytest.mark.parametrize("bits", [4, None])
def test_save_load_round_trip(bits, tmp_path):
    model = models.resnet(11, 10, (16, 16, 3), bits=bits, weight_decay=2e-4)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.random.default_rng(1).normal(size=(8, 16, 16, 3)).astype("float32")
    model.fit(x, np.arange(8) % 10, epochs=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    assert [type(l) for l in loaded.layers] == [type(l) for l in model.layers]
    assert len(loaded.losses) == len(model.losses) > 0  # weight decay kept


def test_weight_decay_is_l2_with_sgd_gradient():
    model = models.resnet(11, 10, (8, 8, 3), bits=4, weight_decay=2e-4)
    kernel = model.get_layer("stem_conv").kernel
    expected = 1e-4 * float(tf.reduce_sum(tf.square(kernel)))
    assert any(abs(float(l) - expected) < 1e-9 for l in model.losses)


def test_recompute_wrapper_matches_plain_gradients():
    plain = models.resnet(11, 10, (8, 8, 3), bits=None)
    wrapped = models.resnet(11, 10, (8, 8, 3), bits=None, unit_wrapper=models.RecomputeGrad)
    assert wrapped.count_params() == plain.count_params()
    models.copy_weights(plain, wrapped)
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype("float32")
    grads = [_gradients(model, x) for model in (plain, wrapped)]
    # The same variables, matched by path (units nested in sub-models keep theirs).
    assert sorted(grads[0]) == sorted(grads[1])
    for path, g in grads[0].items():
        np.testing.assert_allclose(grads[1][path], g, rtol=1e-4, atol=1e-6, err_msg=path)


def test_remat_scope_around_stock_build_trains_as_without():
    """keras.RematScope (the benchmark's peer mode) around the stock build: one
    fit step gives the loss and new weights of the same build without it."""
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype("float32")
    y = np.arange(4) % 10
    plain = models.resnet(11, 10, (8, 8, 3), bits=None)
    with keras.RematScope(mode="activations"):
        remat = models.resnet(11, 10, (8, 8, 3), bits=None)
    remat.set_weights(plain.get_weights())
    before = plain.get_weights()
    losses = []
    for model in plain, remat:
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
        losses.append(model.train_on_batch(x, y))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert not np.allclose(plain.get_weights()[0], before[0])
    for a, b in zip(remat.get_weights(), plain.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_unknown_input_sizes_are_named():
    """The shortcuts are sized at build time: unknown sizes get an error naming input_shape."""
    for shape in [(None, None, 3), (32, 32, None)]:
        with pytest.raises(ValueError, match=rf"known input_shape.*Received: input_shape={re.escape(str(shape))}"):
            models.resnet(11, 10, shape)


@pytest.mark.parametrize("bits", [None, 4])
def test_channels_last_whatever_the_image_data_format(bits):
    """input_shape is (height, width, channels) in every build: under a channels_first
    configuration the factory's model equals the one built channels_last."""
    reference = models.resnet(11, 10, (8, 8, 3), bits=bits)
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        model = models.resnet(11, 10, (8, 8, 3), bits=bits)
    finally:
        keras.config.set_image_data_format(previous)
    models.copy_weights(reference, model)
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(model(x, training=training), reference(x, training=training), rtol=1e-5, atol=1e-6)
