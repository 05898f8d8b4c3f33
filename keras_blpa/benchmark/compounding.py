"""Whether the K-bit gradient error compounds with depth, per activation.

The paper's argument: the ReLU mask read back from the code is exact, so a
block's backward passes the incoming gradient on without the code's error,
and errors do not compound. A smooth activation (silu, gelu, hard_silu) has
no exact mask: its derivative is read from the code's bin (the secant slope
across it, the mean of f' over the bin), so every block multiplies the
incoming gradient by a slightly wrong, slightly smoothed derivative, and the
error grows with the number of blocks between a layer and the loss.

``python -m keras_blpa.benchmark.compounding --out OUT`` measures it on a
plain chain, Input -> [BatchNormalization -> activation -> Conv2D 3x3] x depth
-> GlobalAveragePooling2D -> Dense, in stock Keras layers with random weights
(and random BN values, `applications.randomize`), converted by
``keras_blpa.convert(model, bits)``. On one batch of N(0, 1) inputs, per conv,
the kernel gradient's cosine and norm ratio against the stock model's, by the
conv's distance from the loss (1: the last conv). Writes
``compounding.json``, ``compounding.md`` and ``compounding.png``.
"""

import argparse
import json
import os
import sys

import keras
import numpy as np

from keras_blpa.benchmark import applications
from keras_blpa.benchmark.cli import comma_list
from keras_blpa.benchmark import stacks

__all__ = ["chain", "main", "measure", "summarize"]

ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu", "gelu", "hard_silu")
NUM_CLASSES = 10


def chain(activation, depth, channels=32, size=8, seed=0):
    """The stock chain of `depth` BN -> `activation` -> 3x3 conv units (seed `seed`)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((size, size, channels))
    x = inp
    for i in range(depth):
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = stacks.stock_activation(activation)(x)
        x = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(NUM_CLASSES, name="logits")(x))


def measure(activation, bits, depth, batch=32, channels=32, size=8, seed=0):
    """Per conv, nearest the loss first: {"from_loss", "cosine", "norm_ratio"} of the
    converted model's kernel gradient against the stock one's."""
    from keras_blpa import convert

    stock = chain(activation, depth, channels, size, seed)
    applications.randomize(stock, seed)
    converted = convert(stock, bits=bits)
    kernels = [stock.get_layer(f"conv{i}").kernel for i in range(depth)]
    matched = applications.match_variables(stock, converted)
    by_path = {v.path: m for v, m in zip(stock.trainable_variables, matched)}
    got_vars = [by_path[k.path] for k in kernels]
    if any(v is None for v in got_vars):
        raise RuntimeError(f"convert changed a kernel of the {activation} chain")
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((batch, size, size, channels), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)
    want = applications.gradients(stock, kernels, x, y, logits=True)
    got = applications.gradients(converted, got_vars, x, y, logits=True)
    rows = []
    for i in reversed(range(depth)):
        rows.append({
            "from_loss": depth - i,
            "cosine": round(applications.cosine(want[i], got[i]), 5),
            "norm_ratio": round(float(np.linalg.norm(got[i]) / np.linalg.norm(want[i])), 4),
        })
    return rows


def summarize(runs):
    """Mean over seeds of each (activation, bits, from_loss): a list of dicts."""
    cells = {}
    for run in runs:
        for row in run["rows"]:
            key = (run["activation"], run["bits"], row["from_loss"])
            cells.setdefault(key, []).append(row)
    return [
        {"activation": a, "bits": b, "from_loss": d,
         "cosine": round(float(np.mean([r["cosine"] for r in rows])), 4),
         "norm_ratio": round(float(np.mean([r["norm_ratio"] for r in rows])), 3),
         "seeds": len(rows)}
        for (a, b, d), rows in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2]))
    ]


def _table(summary, depth, argv):
    shown = [d for d in (1, 2, 4, 8, 16, 32, 64) if d <= depth]
    head = " | ".join(f"{d}" for d in shown)
    lines = [
        f"Kernel-gradient cosine (norm ratio) against stock, by convs from the loss, chain of "
        f"{depth} BN -> activation -> conv units; mean over seeds.",
        "",
        f"Command: `python -m keras_blpa.benchmark.compounding {' '.join(argv)}`",
        "",
        f"| bits | activation | {head} |",
        "|---|---|" + "---:|" * len(shown),
    ]
    cell = {(r["activation"], r["bits"], r["from_loss"]): r for r in summary}
    for bits in sorted({r["bits"] for r in summary}, reverse=True):
        for act in dict.fromkeys(r["activation"] for r in summary):
            values = [cell.get((act, bits, d)) for d in shown]
            text = " | ".join(
                "-" if v is None else f"{v['cosine']:.4f} ({v['norm_ratio']:.2f})" for v in values
            )
            lines.append(f"| {bits} | {act} | {text} |")
    return "\n".join(lines) + "\n"


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_list = sorted({r["bits"] for r in summary}, reverse=True)
    fig, axes = plt.subplots(1, len(bits_list), figsize=(5 * len(bits_list), 4), squeeze=False)
    for ax, bits in zip(axes[0], bits_list):
        for act in dict.fromkeys(r["activation"] for r in summary):
            rows = [r for r in summary if r["activation"] == act and r["bits"] == bits]
            ax.plot([r["from_loss"] for r in rows], [r["cosine"] for r in rows], marker=".",
                    label=act)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("convs from the loss")
        ax.set_ylabel("kernel-gradient cosine vs stock")
        ax.set_title(f"{bits}-bit codes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", type=comma_list(), default=list(ACTIVATIONS))
    parser.add_argument("--bits", type=comma_list(int), default=[8, 4])
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--size", type=int, default=8)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for act in args.activations:
        if act not in ACTIVATIONS:
            parser.error(f"unknown activation {act!r}: one of {', '.join(ACTIVATIONS)}")
    runs = []
    for bits in args.bits:
        for act in args.activations:
            for seed in args.seeds:
                rows = measure(act, bits, args.depth, args.batch, args.channels, args.size, seed)
                runs.append({"activation": act, "bits": bits, "seed": seed, "rows": rows})
                print(json.dumps({"activation": act, "bits": bits, "seed": seed,
                                  "deepest": rows[-1]}), flush=True)
    summary = summarize(runs)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "compounding.json"), "w") as f:
        json.dump({"argv": argv, "runs": runs, "summary": summary}, f, indent=1)
    with open(os.path.join(args.out, "compounding.md"), "w") as f:
        f.write(_table(summary, args.depth, argv))
    _plot(summary, os.path.join(args.out, "compounding.png"))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
