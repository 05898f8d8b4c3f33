"""The model-family table: `keras_blpa.convert` on keras.applications and keras-hub CNNs.

For each model, in one process (TensorFlow backend, allocator statistics on):

* ``blocks``: ApproxConvBlocks made by ``convert(model, bits)`` (4 bits), and the
  report's kept activation bytes before/after (``memory_report``, at the first
  batch size), with what stays float and why, grouped by reason;
* ``forward_max_abs_diff``: max |converted - original| of the outputs on one
  batch, at inference and in training mode (the forward pass is exact);
* ``grad_cosine``: the gradients of every trainable weight on the same batch
  and the same loss, converted vs original, at 8 and 4 bits: the cosine of all
  of them flattened together, and the smallest cosine of one variable (over
  the variables whose exact gradient is not ~0: a conv bias feeding a
  training-mode BatchNormalization has an exactly zero gradient, so its cosine
  is round-off). Variables are matched by value (convert copies them): before
  converting, every BN scale/shift and every bias is set to a random value, as
  a trained model's are, so that no two variables are equal;
* ``step_peak``: the allocator's peak of one compiled training step
  (``model.train_on_batch``, after a warm-up step) at two batch sizes, original
  and converted, and the PER-SAMPLE SLOPE (difference of the step's peak above
  what was resident when it started, / batch difference): what one more sample
  costs, free of the weights, optimizer state and batch-independent workspace
  that the peak itself includes (``raw_peak_slope``: the same from the raw
  peaks, which also move with what happens to be resident);
* ``step_time``: converted / original time of one training step at the first
  batch size, the two models' steps interleaved in one process, median of
  ``--steps`` after ``--warmup`` steps each.

keras-hub rows convert the task the way users will, ``convert(classifier)``; a
second row (``<name> [backbone]``) converts the backbone alone
(``convert(classifier.backbone)``) and puts it back under the same classifier
head (the same head weights), so the rows show the figures of nested
conversion either way.

Dropout and stochastic depth are off (rate 0) so that training-mode outputs and
gradients are deterministic and comparable. InceptionV3 needs inputs >= 75
pixels: it runs at ``max(--input-size, 96)`` (said in its row).

    python -m keras_blpa.benchmark.applications --models ResNet50,MobileNetV2 \\
        --input-size 64 --batch-sizes 16,32 --out keras_blpa/benchmark/results/applications
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

from keras_blpa import memory
from keras_blpa.benchmark.cli import comma_list

# Allocator statistics on every CPU: must run before TensorFlow's first op.
memory.enable_cpu_statistics()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_blpa  # noqa: E402

__all__ = [
    "APPLICATIONS",
    "HUB",
    "MODELS",
    "build",
    "gradient_cosines",
    "main",
    "measure_model",
    "slope",
    "step_peak_bytes",
]

MIB = float(2**20)
NUM_CLASSES = 10
MIN_INPUT = {"InceptionV3": 96}  # keras.applications.InceptionV3 needs >= 75

# keras.applications constructors and their dropout-off arguments.
APPLICATIONS = {
    "ResNet50": {},
    "ResNet50V2": {},
    "DenseNet121": {},
    "MobileNetV2": {},
    "EfficientNetB0": {},  # its Dropout layers get rate 0 in `build`
    "ConvNeXtTiny": {},  # stochastic depth 0 already (keras.applications' default)
    "InceptionV3": {},
}


def _hub_resnet(image_shape, pre_activation):
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
        use_pre_activation=pre_activation, image_shape=image_shape,
    )
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=NUM_CLASSES)


def _hub_efficientnet(image_shape):
    import keras_hub

    # EfficientNet-B0 (v1 blocks), as keras.applications.EfficientNetB0 builds it.
    backbone = keras_hub.models.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0] * 7, stackwise_depth_coefficients=[1.0] * 7,
        stackwise_kernel_sizes=[3, 3, 5, 3, 5, 5, 3], stackwise_num_repeats=[1, 2, 2, 3, 3, 4, 1],
        stackwise_input_filters=[32, 16, 24, 40, 80, 112, 192],
        stackwise_output_filters=[16, 24, 40, 80, 112, 192, 320],
        stackwise_expansion_ratios=[1, 6, 6, 6, 6, 6, 6],
        stackwise_squeeze_and_excite_ratios=[0.25] * 7, stackwise_strides=[1, 2, 2, 2, 1, 2, 1],
        stackwise_block_types=["v1"] * 7, dropout=0.0, include_stem_padding=True,
        use_depth_divisor_as_min_depth=True, cap_round_filter_decrease=True,
        stem_conv_padding="valid", batch_norm_momentum=0.9, batch_norm_epsilon=1e-3,
        input_shape=image_shape,
    )
    return keras_hub.models.EfficientNetImageClassifier(backbone=backbone, num_classes=NUM_CLASSES)


def _hub_cspnet(image_shape):
    import keras_hub

    # CSP-DarkNet-53's layout (timm's cspdarknet53: CSP stages of dark blocks,
    # expand 2, bottleneck 0.5, down_growth), random weights.
    backbone = keras_hub.models.CSPNetBackbone(
        stem_filters=32, stem_kernel_size=3, stem_strides=1,
        stackwise_depth=[1, 2, 8, 8, 4], stackwise_strides=[2, 2, 2, 2, 2],
        stackwise_num_filters=[64, 128, 256, 512, 1024], block_type="dark_block",
        stage_type="csp", expand_ratio=[2.0], bottle_ratio=[0.5], block_ratio=[1.0],
        down_growth=True, image_shape=image_shape,
    )
    return keras_hub.models.CSPNetImageClassifier(backbone=backbone, num_classes=NUM_CLASSES)


HUB = {
    "hub.ResNet50v1": lambda shape: _hub_resnet(shape, False),
    "hub.ResNet50v2": lambda shape: _hub_resnet(shape, True),
    "hub.EfficientNetB0": _hub_efficientnet,
    "hub.CSPDarkNet53": _hub_cspnet,
}

MODELS = tuple(APPLICATIONS) + tuple(HUB)


def build(name, input_size, seed=0):
    """(model, logits, input_size used) for a row name of `MODELS`."""
    keras.utils.set_random_seed(seed)
    size = max(input_size, MIN_INPUT.get(name, 0))
    shape = (size, size, 3)
    if name in APPLICATIONS:
        ctor = getattr(keras.applications, name)
        model, logits = ctor(weights=None, input_shape=shape, classes=NUM_CLASSES,
                             **APPLICATIONS[name]), False
    elif name in HUB:
        model, logits = HUB[name](shape), True
    else:
        raise ValueError(f"Expected a model in {MODELS}. Received: name={name!r}")
    for layer in _leaf_layers(model):  # dropout off (read at call time and in get_config)
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    return model, logits, size


def _leaf_layers(model):
    """Every layer holding variables, descending into nested models (in order)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def randomize(model, seed=0):
    """Random values for every constant float variable (BN scales/shifts and moving
    statistics, biases, layer scales): a trained model has no such constants, and
    it makes every variable's value unique, so that `match_variables` works. A
    constant c becomes c * U(0.5, 1.5) (its scale kept), a zero N(0, 0.2), a tiny
    one (|c| < 1e-3: ConvNeXt's layer scale, 1e-6 at init, which would make every
    residual branch's gradient ~1e-6 of the largest) U(0.1, 1)."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        if "float" not in str(v.dtype):
            continue
        value = keras.ops.convert_to_numpy(v)
        if value.size < 2 or not np.all(value == value.flat[0]):
            continue
        c = float(value.flat[0])
        if 0.0 < abs(c) < 1e-3:  # ConvNeXt's layer scale (1e-6 at init): trained, O(0.1..1)
            new = rng.uniform(0.1, 1.0, value.shape)
        elif c == 0.0:
            new = rng.normal(0.0, 0.2, value.shape)
        else:
            new = c * rng.uniform(0.5, 1.5, value.shape)
        v.assign(new.astype(value.dtype))


def _key(v):
    value = keras.ops.convert_to_numpy(v)
    return value.shape, value.tobytes()


def match_variables(original, converted):
    """For each original trainable variable, the converted variable with its value
    (None where there is none); call right after convert, before any update."""
    pool = {}
    for v in converted.trainable_variables:
        pool.setdefault(_key(v), []).append(v)
    matched = []
    for v in original.trainable_variables:
        found = pool.get(_key(v))
        matched.append(found.pop(0) if found else None)
    return matched


def _loss(y, out, logits):
    return keras.ops.mean(
        keras.losses.sparse_categorical_crossentropy(y, out, from_logits=logits)
    )


def gradients(model, variables, x, y, logits):
    """Training-mode gradients of the mean cross-entropy w.r.t. `variables`."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = _loss(y, out, logits)
    return [None if g is None else keras.ops.convert_to_numpy(g)
            for g in tape.gradient(loss, variables)]


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def gradient_cosines(reference, got, names, zero_fraction=1e-6):
    """{"all": cosine of all gradients flattened together, "min": smallest
    per-variable cosine over variables whose reference norm is >= zero_fraction
    of the largest, "min_variable": its name, "near_zero": how many were left out}."""
    norms = [np.linalg.norm(g) for g in reference]
    largest = max(norms)
    flat_ref = np.concatenate([np.ravel(g) for g in reference])
    flat_got = np.concatenate([np.ravel(g) for g in got])
    worst, worst_name, left_out = 1.0, None, 0
    for g, h, n, name in zip(reference, got, norms, names):
        if n < zero_fraction * largest:
            left_out += 1
            continue
        c = cosine(g, h)
        if c < worst:
            worst, worst_name = c, name
    return {"all": round(cosine(flat_ref, flat_got), 5), "min": round(worst, 5),
            "min_variable": worst_name, "near_zero": left_out}


