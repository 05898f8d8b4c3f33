"""Training helpers: the paper's learning-rate schedule, optimizers with weight
decay and gradient accumulation, distribution strategies by name.

Weight decay is an L2 penalty on kernels (``resnet(..., weight_decay=...)``).
Gradient accumulation uses the Keras 3 optimizers' own
``gradient_accumulation_steps``: the optimizer averages the gradients of that
many consecutive batches and applies them once, which equals one step on the
concatenated batch (for losses that are means over the batch; BN batch
statistics are still per micro-batch).

The schedule and optimizers work on every backend; the strategies are
TensorFlow's (tf.distribute), imported when asked for.
"""

import json
import os

import keras

from keras_blpa import validation

__all__ = [
    "STRATEGIES",
    "PaperSchedule",
    "check_batch_size",
    "make_optimizer",
    "make_strategy",
]

STRATEGIES = ("none", "mirrored", "multiworker")


@keras.saving.register_keras_serializable(package="keras_blpa")
class PaperSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The paper's step schedule: warm-up, then /10 at 50% and 75% of training.

    lr(step) = lr / 10 for step < warmup_steps, lr until 50% of `total_steps`,
    lr / 10 until 75%, lr / 100 after (CIFAR: lr 0.1, 400 warm-up steps, 64k steps).

    Args:
        learning_rate: base learning rate (> 0). Defaults to 0.1.
        total_steps: number of optimizer steps of the whole run (> 0).
        warmup_steps: steps at learning_rate / 10 (>= 0). Defaults to 400.
        boundaries: fractions of `total_steps` where the rate drops by 10.

    Example:
    >>> schedule = PaperSchedule(0.1, total_steps=64000)
    >>> optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
    """

    def __init__(
        self,
        learning_rate=0.1,
        total_steps=64000,
        warmup_steps=400,
        boundaries=(0.5, 0.75),
        name="paper_schedule",
    ):
        learning_rate = validation.check_number(
            learning_rate, "learning_rate", low=0, low_open=True
        )
        validation.check_int(total_steps, "total_steps")
        validation.check_int(warmup_steps, "warmup_steps", minimum=0)
        boundaries = tuple(float(b) for b in boundaries)
        if list(boundaries) != sorted(boundaries) or not all(0 < b < 1 for b in boundaries):
            raise ValueError(
                "Expected increasing boundaries in (0, 1). "
                f"Received: boundaries={boundaries!r}"
            )
        self.learning_rate = float(learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = boundaries
        self.name = name

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        lr = keras.ops.convert_to_tensor(self.learning_rate, "float32")
        rate = keras.ops.where(step < self.warmup_steps, lr / 10.0, lr)
        for fraction in self.boundaries:
            rate = keras.ops.where(step >= fraction * self.total_steps, rate / 10.0, rate)
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "boundaries": list(self.boundaries),
            "name": self.name,
        }


def make_optimizer(
    learning_rate=0.1,
    total_steps=64000,
    warmup_steps=400,
    momentum=0.9,
    accumulation_steps=1,
):
    """SGD with momentum on the paper's schedule, with optional gradient accumulation.

    Args:
        learning_rate, total_steps, warmup_steps: for `PaperSchedule`, in
            optimizer updates (one per `accumulation_steps` batches; the
            schedule itself is given micro-batch steps, as Keras calls it).
        momentum: SGD momentum (the paper: 0.9).
        accumulation_steps: batches whose averaged gradients make one update
            (1: none). Effective batch = batch size x accumulation_steps.

    Returns:
        A keras.optimizers.SGD.
    """
    validation.check_int(accumulation_steps, "accumulation_steps")
    # Keras evaluates the schedule at the micro-batch count.
    schedule = PaperSchedule(
        learning_rate,
        total_steps * accumulation_steps,
        warmup_steps * accumulation_steps,
    )
    return keras.optimizers.SGD(
        schedule,
        momentum=momentum,
        gradient_accumulation_steps=accumulation_steps if accumulation_steps > 1 else None,
    )


def make_strategy(name):
    """A tf.distribute strategy from its name.

    Args:
        name: "none" (the default strategy: one device), "mirrored"
            (MirroredStrategy over the local devices) or "multiworker"
            (MultiWorkerMirroredStrategy configured by the TF_CONFIG
            environment variable).

    Raises:
        ValueError: for an unknown name, or "multiworker" without a valid TF_CONFIG.
    """
    validation.check_choice(name, "strategy", STRATEGIES)
    import tensorflow as tf

    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    config = os.environ.get("TF_CONFIG")
    try:
        cluster = json.loads(config)["cluster"] if config else None
    except (ValueError, KeyError, TypeError):
        cluster = None
    if not cluster:
        raise ValueError(
            "strategy='multiworker' needs TF_CONFIG with a cluster and task, e.g. "
            '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
            '"task": {"type": "worker", "index": 0}}. '
            f"Received: TF_CONFIG={config!r}"
        )
    return _multi_worker_strategy(tf)


def check_batch_size(batch_size, strategy):
    """Returns the per-replica batch; raises ValueError unless it divides evenly."""
    replicas = strategy.num_replicas_in_sync
    try:
        validation.check_int(batch_size, "batch_size")
        divisible = batch_size % replicas == 0
    except ValueError:
        divisible = False
    if not divisible:
        raise ValueError(
            f"Expected a global batch size divisible by the {replicas} replicas "
            f"of the strategy. Received: batch_size={batch_size!r}"
        )
    return batch_size // replicas


def _multi_worker_strategy(tf):
    """The strategy for TF_CONFIG's cluster (the class is defined here so that
    TensorFlow is imported only when a strategy is asked for)."""

    class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
        """MultiWorkerMirroredStrategy whose reduce() works the way Keras 3 calls it.

        Keras 3 (3.15) model.fit under MultiWorkerMirroredStrategy fails twice:
        it reduces the first (x, y) batch as a tuple to learn its shapes (this
        strategy's reduce takes single values only: "Attempt to convert a value
        (PerReplica...)"), and it reduces the scalar logs with axis=0 ("Invalid
        reduction dimension 0 for input with 0 dimensions"). Here reduce maps over
        structures and reduces scalars with axis=None (the same mean).
        """

        def reduce(self, reduce_op, value, axis):
            parent = super()

            def one(v):
                local = self.experimental_local_results(v)[0]
                rank = getattr(local, "shape", None)
                if axis is not None and rank is not None and rank.rank == 0:
                    return parent.reduce(reduce_op, v, axis=None)
                return parent.reduce(reduce_op, v, axis)

            return tf.nest.map_structure(one, value)

    return MultiWorkerMirroredStrategy()
