"""The training modes the benchmark compares, each built as a compiled keras.Model.

- ``exact``: the stock-Keras ResNet (``keras_blpa.resnet(..., bits=None)``).
- ``remat``: the same network built under ``keras.RematScope(mode="activations")``,
  Keras' own memory saver in the mode that works with ``model.fit``.
- ``recompute``: the same network with every residual unit wrapped in
  ``tf.recompute_grad`` on TensorFlow, ``jax.checkpoint`` on JAX (only the unit
  inputs are kept; each unit's interior is recomputed in the backward pass).
- ``blpa8`` / ``blpa4``: keras_blpa, exact forward, backward from 8/4-bit codes.
- ``naive8`` / ``naive4``: the paper's baseline, quantised activations in the
  forward pass too.

Every mode runs on the Keras backend in use (TensorFlow or JAX).
"""

import gc

import keras
import numpy as np

from keras_blpa import validation

__all__ = [
    "DESCRIPTIONS",
    "MODES",
    "build_model",
    "build_state",
    "check_modes",
    "code_args",
    "compile_model",
    "random_batch",
    "release",
    "train_step",
]

MODES = ("exact", "remat", "recompute", "blpa8", "blpa4", "naive8", "naive4")

DESCRIPTIONS = {
    "exact": "stock Keras layers (exact)",
    "remat": 'keras.RematScope(mode="activations")',
    "recompute": "tf.recompute_grad / jax.checkpoint around each residual unit",
    "blpa8": "keras_blpa 8-bit",
    "blpa4": "keras_blpa 4-bit",
    "naive8": "naive 8-bit (quantised forward)",
    "naive4": "naive 4-bit (quantised forward)",
}

# mode -> (bits, quantization) for the modes built by the keras_blpa factory.
_FACTORY_ARGS = {
    "exact": (None, "blpa"),
    "remat": (None, "blpa"),
    "blpa8": (8, "blpa"),
    "blpa4": (4, "blpa"),
    "naive8": (8, "naive"),
    "naive4": (4, "naive"),
}


def check_modes(modes):
    """Returns the list of modes, raising ValueError naming an unknown one."""
    return [validation.check_choice(mode, "mode", MODES) for mode in modes]


def code_args(mode):
    """``(bits, quantization)`` of a mode built by the keras_blpa factory or by
    `keras_blpa.convert`: ``(None, "blpa")`` for exact, e.g. ``(4, "naive")`` for
    naive4. Raises ValueError for recompute, which is no code setting."""
    check_modes([mode])
    if mode not in _FACTORY_ARGS:
        raise ValueError(
            f"Expected a mode in {tuple(_FACTORY_ARGS)}. Received: mode={mode!r}"
        )
    return _FACTORY_ARGS[mode]


def build_model(mode, depth, num_classes=10, input_shape=(32, 32, 3), width=1, seed=None):
    """Builds the (uncompiled) model of one mode."""
    check_modes([mode])
    if seed is not None:
        keras.utils.set_random_seed(seed)
    from keras_blpa import models

    kwargs = dict(width=width, classifier_activation=None)
    if mode == "recompute":
        return models.resnet(
            depth, num_classes, input_shape, bits=None,
            unit_wrapper=models.RecomputeGrad, **kwargs
        )
    bits, quantization = code_args(mode)
    kwargs.update(bits=bits, quantization=quantization)
    if mode == "remat":
        with keras.RematScope(mode="activations"):
            return models.resnet(depth, num_classes, input_shape, **kwargs)
    return models.resnet(depth, num_classes, input_shape, **kwargs)


def compile_model(model, learning_rate=0.05):
    """SGD with momentum 0.9 and sparse cross-entropy (the paper's optimiser)."""
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def random_batch(batch, input_shape, num_classes, seed=0):
    """A fixed random batch (float32 images, int32 labels) as backend tensors."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch,) + tuple(input_shape), dtype=np.float32)
    y = rng.integers(0, num_classes, size=(batch,), dtype=np.int32)
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def train_step(model, x, y):
    """One compiled training step (model.fit's train function), waited for."""
    return model.train_on_batch(x, y)


def build_state(model, input_shape, num_classes):
    """One training step on 2 samples: builds the optimizer and metric state that
    `keras_blpa.memory.compiled_step_memory` needs, at negligible cost."""
    return train_step(model, *random_batch(2, input_shape, num_classes))


def release():
    """Frees what the last model left behind before the next one is built."""
    keras.backend.clear_session()
    gc.collect()