def random_batch(batch, size, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, size, size, 3), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=(batch,), dtype=np.int32)
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def compile_model(model, logits):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits),
    )
    return model


def step_peak_bytes(model, x, y, warmup=True):
    """Allocator peak of one compiled training step (``train_on_batch``), after a
    warm-up step at this batch (tracing, optimizer slots) unless ``warmup=False``;
    (peak, resident) bytes, resident = allocated when the step started."""
    if warmup:
        model.train_on_batch(x, y)
    with memory.PeakMemory() as peak:
        model.train_on_batch(x, y)
    return peak.peak_bytes, peak.resident_bytes


def slope(peaks, batches):
    """Per-sample slope (bytes per sample) of peaks measured at two batch sizes."""
    (b1, b2), (p1, p2) = batches, peaks
    return (p2 - p1) / (b2 - b1)


def slope_ratio(slopes):
    """original / converted of the stored (rounded) slopes, or None where the
    converted step's peak did not grow with the batch (a slope <= 0 at the
    allocator's resolution: gradient-bound at these batches, so no ratio exists)."""
    if slopes["converted"] <= 0:
        return None
    return round(slopes["original"] / slopes["converted"], 3)


def _fmt_ratio(ratio):
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def step_times(models, x, y, steps, warmup):
    """Seconds per training step of each model, interleaved round-robin."""
    for model in models:
        for _ in range(warmup):
            model.train_on_batch(x, y)
    times = [[] for _ in models]
    for _ in range(steps):
        for model, t in zip(models, times):
            t0 = time.perf_counter()
            model.train_on_batch(x, y)
            t.append(time.perf_counter() - t0)
    return times


