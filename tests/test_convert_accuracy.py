"""The convert-accuracy study (keras_blpa.benchmark.convert_accuracy): a tiny run of
the CLI on MobileNetV2 (alpha 0.35), checking that the 4-bit model is really
compressed, starts from the stock model's loss (the forward is exact), trains, and
that the outputs have their schema."""

import json

import keras
import numpy as np
import pytest

from keras_blpa import ApproxConvBlock
from keras_blpa.benchmark import accuracy
from keras_blpa.benchmark import convert_accuracy as ca


@pytest.fixture(scope="module")
def raw():
    return accuracy.load_data(128, 100)


@pytest.fixture(scope="module")
def data(raw):
    return ca.prepare(raw)


def test_prepare_shapes(data):
    (x_train, y_train), (x_test, _) = data
    assert x_train.shape == (128, 32, 32, 3) and x_test.shape == (100, 32, 32, 3)
    assert x_train.dtype == np.float32 and y_train.shape == (128,)
    np.testing.assert_array_equal(x_train[..., 0], x_train[..., 2])


def test_blpa4_starts_from_the_stock_loss(data):
    (x, y), _ = data
    losses, models = {}, {}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for mode in ("exact", "blpa4"):
        keras.utils.set_random_seed(0)
        models[mode] = ca.build("mobilenetv2", mode, x.shape[1:], alpha=0.35)
        losses[mode] = float(loss(y[:32], models[mode](x[:32], training=True)))
    assert ca.count_blocks(models["exact"]) == 0
    assert ca.count_blocks(models["blpa4"]) > 10
    assert abs(losses["exact"] - losses["blpa4"]) < 1e-5, losses


def test_cli_tiny_run(raw, tmp_path, monkeypatch):
    built = []

    def keep(name, mode, shape, alpha=1.0):
        model = build(name, mode, shape, alpha)
        built.append((mode, model, [w.numpy().copy() for w in model.trainable_weights]))
        return model

    build = ca.build
    monkeypatch.setattr(ca, "build", keep)
    monkeypatch.setattr(accuracy, "load_data", lambda *a, **k: raw)
    argv = ["--out", str(tmp_path), "--models", "mobilenetv2", "--alpha", "0.35",
            "--seeds", "0", "--epochs", "1", "--train-samples", "128", "--batch", "32", "--test-samples", "100"]
    assert ca.main(argv) == 0

    assert [mode for mode, _, _ in built] == ["exact", "blpa4"]
    for mode, model, before in built:
        moved = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
        assert sum(moved) > 0.9 * len(moved), (mode, sum(moved), len(moved))
    blocks = [layer for layer in built[1][1].layers if isinstance(layer, ApproxConvBlock)]
    assert blocks and all(not np.array_equal(b, w.numpy()) for layer in blocks
                          for b, w in zip(_before(built[1], layer), layer.trainable_weights))

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["command"].startswith(ca.COMMAND + " --out ")
    assert results["meta"]["steps"] == 4
    exact, blpa4 = results["rows"]
    assert (exact["mode"], blpa4["mode"]) == ("exact", "blpa4")
    assert exact["blocks"] == 0 and blpa4["blocks"] == len(blocks)
    for row in results["rows"]:
        assert {"model", "test_error", "mean", "std", "train_loss", "train_loss_mean",
                "train_loss_std", "train_s", "steps", "learning_rate"} <= set(row)
        assert row["test_samples"] == 100 and len(row["test_error"]) == 1
    assert "verdict" not in exact and isinstance(blpa4["verdict"]["within"], bool)
    md = (tmp_path / "results.md").read_text()
    assert results["meta"]["command"] in md and "| mobilenetv2 | blpa4 |" in md
    assert (tmp_path / "convert_accuracy.png").stat().st_size > 0


def _before(entry, layer):
    """The initial values of `layer`'s trainable weights in a `built` entry."""
    _, model, before = entry
    ids = [id(w) for w in model.trainable_weights]
    return [before[ids.index(id(w))] for w in layer.trainable_weights]


def test_verdict_rule():
    exact = {"test_error": [10.0, 12.0], "train_loss": [0.5, 0.5]}
    near = ca.verdict({"test_error": [11.0, 12.0], "train_loss": [0.5, 0.5]}, exact)
    far = ca.verdict({"test_error": [14.0, 14.2], "train_loss": [0.5, 0.5]}, exact)
    assert near["within"] and not far["within"]
    assert far["test_error"]["delta"] == pytest.approx(3.1)
    assert far["test_error"]["bound"] == pytest.approx(np.std([10.0, 12.0], ddof=1), abs=1e-4)
