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
at import: a process that measures CPU memory calls `enable_cpu_statistics()`
before running TensorFlow (``import keras_blpa`` changes no setting).

Each backend reads its own allocator (`keras_blpa.backends`); this module is the
one interface the examples, the benchmark and the tests use.

Example:
>>> keras_blpa.memory.enable_cpu_statistics()  # before TensorFlow's first op
>>> with keras_blpa.memory.PeakMemory() as peak:
...     model.train_on_batch(x, y)
>>> peak.peak_mib, peak.resident_mib
>>> keras_blpa.memory.compiled_step_memory(model, x, y).peak_mib  # JAX
>>> keras_blpa.memory.step_breakdown(model, x, y).as_dict()  # what is alive at the peak
"""

import dataclasses
import os
import sys

from keras_blpa import backends

__all__ = [
    "BFC_ENV",
    "CompiledMemory",
    "MemoryStatsUnavailable",
    "PeakMemory",
    "StepBreakdown",
    "compiled_step_memory",
    "device",
    "enable_cpu_statistics",
    "step_breakdown",
]

BFC_ENV = "TF_CPU_ALLOCATOR_USE_BFC"
MIB = float(2**20)


class MemoryStatsUnavailable(RuntimeError):
    """The allocator keeps no statistics in this process; the message says why and what to do."""


def enable_cpu_statistics():
    """Sets TF_CPU_ALLOCATOR_USE_BFC=true unless set already; True if it can still take effect.

    Call it before TensorFlow runs its first op in a process that measures CPU
    memory (the examples, the benchmark and the tests do). It takes effect only
    then, so the answer is False once TensorFlow has run (checked through its
    eager context). Nothing else in keras_blpa sets the variable.
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


def device():
    """The device measured: TensorFlow's "GPU:0" if there is one, else "CPU:0"; on JAX the first local device."""
    return backends.get().memory_device()


class _Mib:
    """``peak_mib`` and ``resident_mib`` from the byte counts."""

    def _mib(self, name):
        value = getattr(self, name)
        if value is None:
            raise ValueError(
                f"{type(self).__name__} has no {name} yet: read it after the `with` "
                f"block that measures it. Received: {name}=None"
            )
        return value / MIB

    @property
    def peak_mib(self):
        return self._mib("peak_bytes")

    @property
    def resident_mib(self):
        return self._mib("resident_bytes")


class PeakMemory(_Mib):
    """Context manager: the allocator's peak and resident bytes over its body.

    Attributes (after the block): ``resident_bytes`` (allocated when the block
    started: weights, optimizer state, inputs), ``peak_bytes`` (highest
    allocation in the block, resident included), and the same in MiB.

    Blocks nest: entering one resets the allocator's peak, so it first hands
    the peak so far to the blocks around it, and each block's peak is the
    highest of those and its own final reading.

    On JAX the device's peak cannot be reset: ``peak_bytes`` is the highest
    allocation since the process started, the block's own peak when the block
    allocates the most (as a training step after model building does). JAX's
    CPU client keeps no statistics: use `compiled_step_memory` there.

    Raises:
        MemoryStatsUnavailable: on entering, if the allocator keeps no statistics.
        ValueError: reading ``peak_mib`` or ``resident_mib`` before the block
            has measured them.
    """

    _open = []  # the blocks entered and not yet left, outermost first

    def __init__(self, device_name=None):
        self.device = device_name
        self.resident_bytes = None
        self.peak_bytes = None

    def __enter__(self):
        self._backend = backends.get()
        self.device = self.device or self._backend.memory_device()
        outer = [block for block in PeakMemory._open if block.device == self.device]
        if outer:
            peak = self._backend.memory_stats(self.device)["peak"]
            for block in outer:
                block._inner_peak = max(block._inner_peak, peak)
        self._backend.reset_peak_memory(self.device)
        self.resident_bytes = self._backend.memory_stats(self.device)["current"]
        self._inner_peak = 0  # the highest peak that inner blocks' resets cleared
        PeakMemory._open.append(self)
        return self

    def __exit__(self, *exc):
        PeakMemory._open.remove(self)
        peak = self._backend.memory_stats(self.device)["peak"]
        self.peak_bytes = max(self._inner_peak, peak)
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
    Returns a `CompiledMemory`.

    Raises:
        ValueError: on TensorFlow, or if the model has not been compiled and
            run one training step (which builds optimizer and metric state).
    """
    return backends.get().compiled_step_memory(model, x, y)


@dataclasses.dataclass(frozen=True)
class StepBreakdown(_Mib):
    """What is alive at a training step's peak, in bytes (`step_breakdown`).

    ``peak_bytes`` = ``resident_bytes`` (held before the step: weights,
    optimizer state, the batch, constants) + ``codes_bytes`` (uint8 tensors
    the step made: packed codes, pooling indices) + ``float_bytes`` (every
    other tensor it made: activations, gradients, temporaries) +
    ``fragmentation_bytes`` (what the allocator holds beyond the requests of
    those tensors; 0 where buffers are exact, as in XLA's assignment).
    ``peak_op`` names the op at the peak; ``largest`` lists the largest live
    tensors (grouped by op, layer, shape and kind), largest first.
    """

    peak_bytes: int
    resident_bytes: int
    codes_bytes: int
    float_bytes: int
    fragmentation_bytes: int
    peak_op: str = ""
    largest: tuple = ()

    def as_dict(self):
        """The figures in MiB and the largest tensors, for JSON."""
        out = {
            name: round(getattr(self, f"{name}_bytes") / MIB, 2)
            for name in ("peak", "resident", "codes", "float", "fragmentation")
        }
        out["peak_op"] = self.peak_op
        out["largest"] = [dict(t, mib=round(t["bytes"] / MIB, 2)) for t in self.largest]
        return out


def step_breakdown(model, x, y=None):
    """What is alive at the peak of ``model``'s training step on batch (x, y): a `StepBreakdown`.

    On TensorFlow one step is run (``train_on_batch``) under the profiler and
    its allocator events are replayed (run it after a first step; the
    allocator must keep statistics, `enable_cpu_statistics`). On JAX, XLA's
    buffer assignment of the compiled step is read, not run.
    """
    return backends.get().step_breakdown(model, x, y)