def _unconverted(report):
    """What stays float after conversion, grouped by reason."""
    groups = {}
    for row in report.still_float:
        g = groups.setdefault(row.reason or "(no reason given)",
                              {"layers": 0, "bytes": 0, "examples": []})
        g["layers"] += 1
        g["bytes"] += row.after
        if len(g["examples"]) < 3:
            g["examples"].append(f"{row.name} ({row.layer_type})")
    return sorted(({"reason": k, **v} for k, v in groups.items()), key=lambda g: -g["bytes"])


def _report_fields(report):
    if report is None:
        return {"blocks": None, "kept_before_mib": None, "kept_after_mib": None}
    return {
        "blocks": len(report.blocks),
        "kept_before_mib": round(report.before_bytes / MIB, 2),
        "kept_after_mib": round(report.after_bytes / MIB, 2),
        "kept_ratio": round(report.before_bytes / max(report.after_bytes, 1), 3),
        "transient_mib": round(report.transient_bytes / MIB, 2),
        "unconverted": _unconverted(report),
    }


def _with_backbone(classifier, backbone):
    """The classifier's task class around `backbone`, with the classifier's head weights."""
    new = type(classifier)(backbone=backbone, num_classes=NUM_CLASSES)
    for layer in classifier.layers:
        if layer is classifier.backbone or not layer.weights:
            continue
        new.get_layer(layer.name).set_weights(layer.get_weights())
    return new


def _convert(original, name, bits, batch, variant):
    """(converted model, report) of one variant: "model" = convert(model);
    "backbone" = convert(model.backbone) under the same head."""
    if variant == "backbone":
        backbone, report = keras_blpa.convert(
            original.backbone, bits=bits, return_report=True, batch_size=batch
        )
        return _with_backbone(original, backbone), report
    return keras_blpa.convert(original, bits=bits, return_report=True, batch_size=batch)


