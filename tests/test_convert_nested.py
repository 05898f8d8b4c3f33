"""convert() and memory_report() on nested models: a backbone called as a layer, a
keras-hub task around its backbone, a frozen base, custom layers, already converted
models. References: the original model's outputs and gradients, and bytes counted
with numpy from the layers' shapes."""

import warnings

import keras
import keras_hub
import numpy as np
import pytest

import keras_blpa
from chains import input_and_weight_gradients
from keras_blpa import ApproxConvBlock

BATCH = 4
SHAPE = (16, 16, 3)


def backbone(name="backbone"):
    """Conv stem, then two BN -> ReLU -> Conv chains with a residual add (seed 0)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    y = keras.layers.ReLU(name="relu1")(keras.layers.BatchNormalization(name="bn1")(x))
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(y)
    y = keras.layers.ReLU(name="relu2")(keras.layers.BatchNormalization(name="bn2")(y))
    y = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(y)
    out = keras.layers.Add(name="add")([x, y])
    return keras.Model(inp, out, name=name)


def with_head(base):
    inp = keras.Input(SHAPE)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(base(inp))
    return keras.Model(inp, keras.layers.Dense(10, name="head")(x), name="classifier")


def blocks_in(model):
    found = []
    for layer in model.layers:
        if isinstance(layer, ApproxConvBlock):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += blocks_in(layer)
    return found


def data(seed=0):
    return np.random.default_rng(seed).normal(size=(BATCH,) + SHAPE).astype("float32")


def test_nested_backbone_converts_with_the_same_forward_and_exact_gradients(tmp_path):
    """The blocks are inside the nested model; bits=None gives the original's
    gradients; the report's rows are the backbone's, prefixed by its name; .keras
    round trip."""
    original = with_head(backbone())
    x = data()
    converted, report = keras_blpa.convert(original, bits=4, return_report=True, batch_size=BATCH)
    assert converted.get_layer("backbone").name == "backbone"
    assert [b.name for b in blocks_in(converted)] == ["conv1", "conv2"]
    assert sorted(report.blocks) == ["backbone/conv1", "backbone/conv2"]
    for training in (True, False):
        np.testing.assert_allclose(converted(x, training=training), original(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    exact = keras_blpa.convert(original, bits=None)
    for got, want in zip(input_and_weight_gradients(exact, x, 1.0),
                         input_and_weight_gradients(original, x, 1.0)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Bytes by hand: the stem keeps the image; each block its 4-bit code of a
    # 16x16x8 input; the head its 8 pooled floats; the add and the pooling nothing.
    n = BATCH * 16 * 16 * 8
    rows = {r.name: r for r in report.layers}
    assert rows["backbone/stem"].after == BATCH * 16 * 16 * 3 * 4
    assert rows["backbone/bn1"].after == rows["backbone/bn2"].after == n * 4 // 8
    assert rows["head"].after == BATCH * 8 * 4
    assert report.after_bytes == BATCH * 16 * 16 * 3 * 4 + 2 * (n // 2) + BATCH * 8 * 4
    # Before: each BN keeps its input and each ReLU its output (n floats each).
    assert report.before_bytes == BATCH * 16 * 16 * 3 * 4 + 4 * n * 4 + BATCH * 8 * 4
    again = keras_blpa.memory_report(converted, batch_size=BATCH)
    assert again.before_bytes == again.after_bytes == report.after_bytes
    path = tmp_path / "nested.keras"
    converted.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x, training=False), converted(x, training=False))


def test_shared_backbone_counts_each_call():
    """A backbone called on two inputs (a siamese net) keeps each call's activations:
    the report counts the backbone's rows twice, each as much as one call's."""
    base = backbone()
    left, right = keras.Input(SHAPE), keras.Input(SHAPE)
    merged = keras.layers.Concatenate(name="merge")([base(left), base(right)])
    siamese = keras.Model([left, right], merged)
    single = keras_blpa.memory_report(with_head(base), BATCH)
    twice = keras_blpa.memory_report(siamese, BATCH)
    rows = [r for r in single.layers if r.name.startswith("backbone/")]
    calls = [r for r in twice.layers if r.name.startswith("backbone/")]
    assert len(calls) == 2 * len(rows)
    for attr in ("before", "after"):
        per_call = sum(getattr(r, attr) for r in rows)
        assert per_call > 0 and sum(getattr(r, attr) for r in calls) == 2 * per_call, attr


def test_frozen_base_keeps_nothing_and_stays_stock():
    """base.trainable = False before a trainable head: the backward pass never reaches
    the base, so nothing there is converted or counted, and the warning says why."""
    base = backbone()
    base.trainable = False
    original = with_head(base)
    with pytest.warns(UserWarning, match=r"4 x frozen: no trainable weight"):
        converted, report = keras_blpa.convert(original, return_report=True, batch_size=BATCH)
    assert not blocks_in(converted) and not report.blocks
    assert report.before_bytes == report.after_bytes == BATCH * 8 * 4  # the head's input
    assert not converted.get_layer("backbone").trainable
    assert len(converted.trainable_weights) == 2


def test_frozen_bn_and_stem_before_trainable_convs_still_convert():
    """Only the BN layers and the stem frozen: the convs' kernel gradients read the
    activations, so both chains convert."""
    base = backbone()
    for name in ("stem", "bn1", "bn2"):
        base.get_layer(name).trainable = False
    converted = keras_blpa.convert(with_head(base))
    assert [b.name for b in blocks_in(converted)] == ["conv1", "conv2"]


class Doubler(keras.layers.Layer):
    """A custom layer: the report cannot know what its backward keeps."""

    def call(self, x):
        return 2.0 * keras.ops.tanh(x)


def test_custom_layer_is_reported_unknown_with_its_input_and_output():
    inp = keras.Input(SHAPE)
    x = keras.layers.Conv2D(8, 3, padding="same", name="stem")(inp)
    x = Doubler(name="doubler")(x)
    out = keras.layers.Dense(3, name="head")(keras.layers.GlobalAveragePooling2D()(x))
    report = keras_blpa.memory_report(keras.Model(inp, out), batch_size=BATCH)
    row = {r.name: r for r in report.layers}["doubler"]
    assert row.after == row.before == 2 * BATCH * 16 * 16 * 8 * 4
    assert row.reason.startswith("unknown: custom layer Doubler")


def test_already_converted_model_says_so():
    converted = keras_blpa.convert(with_head(backbone()), bits=4)
    with pytest.warns(UserWarning, match=r"is already converted \(2 compressed ApproxConvBlock"):
        again = keras_blpa.convert(converted, bits=4)
    x = data()
    np.testing.assert_array_equal(again(x, training=False), converted(x, training=False))


def test_warning_counts_each_distinct_cause():
    """Three BN -> tanh chains and three BN -> ReLU -> dilated conv chains: two causes,
    each said once with its count of layers, whatever the layers' names."""
    inp = keras.Input(SHAPE)
    x = inp
    for i in range(3):
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.Activation("tanh", name=f"tanh{i}")(x)
        x = keras.layers.Conv2D(3, 3, padding="same", name=f"conv{i}")(x)
    for i in range(3):
        x = keras.layers.ReLU(name=f"relu{i}")(keras.layers.BatchNormalization(name=f"dbn{i}")(x))
        x = keras.layers.Conv2D(3, 3, padding="same", dilation_rate=2, name=f"dilated{i}")(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras_blpa.convert(keras.Model(inp, x))
    (message,) = [str(w.message) for w in caught]
    assert message.count("tanh") == 1, message
    assert "3 x its activation is tanh, not one the block computes" in message, message
    assert "6 x BN -> activation output feeds no convertible" in message, message
    assert "3 x Conv2D has dilation_rate=(2, 2)" in message and message.count("dilation") == 2, message
    assert "dilated0" not in message, message


def hub_resnet(pre_activation):
    keras.utils.set_random_seed(0)
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 32],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=pre_activation, image_shape=(32, 32, 3),
    )


