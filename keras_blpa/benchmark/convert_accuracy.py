"""Short training runs of converted keras.applications nets vs the stock ones.

MobileNetV2 and EfficientNetB0 (``weights=None``, 32x32x3 input, 10 logits)
train on Fashion-MNIST resized to 32x32 and repeated to 3 channels, through
`accuracy.study` (SGD, momentum 0.9, cosine-decayed learning rate, BN
statistics recalibrated before the test). Mode ``exact`` is the stock model;
``blpa4`` (``blpa8``, ...) is ``keras_blpa.convert`` of the stock model built
right after seeding, so every mode of a seed starts from the same weights and
trains on the same data order. A mode is "within the seed spread" when
|mean - exact mean| <= the larger of the two sample stds over the seeds, for
the test error and for the final train loss alike.

    python -m keras_blpa.benchmark.convert_accuracy --out keras_blpa/benchmark/results/convert_accuracy
"""

import argparse
import json
import os
import statistics
import sys
import time

import keras
import numpy as np

from keras_blpa.benchmark import accuracy
from keras_blpa.benchmark.cli import comma_list
from keras_blpa.benchmark import modes as modes_lib

__all__ = ["MODELS", "build", "count_blocks", "main", "prepare", "study", "verdict"]

MODELS = {"mobilenetv2": "MobileNetV2", "efficientnetb0": "EfficientNetB0"}
COMMAND = "python -m keras_blpa.benchmark.convert_accuracy"


def prepare(data, size=32):
    """`accuracy.load_data` arrays with the images resized to size x size x 3 (float32)."""
    import tensorflow as tf

    def images(x):
        x = x[..., None] if x.ndim == 3 else x
        x = tf.image.resize(x, (size, size)).numpy()
        return np.repeat(x, 3, axis=-1).astype(np.float32)

    (x_train, y_train), (x_test, y_test) = data
    return (images(x_train), y_train), (images(x_test), y_test)


def count_blocks(model):
    """ApproxConvBlock layers of `model`, nested models included."""
    from keras_blpa import ApproxConvBlock

    todo, count = list(model.layers), 0
    while todo:
        layer = todo.pop()
        todo.extend(getattr(layer, "layers", []))
        count += isinstance(layer, ApproxConvBlock)
    return count


def build(name, mode, input_shape, alpha=1.0):
    """The stock keras.applications net `name` (logits) for exact, else
    ``keras_blpa.convert`` of it with the mode's bits and quantization."""
    from keras_blpa import convert

    kwargs = {"weights": None, "input_shape": tuple(input_shape), "classes": 10,
              "classifier_activation": None}
    if name == "mobilenetv2":
        kwargs["alpha"] = alpha
    stock = getattr(keras.applications, MODELS[name])(**kwargs)
    bits, quantization = modes_lib.code_args(mode)
    return stock if bits is None else convert(stock, bits=bits, quantization=quantization)


def verdict(row, exact):
    """Whether `row` is within the seed spread of `exact` (see the module docstring)."""
    out = {}
    for key, values in (("test_error", "test_error"), ("train_loss", "train_loss")):
        mine, base = row[values], exact[values]
        delta = statistics.mean(mine) - statistics.mean(base)
        bound = max(accuracy.spread(mine), accuracy.spread(base))
        out[key] = {"delta": round(delta, 4), "bound": round(bound, 4),
                    "within": bool(abs(delta) <= bound)}
    out["within"] = out["test_error"]["within"] and out["train_loss"]["within"]
    return out