def measure_model(name, input_size=64, batch_sizes=(16, 32), bits=4, cosine_bits=(8, 4),
                  cosine_batch=8, steps=5, warmup=2, variant="model", log=print):
    """One row of the table (a dict); see the module docstring for the fields."""
    keras.backend.clear_session()
    t_start = time.perf_counter()
    original, logits, size = build(name, input_size)
    randomize(original)
    row = {"model": name if variant == "model" else f"{name} [backbone]", "variant": variant,
           "call": "convert(model)" if variant == "model" else "convert(model.backbone)",
           "input_size": size, "bits": bits, "batch_sizes": list(batch_sizes),
           "cosine_batch": cosine_batch, "params": int(original.count_params())}
    # Report and conversion at `bits`.
    try:
        converted, report = _convert(original, name, bits, batch_sizes[0], variant)
    except Exception as e:  # a row records why it could not convert
        row["error"] = f"{type(e).__name__}: {e}"
        log(f"{row['model']}: convert failed: {row['error']}")
        return row
    row.update(_report_fields(report))
    blocks = [l for l in _leaf_layers(converted) if isinstance(l, keras_blpa.ApproxConvBlock)]
    row["blocks_in_model"] = len(blocks)
    # Exact forward pass.
    x, y = random_batch(cosine_batch, size)
    diffs = {}
    for training in (False, True):
        a = keras.ops.convert_to_numpy(original(x, training=training))
        b = keras.ops.convert_to_numpy(converted(x, training=training))
        diffs["training" if training else "inference"] = float(np.max(np.abs(a - b)))
    row["forward_max_abs_diff"] = diffs
    # Gradient cosines at each code width (the same batch, loss and weights).
    variables = original.trainable_variables
    names = [v.path for v in variables]
    reference = gradients(original, variables, x, y, logits)
    row["grad_cosine"] = {}
    for b in cosine_bits:
        other = converted if b == bits else _convert(original, name, b, batch_sizes[0], variant)[0]
        matched = match_variables(original, other)
        missing = [n for n, v in zip(names, matched) if v is None]
        if missing:
            row["grad_cosine"][str(b)] = {"error": f"{len(missing)} variables unmatched",
                                          "unmatched": missing[:5]}
            continue
        got = gradients(other, matched, x, y, logits)
        row["grad_cosine"][str(b)] = gradient_cosines(reference, got, names)
        if other is not converted:
            del other
    log(f"{row['model']}: {row['blocks']} blocks, forward diff {diffs}, "
        f"cosines {row['grad_cosine']}")
    if not row["blocks_in_model"]:
        row["skipped"] = "nothing converted: no step memory or time measured"
        row["seconds"] = round(time.perf_counter() - t_start, 1)
        return row
    # Allocator peaks of one compiled step at two batch sizes, and the slope. Every
    # step function and optimizer slot of both models exists before the first
    # measurement, so what is resident does not change between measurements.
    compile_model(original, logits)
    compile_model(converted, logits)
    batches = {b: random_batch(b, size) for b in batch_sizes}
    for b in batch_sizes:
        for model in (original, converted):
            model.train_on_batch(*batches[b])
    peaks, residents = {"original": [], "converted": []}, {"original": [], "converted": []}
    for b in batch_sizes:
        for key, model in (("original", original), ("converted", converted)):
            peak, resident = step_peak_bytes(model, *batches[b], warmup=False)
            peaks[key].append(peak)
            residents[key].append(resident)
    row["step_peak_mib"] = {k: [round(p / MIB, 2) for p in v] for k, v in peaks.items()}
    row["step_resident_mib"] = {k: [round(p / MIB, 2) for p in v] for k, v in residents.items()}
    # The slope of the step's own peak (peak - resident): what was resident varies
    # by ~10 MiB between measurements (ResNet50: the raw peaks' slope ratio read
    # 2.29 and 1.84 in two runs, this one 2.40 and 2.31).
    steps_ = {k: [p - r for p, r in zip(peaks[k], residents[k])] for k in peaks}
    slopes = {k: slope(v, batch_sizes) for k, v in steps_.items()}
    row["slope_mib_per_sample"] = {k: round(s / MIB, 3) for k, s in slopes.items()}
    row["raw_peak_slope_mib_per_sample"] = {
        k: round(slope(v, batch_sizes) / MIB, 3) for k, v in peaks.items()}
    row["slope_ratio"] = slope_ratio(row["slope_mib_per_sample"])
    row["gradient_bound"] = gradient_bound(row)
    # Step time, interleaved.
    t_orig, t_conv = step_times([original, converted], *batches[batch_sizes[0]], steps, warmup)
    row["step_time_s"] = {"original": round(statistics.median(t_orig), 4),
                          "converted": round(statistics.median(t_conv), 4)}
    row["step_time_ratio"] = round(statistics.median(t_conv) / statistics.median(t_orig), 3)
    row["step_time_all_s"] = {"original": [round(t, 4) for t in t_orig],
                              "converted": [round(t, 4) for t in t_conv]}
    row["seconds"] = round(time.perf_counter() - t_start, 1)
    log(f"{row['model']}: slope {row['slope_mib_per_sample']} MiB/sample "
        f"({_fmt_ratio(row['slope_ratio'])}), step time {row['step_time_ratio']}x, {row['seconds']} s")
    del original, converted
    return row


