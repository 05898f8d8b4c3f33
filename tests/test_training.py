"""Tests of keras_blpa.training: schedule, gradient accumulation, strategies."""

import json

import numpy as np
import pytest
import keras

from keras_blpa import training


def test_paper_schedule_values():
    schedule = training.PaperSchedule(0.1, total_steps=64000, warmup_steps=400)
    expected = {0: 0.01, 399: 0.01, 400: 0.1, 31999: 0.1, 32000: 0.01,
                47999: 0.01, 48000: 0.001, 63999: 0.001}
    for step, lr in expected.items():
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


def test_paper_schedule_serialises():
    schedule = training.PaperSchedule(0.05, total_steps=1000, warmup_steps=10)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    config = keras.optimizers.serialize(optimizer)
    restored = keras.optimizers.deserialize(json.loads(json.dumps(config)))
    assert isinstance(restored._learning_rate, training.PaperSchedule)
    for step in (0, 10, 499, 500, 750):
        assert float(restored._learning_rate(step)) == pytest.approx(float(schedule(step)))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(learning_rate=0), "learning_rate=0"),
        (dict(total_steps=0), "total_steps=0"),
        (dict(total_steps=2.5), "total_steps=2.5"),
        (dict(warmup_steps=-1), "warmup_steps=-1"),
        (dict(boundaries=(0.8, 0.5)), r"boundaries=\(0.8, 0.5\)"),
        (dict(boundaries=(0.5, 1.0)), r"boundaries=\(0.5, 1.0\)"),
    ],
)
def test_paper_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        training.PaperSchedule(**kwargs)


def test_make_optimizer_schedule_counts_updates():
    optimizer = training.make_optimizer(0.1, total_steps=100, warmup_steps=10, accumulation_steps=4)
    assert optimizer.gradient_accumulation_steps == 4
    schedule = optimizer._learning_rate
    # 10 warm-up updates = 40 micro-batches; the first drop after 50 updates.
    assert float(schedule(39)) == pytest.approx(0.01)
    assert float(schedule(40)) == pytest.approx(0.1)
    assert float(schedule(200)) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="accumulation_steps=0"):
        training.make_optimizer(accumulation_steps=0)


def _tiny_model():
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)])
    return model


def test_gradient_accumulation_equals_large_batch_step():
    """k micro-batches of B accumulated == one step on the batch of k*B (numpy-free reference: stock fit)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype("float32")
    y = rng.integers(0, 3, 24)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    big = _tiny_model()
    big.compile(keras.optimizers.SGD(0.5, momentum=0.9), loss)
    big.fit(x, y, batch_size=12, epochs=1, shuffle=False, verbose=0)  # 2 updates

    small = _tiny_model()
    small.compile(training.make_optimizer(0.5, total_steps=10**6, warmup_steps=0,
                                          momentum=0.9, accumulation_steps=3), loss)
    small.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)  # 6 micro-batches
    for a, b in zip(big.get_weights(), small.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(big.get_weights()[0], _tiny_model().get_weights()[0])


def test_make_strategy_by_name(monkeypatch):
    assert training.make_strategy("none").num_replicas_in_sync == 1
    with pytest.raises(ValueError, match="'mirrorred'"):
        training.make_strategy("mirrorred")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        training.make_strategy("multiworker")


def test_check_batch_size():
    class Fake:
        num_replicas_in_sync = 4

    assert training.check_batch_size(128, Fake()) == 32
    for bad in (130, 0, 2.0):
        with pytest.raises(ValueError, match="divisible by the 4 replicas"):
            training.check_batch_size(bad, Fake())
