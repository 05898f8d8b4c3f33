"""Where a training step's peak memory goes: resident state, codes, floats, fragmentation.

``python -m keras_blpa.benchmark.breakdown --depth 164 --batches 256 --modes exact,blpa4``
builds each mode's CIFAR ResNet in its own process (what an earlier model
left in the allocator would change the next one's fragmentation), runs a
first step, then reads what is alive at the second step's peak (`keras_blpa.memory.step_breakdown`: on TensorFlow
the allocator's events of one step under the profiler, on JAX XLA's buffer
assignment of the compiled step). Beside it, the bytes kept for backprop by
count, what `keras_blpa.memory_report` says this model keeps (its
``before_bytes``: codes and the activations still kept in float). Writes
``breakdown.json``, ``breakdown.md`` and ``breakdown.png`` to ``--out``.
"""

import argparse
import json
import os
import subprocess
import sys

from keras_blpa import backends
from keras_blpa import memory
from keras_blpa.benchmark import modes as modes_lib

__all__ = ["main", "measure"]

_PARTS = ("resident", "codes", "float", "fragmentation")
_MARKER = "BLPA_BREAKDOWN "


def measure(mode, depth, batch, width=1, input_shape=(32, 32, 3), num_classes=10):
    """The breakdown of one mode's step at one batch, as a dict of MiB (see `StepBreakdown.as_dict`)."""
    import keras_blpa

    model = modes_lib.compile_model(
        modes_lib.build_model(mode, depth, num_classes, input_shape, width)
    )
    x, y = modes_lib.random_batch(batch, input_shape, num_classes)
    if backends.get().COMPILED_STEP_MEMORY:
        modes_lib.build_state(model, input_shape, num_classes)  # the step is compiled, not run
    else:
        modes_lib.train_step(model, x, y)  # tracing and optimizer state, before the measured step
    result = memory.step_breakdown(model, x, y).as_dict()
    report = keras_blpa.memory_report(model, batch_size=batch)
    result.update(
        mode=mode, depth=depth, width=width, batch=batch, backend=backends.get().NAME,
        kept_by_count_mib=round(report.before_bytes / memory.MIB, 2),
    )
    del model
    modes_lib.release()
    return result


def _table(rows):
    lines = [
        "| mode | batch | peak | resident | codes | floats | fragmentation | kept by count | op at the peak |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['peak']} | {r['resident']} | {r['codes']} | "
            f"{r['float']} | {r['fragmentation']} | {r['kept_by_count_mib']} | `{r['peak_op']}` |"
        )
    return "\n".join(lines)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['mode']} @ {r['batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(rows) + 1.5))
    left = [0.0] * len(rows)
    for part in _PARTS:
        widths = [r[part] for r in rows]
        ax.barh(labels, widths, left=left, label=part)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel("MiB alive at the step's peak")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _measure_in_process(mode, depth, batch, width):
    """`measure` in a new Python process (the allocator starts empty)."""
    code = (
        "import json, sys; from keras_blpa import memory; memory.enable_cpu_statistics(); "
        "from keras_blpa.benchmark import breakdown; "
        f"print({_MARKER!r} + json.dumps(breakdown.measure({mode!r}, {depth}, {batch}, {width})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARKER):
            return json.loads(line[len(_MARKER):])
    raise RuntimeError(
        f"breakdown of mode={mode!r} depth={depth} batch={batch} failed "
        f"(exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=164)
    parser.add_argument("--width", type=int, default=1)
    parser.add_argument("--batches", default="256", help="comma-separated batch sizes")
    parser.add_argument("--modes", default="exact,blpa4")
    parser.add_argument("--out", default="benchmark_results/breakdown")
    args = parser.parse_args(argv)
    modes = modes_lib.check_modes(args.modes.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    memory.enable_cpu_statistics()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for batch in batches:
        for mode in modes:
            rows.append(_measure_in_process(mode, args.depth, batch, args.width))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "largest"}), flush=True)
    with open(os.path.join(args.out, "breakdown.json"), "w") as f:
        json.dump({"argv": argv, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "breakdown.md"), "w") as f:
        f.write(f"ResNet-{args.depth}, MiB alive at the training step's peak\n\n")
        f.write(_table(rows) + "\n")
    _plot(rows, os.path.join(args.out, "breakdown.png"))
    return rows


if __name__ == "__main__":
    main()
