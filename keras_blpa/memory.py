"""The allocator's peak memory, on any CPU and on a GPU: one helper for examples, benchmark and tests.

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
"""

import os
import sys

__all__ = [
    "BFC_ENV",
    "MemoryStatsUnavailable",
    "PeakMemory",
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


def device():
    """The device whose allocator is measured: the first GPU if there is one, else the CPU."""
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


class PeakMemory:
    """Context manager: the allocator's peak and resident bytes over its body.

    Attributes (after the block): ``resident_bytes`` (allocated when the block
    started: weights, optimizer state, inputs), ``peak_bytes`` (highest
    allocation in the block, resident included), and the same in MiB.

    Raises:
        MemoryStatsUnavailable: on entering, if the allocator keeps no statistics.
    """

    def __init__(self, device_name=None):
        self.device = device_name
        self.resident_bytes = None
        self.peak_bytes = None

    def _info(self):
        import tensorflow as tf

        return tf.config.experimental.get_memory_info(self.device)

    def __enter__(self):
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

    @property
    def peak_mib(self):
        return self.peak_bytes / MIB

    @property
    def resident_mib(self):
        return self.resident_bytes / MIB
