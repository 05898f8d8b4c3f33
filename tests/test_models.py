"""Tests of the ResNet factory (keras_blpa.models)."""

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


@pytest.mark.parametrize("bits", [2, 4, 8, None])
def test_output_shape_small_inputs(bits):
    model = models.resnet(11, 10, (28, 28, 1), bits=bits)
    out = model(np.zeros((2, 28, 28, 1), "float32"), training=False)
    assert out.shape == (2, 10)
    np.testing.assert_allclose(np.sum(out, axis=-1), 1.0, rtol=1e-5)


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


@pytest.mark.parametrize("bits", [4, None])
def test_forward_matches_stock_build(bits):
    """Same weights: the compressed model's forward equals the stock model's."""
    model = models.resnet(20, 10, (16, 16, 3), bits=bits, classifier_activation=None)
    stock = models.resnet(20, 10, (16, 16, 3), bits=None, classifier_activation=None)
    rng = np.random.default_rng(0)
    for v in model.weights:  # non-trivial BN parameters
        v.assign(v + rng.normal(0, 0.1, v.shape).astype("float32"))
    models.copy_weights(model, stock)
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    for training in (False, True):
        np.testing.assert_allclose(
            model(x, training=training), stock(x, training=training), rtol=1e-4, atol=1e-4
        )


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
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet(20, 0, (32, 32, 3))


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
    grads = []
    for model in (plain, wrapped):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(model(x, training=True) ** 2)
        grads.append(tape.gradient(loss, model.trainable_variables))
    # Same variables in a different order: compare sorted norms.
    norms = [sorted(float(tf.norm(g)) for g in gs) for gs in grads]
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-4)


def test_remat_scope_around_stock_build_fits():
    with keras.RematScope(mode="activations"):
        model = models.resnet(11, 10, (8, 8, 3), bits=None)
    model.compile("sgd", "sparse_categorical_crossentropy")
    x = np.zeros((4, 8, 8, 3), "float32")
    model.fit(x, np.zeros(4), epochs=1, verbose=0)
