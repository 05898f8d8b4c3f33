"""Part of tests/fresh_install.sh: a few fit steps, exact and 4-bit, on the installed package.

Run in a fresh venv by that script (not collected by pytest). Asserts that the
native ops are in use and that the allocator's peak over a training step is lower
for 4-bit than for exact, and prints both.
"""

import keras_blpa
import numpy as np
from keras_blpa import memory

memory.enable_cpu_statistics()  # before TensorFlow runs: allocator statistics on every CPU


def step_peak_mib(bits):
    model = keras_blpa.resnet(20, 10, (32, 32, 3), bits=bits)
    model.compile("sgd", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(64,))
    history = model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"])), history.history
    with memory.PeakMemory() as peak:
        model.train_on_batch(x, y)
    return peak.peak_mib - peak.resident_mib


def main():
    assert keras_blpa.native_ops_available(), "native ops not in use"
    exact, approx = step_peak_mib(None), step_peak_mib(4)
    print(f"training-step peak above resident: exact {exact:.1f} MiB, 4-bit {approx:.1f} MiB "
          f"({exact / approx:.2f}x lower)")
    assert approx < exact, (exact, approx)


if __name__ == "__main__":
    main()
