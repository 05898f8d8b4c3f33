"""Benchmark output: results.json, results.md (Markdown tables) and PNG plots."""

import json
import os

from keras_blpa.benchmark.modes import DESCRIPTIONS
from keras_blpa.benchmark.modes import MODES

__all__ = ["PARTS", "SCHEMA_VERSION", "load_json", "save_json", "write"]

SCHEMA_VERSION = 1
# Line styles that keep coinciding curves (exact/remat, blpa/naive) visible.
_STYLES = {"exact": "o-", "remat": "s--", "recompute": "^-", "blpa8": "D-",
          "blpa4": "o-", "naive8": "v:", "naive4": "P:"}
PARTS = ("memory", "max_batch", "timing", "accuracy", "families")


def _color(mode):
    """The same colour for a mode in every plot."""
    return f"C{MODES.index(mode)}"


def _depth_label(depth, width):
    return f"{depth}" if width == 1 else f"{depth} ({width}x)"


def save_json(results, out_dir):
    path = os.path.join(out_dir, "results.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, path)
    return path


def load_json(out_dir):
    path = os.path.join(out_dir, "results.json")
    with open(path) as f:
        return json.load(f)


def _ordered(modes):
    return [m for m in MODES if m in modes]


def _depths(rows):
    seen = []
    for r in rows:
        key = (r["depth"], r.get("width", 1))
        if key not in seen:
            seen.append(key)
    return seen


def _ratio(value, base):
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def _with_ratio(row, base, key, spec):
    """``row[key]`` formatted by `spec`, with its ratio to the exact row's."""
    return f"{row[key]:{spec}}{_ratio(row[key], base and base[key])}"


def _mode_by_depth_table(rows, title, cell, label=str):
    """A Markdown table with a row per mode and a column per depth (width).

    ``cell(row, exact_row)`` formats a present entry (``exact_row`` is None where
    the exact mode has none at that depth); missing entries show "-".
    """
    depths = _depths(rows)
    lookup = {(r["mode"], r["depth"], r.get("width", 1)): r for r in rows}
    lines = [
        title,
        "",
        "| mode | " + " | ".join(_depth_label(*d) for d in depths) + " |",
        "|---|" + "---:|" * len(depths),
    ]
    for mode in _ordered({r["mode"] for r in rows}):
        cells = []
        for d in depths:
            r = lookup.get((mode, *d))
            cells.append("-" if r is None else cell(r, lookup.get(("exact", *d))))
        lines.append(f"| {label(mode)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _memory_table(rows, batch):
    """Peak MiB per mode (rows) and depth (columns) at the fixed batch."""
    rows = [r for r in rows if r["batch"] == batch]
    if not rows:
        return ""
    source = "XLA's compiled step" if rows[0].get("source") == "xla-compiled" else "the allocator"
    return _mode_by_depth_table(
        rows,
        f"Peak training-step memory at batch {batch}, MiB (ratio to exact) "
        f"[in brackets: the part above what was resident before the step] from {source}.",
        lambda r, base: _with_ratio(r, base, "peak_mib", ".0f") + f" [{r['step_mib']:.0f}]",
        label=lambda mode: f"{mode}: {DESCRIPTIONS[mode]}",
    )


def _memory_vs_batch_table(rows):
    lines = []
    for depth, width in _depths(rows):
        sel = [r for r in rows if r["depth"] == depth and r.get("width", 1) == width]
        batches = sorted({r["batch"] for r in sel})
        if len(batches) < 2:
            continue
        lookup = {(r["mode"], r["batch"]): r["peak_mib"] for r in sel}
        lines += [
            f"Peak memory (MiB) vs batch size, depth {_depth_label(depth, width)}:",
            "",
            "| mode | " + " | ".join(str(b) for b in batches) + " |",
            "|---|" + "---:|" * len(batches),
        ]
        for mode in _ordered({r["mode"] for r in sel}):
            cells = [f"{lookup[(mode, b)]:.0f}" if (mode, b) in lookup else "-" for b in batches]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _max_batch_table(rows):
    if not rows:
        return ""
    budgets = sorted({r["budget_mib"] for r in rows})

    def cell(r, base):
        ms = r.get("ms_per_sample_at_max")
        return _with_ratio(r, base, "max_batch", "") + (f"; {ms:.1f} ms" if ms else "")

    return _mode_by_depth_table(
        rows,
        f"Largest batch under a {', '.join(str(b) for b in budgets)} MiB budget "
        "(ratio to exact; time per sample at that batch, ms):",
        cell,
    )


def _timing_table(rows):
    if not rows:
        return ""
    batches = sorted({r["batch"] for r in rows})
    return _mode_by_depth_table(
        rows,
        f"Time per training sample at batch {', '.join(str(b) for b in batches)}, "
        "ms, median over interleaved steps (ratio to exact):",
        lambda r, base: _with_ratio(r, base, "ms_per_sample", ".2f"),
    )


def _accuracy_table(rows):
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"Fashion-MNIST test error, ResNet-{r0['depth']}, {r0['epochs']} epoch(s), "
        f"batch {r0['batch']}, {r0['train_samples']} training / {r0['test_samples']} "
        f"test images, seeds {r0['seeds']} (mean +- std, %):",
        "",
        "| mode | test error | per seed |",
        "|---|---:|---|",
    ]
    for mode in _ordered({r["mode"] for r in rows}):
        r = next(r for r in rows if r["mode"] == mode)
        lines.append(
            f"| {mode} | {r['mean']:.2f} +- {r['std']:.2f} | "
            + ", ".join(f"{e:.2f}" for e in r["test_error"]) + " |"
        )
    return "\n".join(lines) + "\n"


def _families_table(rows):
    """Test error, final train loss and time per epoch of each family and mode."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"Fashion-MNIST, small nets of the families convert reaches, {r0['epochs']} "
        f"epoch(s), batch {r0['batch']}, {r0['train_samples']} training / "
        f"{r0['test_samples']} test images, seeds {r0['seeds']}. Test error mean +- "
        "sample std over the seeds (%); train loss: mean over the seeds of the last "
        "epoch's mean loss; s/epoch: median epoch; blocks: ApproxConvBlocks convert "
        "made of the stock net. Within spread: |mean - exact mean| <= the larger "
        "of the two stds.",
        "",
        "| family | blocks | mode | test error | per seed | train loss | s/epoch | "
        "within spread |",
        "|---|---:|---|---:|---|---:|---:|---|",
    ]
    families = []
    for r in rows:
        if r["family"] not in families:
            families.append(r["family"])
    for family in families:
        sel = {r["mode"]: r for r in rows if r["family"] == family}
        exact = sel.get("exact")
        for mode in _ordered(set(sel)):
            r = sel[mode]
            if exact is None or mode == "exact":
                within = "-"
            else:
                gap = abs(r["mean"] - exact["mean"])
                within = "yes" if gap <= max(r["std"], exact["std"]) else "no"
                within += f" ({r['mean'] - exact['mean']:+.2f})"
            blocks = "-" if mode == "exact" else str(r["blocks_converted"])
            lines.append(
                f"| {family} | {blocks} | {mode} | {r['mean']:.2f} +- {r['std']:.2f} | "
                + ", ".join(f"{e:.2f}" for e in r["test_error"])
                + f" | {r['train_loss_mean']:.4f} | {r['epoch_s']:.1f} | {within} |"
            )
    return "\n".join(lines) + "\n"


def _software(meta):
    """"Keras 3.x on JAX 0.y." or "... on TensorFlow 2.z, native ops: True." (older results: TensorFlow).

    Read from the versions the run recorded (`backends.get().versions()`).
    """
    if "jax" in meta:
        return f"Keras {meta.get('keras', '?')} on JAX {meta['jax']}."
    return (f"Keras {meta.get('keras', '?')} on TensorFlow {meta.get('tensorflow', '?')}, "
            f"native ops: {meta.get('native_ops', '?')}.")


def _markdown(results):
    meta = results.get("meta", {})
    parts = [
        "# keras_blpa benchmark",
        "",
        f"Machine: {meta.get('machine', '?')}. {_software(meta)}",
        "",
        "Commands (in order, each with --resume adding to the same folder):",
        "",
        *[f"    {c}" for c in meta.get("commands", [meta.get("command", "?")])],
        "",
    ]
    cfg = results.get("config", {})
    if results.get("memory"):
        parts.append(_memory_table(results["memory"], cfg.get("batch")))
        parts.append(_memory_vs_batch_table(results["memory"]))
    if results.get("timing"):
        parts.append(_timing_table(results["timing"]))
    if results.get("max_batch"):
        parts.append(_max_batch_table(results["max_batch"]))
    if results.get("accuracy"):
        parts.append(_accuracy_table(results["accuracy"]))
    if results.get("families"):
        parts.append(_families_table(results["families"]))
    for plot in results.get("plots", []):
        parts.append(f"![{plot}]({plot})\n")
    return "\n".join(parts)


def _save(fig, plt, out_dir, name):
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    return name


def _memory_vs_batch_plot(results, out_dir, plt):
    """memory_vs_batch.png, one panel per depth, with the largest-batch trials that fit;
    None unless some depth was measured at two batches or more."""
    memory = results.get("memory", [])
    depths = _depths(memory)
    if not any(
        len({r["batch"] for r in memory if (r["depth"], r.get("width", 1)) == d}) > 1
        for d in depths
    ):
        return None
    fig, axes = plt.subplots(1, len(depths), figsize=(5 * len(depths), 4), squeeze=False)
    for ax, (depth, width) in zip(axes[0], depths):
        sel = [r for r in memory if r["depth"] == depth and r.get("width", 1) == width]
        trials = [r for r in results.get("max_batch", [])
                  if r["depth"] == depth and r.get("width", 1) == width]
        for mode in _ordered({r["mode"] for r in sel}):
            pts = sorted((r["batch"], r["peak_mib"]) for r in sel if r["mode"] == mode)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], _STYLES[mode],
                            label=mode, markerfacecolor="none", color=_color(mode))
            # The largest-batch trials that fit (BFC allocator, budget-limited).
            extra = sorted((t["batch"], t["peak_mib"]) for r in trials if r["mode"] == mode
                           for t in r["trials"] if t.get("ok"))
            if extra:
                ax.plot([p[0] for p in extra], [p[1] for p in extra], "x",
                        color=line.get_color(), label=f"{mode} (largest-batch trials)")
        if trials:
            ax.axhline(trials[0]["budget_mib"], color="gray", ls="--", lw=0.8,
                       label=f"budget {trials[0]['budget_mib']} MiB")
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(f"ResNet-{_depth_label(depth, width)}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("peak training-step memory (MiB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, plt, out_dir, "memory_vs_batch.png")


def _max_batch_plot(results, out_dir, plt):
    """max_batch_vs_depth.png, the largest batch per mode and depth; None without rows."""
    max_batch = results.get("max_batch", [])
    if not max_batch:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [_depth_label(*d) for d in _depths(max_batch)]
    for mode in _ordered({r["mode"] for r in max_batch}):
        pts = {_depth_label(r["depth"], r.get("width", 1)): r["max_batch"]
               for r in max_batch if r["mode"] == mode}
        xs = [i for i, lab in enumerate(labels) if lab in pts]
        ax.plot(xs, [pts[labels[i]] for i in xs], _STYLES[mode], label=mode,
                color=_color(mode))
    ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel("ResNet depth")
    ax.set_ylabel("largest batch")
    ax.set_yscale("log")
    ax.set_title(f"Largest batch under {max_batch[0]['budget_mib']} MiB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out_dir, "max_batch_vs_depth.png")


def _families_plot(results, out_dir, plt):
    """families.png, test error (mean, std bars, seeds as dots) per family and mode;
    None without rows."""
    rows = results.get("families", [])
    if not rows:
        return None
    families = []
    for r in rows:
        if r["family"] not in families:
            families.append(r["family"])
    modes = _ordered({r["mode"] for r in rows})
    fig, ax = plt.subplots(figsize=(2.2 * len(families) + 2, 4))
    step = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        for i, family in enumerate(families):
            r = next((r for r in rows if (r["family"], r["mode"]) == (family, mode)), None)
            if r is None:
                continue
            x = i - 0.4 + step * (j + 0.5)
            ax.bar(x, r["mean"], step * 0.9, yerr=r["std"], capsize=3, color=_color(mode),
                   label=mode if i == 0 else None)
            ax.plot([x] * len(r["test_error"]), r["test_error"], "k.", ms=4)
    ax.set_xticks(range(len(families)), families)
    ax.set_ylabel("test error (%)")
    r0 = rows[0]
    ax.set_title(f"Fashion-MNIST, {r0['epochs']} epochs, {r0['train_samples']} images, "
                 f"{len(r0['seeds'])} seeds")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return _save(fig, plt, out_dir, "families.png")


def _plots(results, out_dir):
    """Writes the plots the results have data for; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [plot(results, out_dir, plt)
             for plot in (_memory_vs_batch_plot, _max_batch_plot, _families_plot)]
    return [name for name in names if name]


def write(results, out_dir):
    """Writes results.json, the PNG plots and results.md; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    results["plots"] = _plots(results, out_dir)
    paths = [save_json(results, out_dir)]
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(_markdown(results))
    return paths + [md] + [os.path.join(out_dir, p) for p in results["plots"]]