def gradient_bound(row):
    """True when the converted model's kept activations at the first batch (report)
    are below its float32 gradients (4 bytes x params): its step peak then comes
    after the backward has made the gradients and hardly grows with the batch."""
    if row.get("kept_after_mib") is None:
        return False
    return row["kept_after_mib"] < 4 * row["params"] / MIB


def _fmt_cos(row, b):
    c = row.get("grad_cosine", {}).get(str(b))
    if not c:
        return "-"
    if "error" in c:
        return c["error"]
    return f"{c['all']:.4f} / {c['min']:.3f}"


def _mib(v):
    return "-" if v is None else f"{v:.1f}"


def markdown(rows, meta):
    """The table as markdown (results.md)."""
    b1, b2 = meta["batch_sizes"]
    lines = [
        "# keras_blpa.convert on model families",
        "",
        f"Command: `{meta['command']}`",
        "",
    ] + [f"Rows re-measured by: `{c}`" for c in meta.get("merged", [])] + [
        "",
        f"{meta['machine']}; TensorFlow {meta['tensorflow']}, Keras {meta['keras']}, "
        f"native kernels: {meta['native']}; oneDNN: {meta['onednn']}. Inputs "
        f"{meta['input_size']}x{meta['input_size']} (InceptionV3: 96x96, its minimum is 75), "
        f"{meta['bits']}-bit codes, random weights with random BN/bias values, dropout off.",
        "",
        f"- kept: the report's activation bytes kept for backprop at batch {b1}, before -> after.",
        f"- slope: the allocator's peak of one compiled training step above what was resident "
        f"when it started, at batches {b1} and {b2}: (step({b2}) - step({b1})) / {b2 - b1}, "
        "original -> converted (MiB per sample), and the ratio original / converted.",
        f"- time: converted / original training-step time at batch {b1}, interleaved, median of "
        f"{meta['steps']} after {meta['warmup']} warm-up steps each.",
        f"- cosine: gradients of all trainable weights on one batch of {meta['cosine_batch']}, "
        "all flattened together / the lowest single variable (variables with ~0 exact gradient left out).",
        "- fwd diff: max |converted - original| of the outputs, inference / training mode.",
        "- `*`: gradient-bound at these batches: the converted model's kept activations "
        f"at batch {b1} (report) are less than its float32 weight gradients (4 bytes x params), "
        "so the step's peak is reached once the gradients exist, not at the start of the "
        "backward pass, and barely moves with the batch: the slope understates what one more "
        "sample costs (and the ratio overstates the saving). Larger batches give the true slope. "
        "`n/a`: the converted step's peak did not grow between the two batches (slope <= 0), "
        "so there is no ratio.",
        "- keras-hub rows: `convert(classifier)` (what users call), and `[backbone]`: "
        "`convert(classifier.backbone)` put back under the same head.",
        "",
        "| model | blocks | kept (report) MiB | slope MiB/sample | slope ratio | time ratio "
        "| cosine 8-bit | cosine 4-bit | fwd diff | still float (report) |",
        "|---|---:|---|---|---:|---:|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | - | - | {r['error'][:120]} |")
            continue
        d = r["forward_max_abs_diff"]
        s = r.get("slope_mib_per_sample")
        bound = gradient_bound(r)
        floats = (f"{sum(g['layers'] for g in r['unconverted'])} layers, "
                  f"{sum(g['bytes'] for g in r['unconverted']) / MIB:.1f} MiB")
        name = r["model"] + (f" ({r['input_size']}px)" if r["input_size"] != meta["input_size"] else "")
        lines.append(
            f"| {name} | {r['blocks']} | {_mib(r['kept_before_mib'])} -> {_mib(r['kept_after_mib'])} "
            + (f"| {s['original']:.2f} -> {s['converted']:.2f}{'*' if bound else ''} "
               f"| {_fmt_ratio(r['slope_ratio'])}{'*' if bound else ''} "
               f"| {r['step_time_ratio']:.2f}x " if s else "| (nothing converted) | - | - ")
            + f"| {_fmt_cos(r, 8)} | {_fmt_cos(r, 4)} "
            f"| {d['inference']:.1e} / {d['training']:.1e} | {floats} |"
        )
    lines += ["", "## What stays float (the report's reasons, largest first)", ""]
    for r in rows:
        if "error" in r:
            continue
        lines.append(f"- **{r['model']}**: " + ("; ".join(
            f"{g['layers']}x {g['reason']} ({g['bytes'] / MIB:.2f} MiB; e.g. {', '.join(g['examples'])})"
            for g in r["unconverted"][:4]) or "nothing"))
    return "\n".join(lines) + "\n"


