"""Accuracy study on Fashion-MNIST: exact vs 8/4-bit vs naive quantisation.

Every mode trains the same pre-activation bottleneck ResNet (28x28x1 input)
from the same seeds, on the same data order and schedule (SGD, momentum 0.9,
cosine-decayed learning rate); the figure is the test error, mean and sample
standard deviation over the seeds. Before the test the BN moving statistics of
every model are recalibrated on 1000 training images (a short run leaves them
far from the weights' statistics).
"""

import statistics
import time

import keras
import numpy as np

from keras_blpa.benchmark import modes as modes_lib

__all__ = ["load_data", "recalibrate_batch_norm", "spread", "study", "train_one"]


def load_data(train_samples=None, test_samples=None, data_dir=None):
    """Standardised float32 Fashion-MNIST arrays (optionally the first N of each split)."""
    from keras_blpa.datasets import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir=data_dir)
    if train_samples:
        x_train, y_train = x_train[:train_samples], y_train[:train_samples]
    if test_samples:
        x_test, y_test = x_test[:test_samples], y_test[:test_samples]
    mean, std = 72.94, 90.02  # Fashion-MNIST training-set pixel statistics.
    prep = lambda x: ((x.astype(np.float32) - mean) / std)
    return (prep(x_train), y_train.astype(np.int32)), (prep(x_test), y_test.astype(np.int32))


def _batch_norm_layers(model):
    todo, found = list(model.layers), []
    while todo:
        layer = todo.pop()
        todo.extend(getattr(layer, "layers", []))
        if hasattr(layer, "moving_mean") and hasattr(layer, "momentum"):
            found.append(layer)
    return found


def recalibrate_batch_norm(model, images):
    """Sets every BN moving mean/variance to the statistics of ``images``.

    A short run leaves the moving averages (momentum 0.99) far from the
    weights' real statistics, so inference would measure the averages, not
    the training. One forward pass in training mode with momentum 0 fixes
    that, for every mode alike (the naive modes with their quantised forward).
    """
    layers = _batch_norm_layers(model)
    saved = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    model(images, training=True)
    for layer, momentum in zip(layers, saved):
        layer.momentum = momentum


class _EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch of a fit."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def train_one(mode, depth, seed, data, epochs, batch_size, learning_rate=0.05,
              recalibration_samples=1000, build=None):
    """Trains one model; returns a dict of its figures.

    The moving BN statistics are recalibrated on ``recalibration_samples``
    training images before the test (see `recalibrate_batch_norm`).

    Args:
        build: ``function(mode, input_shape) -> keras.Model`` (uncompiled),
            called right after seeding; by default the pre-activation ResNet
            of `depth` (`modes.build_model`).

    Returns:
        ``dict(test_error=% of the test images, train_loss=mean loss of the
        last epoch, train_s=seconds of the fit, epoch_s=[seconds of each epoch])``.
    """
    (x_train, y_train), (x_test, y_test) = data
    modes_lib.release()
    keras.utils.set_random_seed(seed)
    if build is None:
        model = modes_lib.build_model(mode, depth, 10, x_train.shape[1:])
    else:
        model = build(mode, x_train.shape[1:])
    steps = epochs * (len(x_train) // batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(1, steps), warmup_target=None
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    # The same shuffled order for every mode of a seed (whole batches only).
    order = np.random.default_rng(seed).permutation(len(x_train))
    order = order[: len(order) // batch_size * batch_size]
    timer = _EpochTimer()
    start = time.perf_counter()
    history = model.fit(x_train[order], y_train[order], batch_size=batch_size,
                        epochs=epochs, verbose=0, shuffle=False, callbacks=[timer])
    seconds = time.perf_counter() - start
    recalibrate_batch_norm(model, x_train[:recalibration_samples])
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    del model
    modes_lib.release()
    return dict(
        test_error=100.0 * (1.0 - float(accuracy)),
        train_loss=float(history.history["loss"][-1]),
        train_s=seconds,
        epoch_s=timer.seconds,
    )


def spread(values):
    """Sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def study(modes, depth, seeds, epochs, batch_size, train_samples=None,
          test_samples=None, data_dir=None, log=print, build=None, data=None,
          label=None, learning_rate=0.05):
    """Test error of each mode over seeds; returns a list of dicts.

    Args:
        build: as in `train_one` (default: the ResNet of `depth`).
        data: the `load_data` arrays (default: loaded with `train_samples`,
            `test_samples`, `data_dir`).
        label: what the log names the model by (default ``depth=<depth>``).
        learning_rate: the peak of the cosine schedule (`train_one`).
    """
    data = data if data is not None else load_data(train_samples, test_samples, data_dir)
    label = label or f"depth={depth}"
    rows = []
    for mode in modes:
        runs = []
        for seed in seeds:
            run = train_one(mode, depth, seed, data, epochs, batch_size,
                            learning_rate=learning_rate, build=build)
            runs.append(run)
            log(f"  accuracy {mode} {label} seed={seed}: test error "
                f"{run['test_error']:.2f}%, train loss {run['train_loss']:.4f} "
                f"({run['train_s']:.0f} s)")
        errors = [round(r["test_error"], 2) for r in runs]
        losses = [round(r["train_loss"], 4) for r in runs]
        rows.append(
            {
                "mode": mode,
                "depth": depth,
                "seeds": list(seeds),
                "epochs": epochs,
                "batch": batch_size,
                "train_samples": len(data[0][0]),
                "test_samples": len(data[1][0]),
                "test_error": errors,
                "mean": round(statistics.mean(errors), 2),
                "std": round(spread(errors), 2),
                "train_loss": losses,
                "train_loss_mean": round(statistics.mean(losses), 4),
                "train_s": [round(r["train_s"], 1) for r in runs],
                # Median epoch: the first epoch also traces and compiles the step.
                "epoch_s": round(statistics.median(s for r in runs for s in r["epoch_s"]), 2),
            }
        )
    return rows
