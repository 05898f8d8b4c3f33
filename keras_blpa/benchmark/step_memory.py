"""Peak training-step memory of each mode at fixed batch sizes, in one process.

On TensorFlow the peak is the allocator's (`keras_blpa.memory.PeakMemory`, on
every CPU and on a GPU) over one compiled training step, measured after a
warm-up step (tracing, optimizer slots). ``resident_mib`` is what this model had
allocated before the step (weights, optimizer state, the batch); ``peak_mib``
includes it. Both leave out what was still allocated before the model was
built: TensorFlow keeps a few MiB per model that was built and released earlier
in the same process (about the size of its variables), which would otherwise
count against later modes.

On JAX the figures are XLA's buffer assignment of the same compiled step
(`keras_blpa.memory.compiled_step_memory`: resident = its arguments, peak =
arguments + new outputs + temporaries), after a warm-up step on 2 samples; the
step at the measured batch is compiled, not run.
"""

import time

from keras_blpa import backends
from keras_blpa import memory
from keras_blpa.benchmark import modes as modes_lib

__all__ = [
    "MIB",
    "measure",
    "step_peak",
]

MIB = memory.MIB


def step_peak(model, x, y, baseline=0):
    """Peak bytes of one training step, and the bytes resident before it, above `baseline`."""
    with memory.PeakMemory() as peak:
        modes_lib.train_step(model, x, y)
    return peak.resident_bytes - baseline, peak.peak_bytes - baseline


def _step_memory(model, x, y, baseline, compiled):
    """(resident, peak) bytes of a training step at this batch (see the module docstring)."""
    if compiled:
        step = memory.compiled_step_memory(model, x, y)
        return step.resident_bytes, step.peak_bytes
    modes_lib.train_step(model, x, y)  # warm-up (and retrace for a new batch)
    return step_peak(model, x, y, baseline)


def _allocated():
    with memory.PeakMemory() as now:
        pass
    return now.resident_bytes


def measure(mode, depth, batches, width=1, input_shape=(32, 32, 3), num_classes=10):
    """Peak step memory of one mode at each batch size (one model, one process).

    Returns a list of dicts with mode, depth, width, batch, peak_mib,
    resident_mib, step_mib (= peak - resident), build and trace/compile
    seconds, and the source of the figures ("allocator" or "xla-compiled").
    """
    compiled = backends.get().COMPILED_STEP_MEMORY
    modes_lib.release()
    baseline = 0 if compiled else _allocated()
    start = time.perf_counter()
    model = modes_lib.compile_model(
        modes_lib.build_model(mode, depth, num_classes, input_shape, width)
    )
    params = int(model.count_params())
    built = time.perf_counter()
    rows = []
    if compiled:
        modes_lib.build_state(model, input_shape, num_classes)
    for batch in batches:
        x, y = modes_lib.random_batch(batch, input_shape, num_classes)
        t0 = time.perf_counter()
        resident, peak = _step_memory(model, x, y, baseline, compiled)
        warm = time.perf_counter() - t0
        rows.append(
            {
                "mode": mode,
                "depth": depth,
                "width": width,
                "batch": batch,
                "params": params,
                "peak_mib": round(peak / MIB, 2),
                "resident_mib": round(resident / MIB, 2),
                "step_mib": round((peak - resident) / MIB, 2),
                "build_s": round(built - start, 2),
                "warmup_s": round(warm, 2),
                "source": "xla-compiled" if compiled else "allocator",
            }
        )
        del x, y
    del model
    modes_lib.release()
    return rows
