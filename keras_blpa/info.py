"""``python -m keras_blpa.info``: which kernels are in use, from which library, and why.

Prints one ``name: value`` line each: versions, the kernel path (native or
pure-TF) with the library, where it came from, the CPU instruction set the
kernels run with, the CUDA kernels' status, and whether peak memory can be
measured. On JAX: the jax version, the device, and how memory is measured.
Exit status 0; ``--require-native`` exits 1 unless the native TensorFlow ops run.
"""

import sys

__all__ = ["collect", "main"]


def _jax_facts():
    import jax

    from keras_blpa import memory

    try:
        with memory.PeakMemory() as peak:
            pass
        stats = f"available on {peak.device} (peak since the process started)"
    except memory.MemoryStatsUnavailable:
        stats = "compiled step only (keras_blpa.memory.compiled_step_memory)"
    return {
        "jax": jax.__version__,
        "kernels": "jnp (keras_blpa.jax_ops, compiled by XLA)",
        "device": f"{jax.devices()[0]} ({jax.devices()[0].device_kind})",
        "memory_stats": stats,
    }


def collect():
    """The facts printed by `main`, as an ordered dict."""
    import keras

    import keras_blpa

    facts = {
        "keras_blpa": keras_blpa.__version__,
        "keras": f"{keras.__version__} (backend {keras.backend.backend()})",
    }
    if keras.backend.backend() == "jax":
        facts.update(_jax_facts())
        return facts
    import tensorflow as tf

    from keras_blpa import memory
    from keras_blpa import native

    facts["tensorflow"] = tf.__version__
    facts.update(native.status())
    try:
        with memory.PeakMemory() as peak:
            tf.zeros([256, 256]) + 1.0
        facts["memory_stats"] = f"available on {peak.device}"
    except memory.MemoryStatsUnavailable as e:
        facts["memory_stats"] = f"unavailable: {e}"
    return facts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    facts = collect()
    for name, value in facts.items():
        print(f"{name}: {value}")
    if "--require-native" in argv and facts["kernels"] != "native":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