def _meta(args, argv):
    import tensorflow as tf
    from keras_blpa.backends.tensorflow import native

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other")
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on with AVX-512)")
    return {
        "command": "python -m keras_blpa.benchmark.applications " + " ".join(argv),
        "machine": f"{os.cpu_count()}-core CPU ({isa}, {platform.machine()})",
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "native": native.load() is not None, "onednn": onednn,
        "input_size": args.input_size, "batch_sizes": args.batch_sizes, "bits": args.bits,
        "cosine_batch": args.cosine_batch, "steps": args.steps, "warmup": args.warmup,
    }


_ints = comma_list(int)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS),
                   help=f"comma-separated rows, from {', '.join(MODELS)}")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--batch-sizes", type=_ints, default=[16, 32],
                   help="two batch sizes: the slope's; the first is the time's and the report's")
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    p.add_argument("--cosine-bits", type=_ints, default=[8, 4])
    p.add_argument("--cosine-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-backbone", action="store_true",
                   help="skip the [backbone] rows of keras-hub models")
    p.add_argument("--merge", action="store_true",
                   help="replace the measured rows in --out's results.json, keep the others")
    p.add_argument("--render", action="store_true",
                   help="only write results.md again from the results.json in --out")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "applications"))
    args = p.parse_args(argv)
    args.models = comma_list()(args.models)
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; expected one of {', '.join(MODELS)}")
    if len(args.batch_sizes) != 2 or args.batch_sizes[0] >= args.batch_sizes[1]:
        p.error(f"--batch-sizes takes two increasing sizes. Received: {args.batch_sizes}")
    return args


def _merged(commands, command):
    """The re-measuring commands with `command` last, each listed once (at its last run)."""
    return [c for c in commands if c != command] + [command]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.render:  # results.md again from results.json (e.g. after a change of layout)
        with open(os.path.join(args.out, "results.json")) as f:
            data = json.load(f)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(data["rows"], data["meta"]))
        return data["rows"]
    meta = _meta(args, argv)
    rows = []
    if args.merge:  # re-measured rows replace those of the same name in results.json
        with open(os.path.join(args.out, "results.json")) as f:
            old = json.load(f)
        rows = old["rows"]
        meta = dict(old["meta"], merged=_merged(old["meta"].get("merged", []), meta["command"]))

    def put(row):
        for i, r in enumerate(rows):
            if r["model"] == row["model"]:
                rows[i] = row
                return
        rows.append(row)

    def save():
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(markdown(rows, meta))

    kwargs = dict(input_size=args.input_size, batch_sizes=tuple(args.batch_sizes), bits=args.bits,
                  cosine_bits=tuple(args.cosine_bits), cosine_batch=args.cosine_batch,
                  steps=args.steps, warmup=args.warmup)
    for name in args.models:
        variants = ["model"] + (["backbone"] if name in HUB and not args.no_backbone else [])
        for variant in variants:
            put(measure_model(name, variant=variant, **kwargs))
            save()
    print(markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
