"""One largest-batch trial, run in its own process under a memory budget.

``python -m keras_blpa.benchmark.trial --mode blpa4 --depth 164 --batch 300``
builds the model, runs ``--steps`` training steps and prints one line
``BLPA_TRIAL {json}`` with the allocator peak and the time per sample of the
steps after the first. Started by max_batch.py with
``TF_CPU_ALLOCATOR_USE_BFC=true TF_CPU_BFC_MEM_LIMIT_IN_MB=<budget>`` so that a
batch that does not fit raises a real RESOURCE_EXHAUSTED error.

On JAX the batch fits when XLA's compiled step needs at most ``--budget-mib``
(`keras_blpa.memory.compiled_step_memory`; one that does not is not run); it is
then run and timed, and where the device keeps statistics (a GPU) its measured
peak is recorded too (``device_peak_mib``), and running out of device memory
also counts as not fitting.
"""

import argparse
import contextlib
import json
import statistics
import time
import types

__all__ = ["MARKER", "main"]

MARKER = "BLPA_TRIAL "


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True)
    parser.add_argument("--depth", type=int, required=True)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--budget-mib", type=float,
                        help="JAX: the compiled step's budget (TensorFlow: the env limit)")
    args = parser.parse_args(argv)

    from keras_blpa import backends
    from keras_blpa import memory
    from keras_blpa.benchmark import modes as modes_lib

    memory.enable_cpu_statistics()

    shape = (args.image_size, args.image_size, 3)
    model = modes_lib.compile_model(
        modes_lib.build_model(args.mode, args.depth, args.num_classes, shape, args.width)
    )
    x, y = modes_lib.random_batch(args.batch, shape, args.num_classes)
    result = {"ok": True, "batch": args.batch}
    if backends.get().COMPILED_STEP_MEMORY:
        modes_lib.build_state(model, shape, args.num_classes)
        compiled = memory.compiled_step_memory(model, x, y)
        result["peak_mib"] = round(compiled.peak_mib, 2)
        if args.budget_mib and compiled.peak_mib > args.budget_mib:
            _report(dict(result, ok=False, oom=True))
            return
    meter = _peak_meter()
    times = []
    peak = 0
    for _ in range(max(1, args.steps)):
        t0 = time.perf_counter()
        try:
            with meter() as step:
                modes_lib.train_step(model, x, y)
        except Exception as e:  # noqa: BLE001 - only running out of memory is an answer
            if "RESOURCE_EXHAUSTED" not in str(e) and "ResourceExhausted" not in type(e).__name__:
                raise
            _report(dict(result, ok=False, oom=True))
            return
        times.append(time.perf_counter() - t0)
        if step.peak_bytes is not None:
            peak = max(peak, step.peak_bytes)
    timed = times[1:] or times
    if peak:
        key = "device_peak_mib" if "peak_mib" in result else "peak_mib"
        result[key] = round(peak / memory.MIB, 2)
    result["ms_per_sample"] = round(1000 * statistics.median(timed) / args.batch, 3)
    result["step_times_s"] = [round(t, 3) for t in times]
    _report(result)


def _report(result):
    print(MARKER + json.dumps(result), flush=True)


def _peak_meter():
    """PeakMemory where the device keeps statistics, else a block whose peak_bytes is None."""
    from keras_blpa import memory

    try:
        with memory.PeakMemory():
            pass
    except memory.MemoryStatsUnavailable:  # JAX's CPU client
        return lambda: contextlib.nullcontext(types.SimpleNamespace(peak_bytes=None))
    return memory.PeakMemory


if __name__ == "__main__":
    main()
