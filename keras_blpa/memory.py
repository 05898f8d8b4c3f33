"""Peak memory of training, on any CPU and on a GPU, on both backends: one helper for all.

* `PeakMemory`: the allocator's peak over a block of code. On TensorFlow, on
  every CPU and on a GPU (below); on JAX, where the device keeps statistics (a
  GPU), with the peak since the process started (JAX cannot reset it).
* `compiled_step_memory` (JAX): what XLA's buffer assignment of ``model.fit``'s
  compiled training step needs, for any batch, without running it; the same
  figure on CPU and GPU, deterministic.

TensorFlow keeps memory statistics only in its BFC allocator. On a GPU that is
always the allocator. On the CPU, TensorFlow uses it only with oneDNN, which is on by
default only on AVX-512-class CPUs, or with ``TF_CPU_ALLOCATOR_USE_BFC=true``;
elsewhere ``reset_memory_stats('CPU:0')`` raises "Cannot reset memory stats". The
variable is read when TensorFlow creates its CPU allocator, at the first op, not
at import. So ``import keras_blpa`` calls `enable_cpu_statistics()`, which sets the
variable unless the user set it or TensorFlow already ran an op; a process that
measures must import keras_blpa (or set the variable) before running TensorFlow.

Example:
>>> with keras_blpa.memory.PeakMemory() as peak:
...     model.train_on_batch(x, y)
>>> peak.peak_mib, peak.resident_mib
>>> keras_blpa.memory.compiled_step_memory(model, x, y).peak_mib  # JAX
"""

import dataclasses
import os
import sys

__all__ = [
    "BFC_ENV",
    "CompiledMemory",
    "MemoryStatsUnavailable",
    "PeakMemory",
    "compiled_step_memory",
    "device",
    "enable_cpu_statistics",
]

BFC_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
MIB = float(2**20)


class MemoryStatsUnavailable(RuntimeError):
    """The allocator keeps no statistics in this process; the message says why and what to do."""


def enable_cpu_statistics():
    """Sets TF_CPU_ALLOCATOR_USE_BFC=true unless set already; True if it can still take effect.

    It takes effect only before TensorFlow's first op, so the answer is False
    once TensorFlow has run (checked through its eager context).
    """
    os.environ.setdefault(BFC_ENV, "true")
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return True
    try:
        from tensorflow.python.eager import context
    except ImportError:
        return True
    return context.context()._context_handle is None  # no op has run yet


def _on_jax():
    import keras

    return keras.backend.backend() == "jax"


def device():
    """The device measured: TensorFlow's "GPU:0" if there is one, else "CPU:0"; on JAX the first local device."""
    if _on_jax():
        import jax

        return str(jax.local_devices()[0])
    import tensorflow as tf

    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _reason(device_name):
    if device_name.startswith("CPU") and os.environ.get(BFC_ENV, "").lower() not in ("1", "true"):
        return (
            f"TensorFlow's CPU allocator keeps no statistics: set {BFC_ENV}=true (or "
            "import keras_blpa) before TensorFlow runs its first op"
        )
    if device_name.startswith("CPU"):
        return (
            "TensorFlow's CPU allocator keeps no statistics: it was created before "
            f"{BFC_ENV}=true was set; import keras_blpa (or set the variable) before "
            "TensorFlow runs its first op"
        )
    return f"TensorFlow keeps no memory statistics for {device_name}"


class _Mib:
    """``peak_mib`` and ``resident_mib`` from the byte counts."""

    @property
    def peak_mib(self):
        return self.peak_bytes / MIB

    @property
    def resident_mib(self):
        return self.resident_bytes / MIB


class PeakMemory(_Mib):
    """Context manager: the allocator's peak and resident bytes over its body.

    Attributes (after the block): ``resident_bytes`` (allocated when the block
    started: weights, optimizer state, inputs), ``peak_bytes`` (highest
    allocation in the block, resident included), and the same in MiB.

    On JAX the device's peak cannot be reset: ``peak_bytes`` is the highest
    allocation since the process started, the block's own peak when the block
    allocates the most (as a training step after model building does). JAX's
    CPU client keeps no statistics: use `compiled_step_memory` there.

    Raises:
        MemoryStatsUnavailable: on entering, if the allocator keeps no statistics.
    """

    def __init__(self, device_name=None):
        self.device = device_name
        self.resident_bytes = None
        self.peak_bytes = None

    def _info(self):
        if self._jax_device is not None:
            stats = self._jax_device.memory_stats()
            return {"current": stats["bytes_in_use"], "peak": stats["peak_bytes_in_use"]}
        import tensorflow as tf

        return tf.config.experimental.get_memory_info(self.device)

    def __enter__(self):
        self._jax_device = None
        if _on_jax():
            import jax

            self._jax_device = jax.local_devices()[0]
            self.device = str(self._jax_device)
            stats = self._jax_device.memory_stats()
            if not stats or "peak_bytes_in_use" not in stats:
                raise MemoryStatsUnavailable(
                    f"JAX keeps no memory statistics on {self.device}; "
                    "use keras_blpa.memory.compiled_step_memory(model, x, y)"
                )
        else:
            import tensorflow as tf

            self.device = self.device or device()
            try:
                tf.config.experimental.reset_memory_stats(self.device)
            except (ValueError, RuntimeError, tf.errors.OpError) as e:
                raise MemoryStatsUnavailable(f"{_reason(self.device)} ({e})") from None
        self.resident_bytes = self._info()["current"]
        return self

    def __exit__(self, *exc):
        self.peak_bytes = self._info()["peak"]
        return False


@dataclasses.dataclass(frozen=True)
class CompiledMemory(_Mib):
    """XLA's buffer assignment of one compiled training step, in bytes.

    ``argument_bytes``: the step's inputs (weights, optimizer and metric state,
    the batch); ``output_bytes``: its results, of which ``alias_bytes`` reuse
    donated input buffers (the new state); ``temp_bytes``: its working memory
    (activations, gradients, temporaries). ``peak_bytes`` = arguments + outputs
    - aliased + temporaries; ``resident_bytes`` = arguments.
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self):
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    @property
    def resident_bytes(self):
        return self.argument_bytes


def compiled_step_memory(model, x, y=None):
    """Memory of ``model.fit``'s training step on batch (x, y), compiled by XLA, not run (JAX).

    The step is the model's own ``train_step``, jitted with the state donated as
    ``fit`` does; x and y may be arrays or anything with ``shape`` and ``dtype``
    (e.g. ``jax.ShapeDtypeStruct``), so a batch too large to run can be sized.

    Raises:
        ValueError: on another backend, or if the model has not been compiled
            and run one training step (which builds optimizer and metric state).
    """
    import keras

    if not _on_jax():
        raise ValueError(
            "compiled_step_memory needs the JAX backend; on TensorFlow use PeakMemory. "
            f"Received: KERAS_BACKEND={keras.backend.backend()!r}"
        )
    import jax

    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        raise ValueError(
            "compiled_step_memory needs a compiled model that ran one training step "
            "(e.g. model.train_on_batch(x[:2], y[:2])), which builds the optimizer "
            f"and metric state. Received: model={model.name!r} with optimizer={optimizer!r}"
        )
    state = tuple(
        [v.value for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables,
                          optimizer.variables, model.metrics_variables)
    )
    data = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype)),
        (x,) if y is None else (x, y),
    )
    step = jax.jit(model.train_step, donate_argnums=0)
    stats = step.lower(state, data).compile().memory_analysis()
    return CompiledMemory(
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
    )