def study(models, modes, seeds, data, epochs, batch_size, learning_rate, alpha=1.0,
          log=print):
    """`accuracy.study` of every model and mode; returns its rows with the model
    name, the ApproxConvBlocks of the trained model, the train-loss std, the
    seconds and (non-exact modes) the `verdict` against the exact row."""
    rows = []
    for name in models:
        blocks = {}

        def make(mode, shape, name=name, blocks=blocks):
            model = build(name, mode, shape, alpha)  # looked up here: tests wrap it
            blocks[mode] = count_blocks(model)
            return model

        start = time.perf_counter()
        for row in accuracy.study(modes, None, seeds, epochs, batch_size, data=data,
                                  log=log, label=name, build=make,
                                  learning_rate=learning_rate):
            del row["depth"]
            row.update(model=name, blocks=blocks[row["mode"]],
                       train_loss_std=round(accuracy.spread(row["train_loss"]), 4),
                       steps=epochs * (row["train_samples"] // batch_size),
                       learning_rate=learning_rate)
            rows.append(row)
        for row in rows[-len(modes):]:
            row["model_s"] = round(time.perf_counter() - start, 1)
    for row in rows:
        exact = next((r for r in rows if r["model"] == row["model"] and r["mode"] == "exact"),
                     None)
        if exact is not None and row is not exact:
            row["verdict"] = verdict(row, exact)
    return rows


def _cell(values, mean, std, spec):
    return f"{mean:{spec}} ± {std:{spec}} ({', '.join(f'{v:{spec}}' for v in values)})"


def _markdown(results):
    meta, rows = results["meta"], results["rows"]
    lines = [
        "# Converted keras.applications nets: short training runs", "",
        "    " + meta["command"], "",
        (f"Fashion-MNIST resized to 32x32x3, {meta['steps']} SGD steps (momentum 0.9, "
        f"cosine decay from lr {meta['learning_rate']}), batch {meta['batch']}, "
        f"{meta['train_samples']} training / {meta['test_samples']} test images, seeds "
        f"{meta['seeds']}; Keras {meta['keras']}, TensorFlow {meta['tensorflow']}, "
        f"native ops {meta['native_ops']}, {meta['machine']}. Wall time {meta['wall_s']:.0f} s."),
        "",
        ("Test error (%) and final train loss (mean of the last epoch): mean ± sample std "
        "(per seed). Within the seed spread: |mean - exact mean| <= the larger of the two "
        "stds, for the test error and the train loss alike (delta in brackets). blocks: "
        "ApproxConvBlocks of the trained model."), "",
        "| model | mode | blocks | test error | train loss | s/run | within the seed spread |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for r in rows:
        v = r.get("verdict")
        text = "-" if v is None else (
            f"{'yes' if v['within'] else 'no'} (error {v['test_error']['delta']:+.2f}, "
            f"loss {v['train_loss']['delta']:+.4f})")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['blocks']} | "
            f"{_cell(r['test_error'], r['mean'], r['std'], '.2f')} | "
            f"{_cell(r['train_loss'], r['train_loss_mean'], r['train_loss_std'], '.4f')} | "
            f"{statistics.mean(r['train_s']):.0f} | {text} |")
    if results.get("plot"):
        lines += ["", f"![{results['plot']}]({results['plot']})"]
    return "\n".join(lines) + "\n"


def _plot(rows, out):
    """Bar chart of the mean test error per model and mode, with the seeds as points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['model']}\n{r['mode']}" for r in rows]
    for i, r in enumerate(rows):
        ax.bar(i, r["mean"], color=f"C{modes_lib.MODES.index(r['mode'])}", alpha=0.6)
        ax.plot([i] * len(r["test_error"]), r["test_error"], "k.", markersize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("test error (%)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "convert_accuracy.png"), dpi=100)
    plt.close(fig)
    return "convert_accuracy.png"


def write(results, out):
    """results.json, the PNG and results.md in `out`."""
    os.makedirs(out, exist_ok=True)
    results["plot"] = _plot(results["rows"], out) if results["rows"] else None
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(_markdown(results))


def _meta(args, argv):
    import platform

    import tensorflow as tf

    from keras_blpa.backends.tensorflow import native

    return {
        "command": " ".join([COMMAND] + list(argv)), "keras": keras.__version__,
        "tensorflow": tf.__version__, "native_ops": native.load() is not None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "models": args.models, "modes": args.modes, "seeds": args.seeds,
        "epochs": args.epochs, "batch": args.batch, "train_samples": args.train_samples,
        "test_samples": args.test_samples,
        "steps": args.epochs * (args.train_samples // args.batch),
        "learning_rate": args.lr, "alpha": args.alpha,
    }


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder of results.json/.md and the PNG")
    p.add_argument("--models", type=comma_list(), default=list(MODELS))
    p.add_argument("--modes", type=comma_list(), default=["exact", "blpa4"])
    p.add_argument("--seeds", type=comma_list(int), default=[0, 1, 2, 3])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-samples", type=int, default=6400)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.01,
                   help="peak learning rate, the same for every mode")
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2's width multiplier")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    for name in args.models:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    modes_lib.check_modes(args.modes)
    log = lambda message: print(time.strftime("%H:%M:%S"), message, flush=True)
    start = time.perf_counter()
    data = prepare(accuracy.load_data(args.train_samples, args.test_samples))
    results = {"meta": _meta(args, argv), "rows": []}
    results["rows"] = study(args.models, args.modes, args.seeds, data, args.epochs,
                            args.batch, args.lr, args.alpha, log)
    results["meta"]["wall_s"] = round(time.perf_counter() - start, 1)
    write(results, args.out)
    log(f"wrote {args.out} ({results['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
