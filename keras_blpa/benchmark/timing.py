"""Time per training sample of each mode at one batch size.

All modes are built in one process and their steps are interleaved round-robin
(mode A step, mode B step, ...), so that a change in the machine's load during
the run affects every mode alike; the figure is the median over the timed steps
after ``warmup`` steps per mode.
"""

import statistics
import time

from keras_blpa.benchmark import modes as modes_lib

__all__ = ["measure"]


def measure(modes, depth, batch, steps=5, warmup=2, width=1, input_shape=(32, 32, 3),
            num_classes=10, log=print):
    """Median ms per sample of each mode; returns a list of dicts."""
    modes_lib.release()
    x, y = modes_lib.random_batch(batch, input_shape, num_classes)
    models = {}
    for mode in modes:
        models[mode] = modes_lib.compile_model(
            modes_lib.build_model(mode, depth, num_classes, input_shape, width)
        )
        for _ in range(warmup):
            modes_lib.train_step(models[mode], x, y)
    times = {mode: [] for mode in modes}
    for step in range(steps):
        for mode in modes:
            t0 = time.perf_counter()
            modes_lib.train_step(models[mode], x, y)
            times[mode].append(time.perf_counter() - t0)
        log(f"  timing depth={depth} batch={batch} round {step + 1}/{steps}: "
            + ", ".join(f"{m}={1000 * times[m][-1] / batch:.2f}" for m in modes)
            + " ms/sample")
    rows = []
    for mode in modes:
        rows.append(
            {
                "mode": mode,
                "depth": depth,
                "width": width,
                "batch": batch,
                "steps": steps,
                "ms_per_sample": round(1000 * statistics.median(times[mode]) / batch, 3),
                "ms_per_sample_all": [round(1000 * t / batch, 3) for t in times[mode]],
            }
        )
    del models
    modes_lib.release()
    return rows