@pytest.mark.parametrize("pre_activation", [True, False])
def test_keras_hub_classifier_converts_into_its_own_class(pre_activation, tmp_path):
    """convert(task) gives a task of the same class around the converted backbone:
    it predicts as the original, fits, saves and loads; the backbone keeps its
    pyramid_outputs, which give the original's feature maps."""
    task = keras_hub.models.ResNetImageClassifier(backbone=hub_resnet(pre_activation), num_classes=4)
    x = np.random.default_rng(1).normal(size=(BATCH, 32, 32, 3)).astype("float32")
    converted, report = keras_blpa.convert(task, bits=4, return_report=True, batch_size=BATCH)
    assert type(converted) is keras_hub.models.ResNetImageClassifier
    assert len(blocks_in(converted.backbone)) == len(report.blocks) >= 3
    assert all(name.startswith(task.backbone.name + "/") for name in report.blocks)
    for training in (True, False):
        np.testing.assert_allclose(converted(x, training=training), task(x, training=training),
                                   rtol=1e-4, atol=1e-5)
    old_pyramid = task.backbone.pyramid_outputs
    new_pyramid = converted.backbone.pyramid_outputs
    assert sorted(new_pyramid) == sorted(old_pyramid)
    features = keras.Model(converted.backbone.inputs, new_pyramid)(x, training=False)
    reference = keras.Model(task.backbone.inputs, old_pyramid)(x, training=False)
    for level in old_pyramid:
        np.testing.assert_allclose(features[level], reference[level], rtol=1e-4, atol=1e-5)
    converted.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
    history = converted.fit(x, np.arange(BATCH) % 4, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    path = tmp_path / "task.keras"
    converted.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_hub.models.ResNetImageClassifier
    np.testing.assert_allclose(loaded.predict(x, verbose=0), converted.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
