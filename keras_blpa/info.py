"""``python -m keras_blpa.info``: which kernels are in use, from which library, and why.

Prints one ``name: value`` line each: versions, the kernel path (native or
pure-TF) with the library, where it came from, the CPU instruction set the
kernels run with, the CUDA kernels' status, and whether peak memory can be
measured. On JAX: the jax version, the device, and how memory is measured.
Exit status 0; ``--require-native`` exits 1 unless the native TensorFlow ops run.
"""

import sys

__all__ = ["collect", "main"]


def collect():
    """The facts printed by `main`, as an ordered dict."""
    import keras

    import keras_blpa
    from keras_blpa import backends

    facts = {
        "keras_blpa": keras_blpa.__version__,
        "keras": f"{keras.__version__} (backend {backends.get().NAME})",
    }
    facts.update(backends.get().facts())
    return facts


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from keras_blpa import memory

    memory.enable_cpu_statistics()
    facts = collect()
    for name, value in facts.items():
        print(f"{name}: {value}")
    if "--require-native" in argv and facts["kernels"] != "native":
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
