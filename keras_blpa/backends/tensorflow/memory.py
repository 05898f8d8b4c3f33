"""TensorFlow's allocator statistics, and the facts ``python -m keras_blpa.info`` prints.

TensorFlow keeps memory statistics only in its BFC allocator. On a GPU that is
always the allocator. On the CPU, TensorFlow uses it only with oneDNN, which is
on by default only on AVX-512-class CPUs, or with ``TF_CPU_ALLOCATOR_USE_BFC=true``
set before its first op (`keras_blpa.memory.enable_cpu_statistics`).
"""

import os

import tensorflow as tf

from keras_blpa.backends.tensorflow import native

BFC_ENV = "TF_CPU_ALLOCATOR_USE_BFC"

__all__ = [
    "accelerator",
    "compiled_step_memory",
    "facts",
    "memory_device",
    "memory_stats",
    "reset_peak_memory",
    "versions",
]


def memory_device():
    """"GPU:0" if TensorFlow sees a GPU, else "CPU:0"."""
    return "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"


def _reason(device):
    if not device.startswith("CPU"):
        return f"TensorFlow keeps no memory statistics for {device}"
    if os.environ.get(BFC_ENV, "").lower() not in ("1", "true"):
        return (
            f"TensorFlow's CPU allocator keeps no statistics: call "
            f"keras_blpa.memory.enable_cpu_statistics() (or set {BFC_ENV}=true) "
            "before TensorFlow runs its first op"
        )
    return (
        "TensorFlow's CPU allocator keeps no statistics: it was created before "
        f"{BFC_ENV}=true was set; call keras_blpa.memory.enable_cpu_statistics() "
        "before TensorFlow runs its first op"
    )


def _unavailable(device, error):
    from keras_blpa.memory import MemoryStatsUnavailable

    return MemoryStatsUnavailable(f"{_reason(device)} ({error})")


def memory_stats(device):
    """``{"current", "peak"}`` bytes of `device`'s allocator."""
    try:
        return tf.config.experimental.get_memory_info(device)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise _unavailable(device, e) from None


def reset_peak_memory(device):
    """Resets `device`'s peak to its current allocation (True)."""
    try:
        tf.config.experimental.reset_memory_stats(device)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
        raise _unavailable(device, e) from None
    return True


def compiled_step_memory(model, x, y):
    """Not on TensorFlow: its steps are measured by the allocator (`PeakMemory`)."""
    raise ValueError(
        "compiled_step_memory needs the JAX backend; on TensorFlow use PeakMemory. "
        "Received: KERAS_BACKEND='tensorflow'"
    )


def accelerator():
    """The first GPU's name, or "CPU only"."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU only"
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU")


def versions():
    """TensorFlow's version and whether the native ops run (loads them)."""
    from keras_blpa.backends.tensorflow import fused

    return {"tensorflow": tf.__version__, "native_ops": fused.native_ops_available()}


def facts():
    """TensorFlow's version, the fused ops in use (and why), and the memory statistics."""
    from keras_blpa import memory

    out = {"tensorflow": tf.__version__}
    out.update(native.status())
    try:
        with memory.PeakMemory() as peak:
            tf.zeros([256, 256]) + 1.0
        out["memory_stats"] = f"available on {peak.device}"
    except memory.MemoryStatsUnavailable as e:
        out["memory_stats"] = f"unavailable: {e}"
    return out
