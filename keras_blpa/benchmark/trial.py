"""One largest-batch trial, run in its own process under a memory budget.

``python -m keras_blpa.benchmark.trial --mode blpa4 --depth 164 --batch 300``
builds the model, runs ``--steps`` training steps and prints one line
``BLPA_TRIAL {json}`` with the allocator peak and the time per sample of the
steps after the first. Started by max_batch.py with
``TF_CPU_ALLOCATOR_USE_BFC=true TF_CPU_BFC_MEM_LIMIT_IN_MB=<budget>`` so that a
batch that does not fit raises a real RESOURCE_EXHAUSTED error.
"""

import argparse
import json
import statistics
import time

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
    args = parser.parse_args(argv)

    import tensorflow as tf

    from keras_blpa import memory
    from keras_blpa.benchmark import modes as modes_lib

    shape = (args.image_size, args.image_size, 3)
    model = modes_lib.compile_model(
        modes_lib.build_model(args.mode, args.depth, args.num_classes, shape, args.width)
    )
    x, y = modes_lib.random_batch(args.batch, shape, args.num_classes)
    times = []
    peak = 0
    for _ in range(max(1, args.steps)):
        t0 = time.perf_counter()
        try:
            with memory.PeakMemory() as step:
                modes_lib.train_step(model, x, y)
        except tf.errors.ResourceExhaustedError:
            print(MARKER + json.dumps({"ok": False, "oom": True, "batch": args.batch}),
                  flush=True)
            return
        times.append(time.perf_counter() - t0)
        peak = max(peak, step.peak_bytes)
    timed = times[1:] or times
    result = {
        "ok": True,
        "batch": args.batch,
        "peak_mib": round(peak / memory.MIB, 2),
        "ms_per_sample": round(1000 * statistics.median(timed) / args.batch, 3),
        "step_times_s": [round(t, 3) for t in times],
    }
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
