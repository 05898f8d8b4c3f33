"""keras_blpa.benchmark.applications: one tiny row end to end, each field checked
against an independent computation (the memory report, a name-based variable
map as tests/test_convert.py builds it, the row's own raw measurements)."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from keras_blpa.benchmark import applications

MIB = 2.0**20
BATCHES = (4, 8)
SIZE = 32


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The CLI on a narrow MobileNetV2 (alpha 0.35, 32x32): JSON, markdown, argv."""
    out = tmp_path_factory.mktemp("applications")
    saved = dict(applications.APPLICATIONS)
    applications.APPLICATIONS["MobileNetV2"] = {"alpha": 0.35}
    try:
        argv = ["--models", "MobileNetV2", "--input-size", str(SIZE),
                "--batch-sizes", ",".join(map(str, BATCHES)), "--cosine-batch", "4",
                "--steps", "3", "--warmup", "1", "--out", str(out)]
        applications.main(argv)
        with open(out / "results.json") as f:
            data = json.load(f)
        with open(out / "results.md") as f:
            md = f.read()
    finally:
        applications.APPLICATIONS.clear()
        applications.APPLICATIONS.update(saved)
    return data, md


def _original():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(SIZE, SIZE, 3),
                                           classes=10, alpha=0.35)
    applications.randomize(model)
    return model


def _variable_map(original, converted, report):
    """{original variable: converted variable}, by layer and variable names (the
    naming convention of ApproxConvBlock), not by value as the benchmark matches."""
    by_name = {(l.name, v.name): v for l in converted.layers for v in l.trainable_variables}
    mapping = {}
    for block, names in report.blocks.items():
        heads = [n for n in names[1:] if original.get_layer(n).trainable_variables]
        norm = original.get_layer(names[0])
        for v in norm.trainable_variables:
            mapping[id(v)] = by_name[(block, v.name)]
        for i, name in enumerate(heads):
            for v in original.get_layer(name).trainable_variables:
                mapping[id(v)] = by_name[(block, v.name + (f"_{i}" if i else ""))]
    for layer in original.layers:
        for v in layer.trainable_variables:
            if id(v) not in mapping:
                mapping[id(v)] = by_name[(layer.name, v.name)]
    return [mapping[id(v)] for v in original.trainable_variables]


def test_row_fields_match_independent_computations(tiny_run):
    data, md = tiny_run
    (row,) = data["rows"]
    assert row["model"] == "MobileNetV2" and row["input_size"] == SIZE
    original = _original()
    report = keras_blpa.memory_report(original, BATCHES[0], bits=4)
    converted = keras_blpa.convert(original, bits=4)
    # Blocks and the report's kept bytes.
    blocks = [l for l in converted.layers if isinstance(l, keras_blpa.ApproxConvBlock)]
    assert row["blocks"] == row["blocks_in_model"] == len(blocks) == len(report.blocks) > 0
    assert row["kept_before_mib"] == pytest.approx(report.before_bytes / MIB, abs=0.01)
    assert row["kept_after_mib"] == pytest.approx(report.after_bytes / MIB, abs=0.01)
    assert sum(g["bytes"] for g in row["unconverted"]) == report.float_after_bytes
    assert sum(g["layers"] for g in row["unconverted"]) == len(report.still_float)
    # The forward pass is exact.
    assert row["forward_max_abs_diff"]["inference"] <= 1e-6
    assert row["forward_max_abs_diff"]["training"] <= 1e-6
    # Gradient cosine at 4 bits, recomputed with a name-based variable map.
    x, y = applications.random_batch(4, SIZE)
    variables = original.trainable_variables
    matched = _variable_map(original, converted, report)

    def grads(model, vs):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out))
        return [g.numpy().ravel() for g in tape.gradient(loss, vs)]

    ref, got = np.concatenate(grads(original, variables)), np.concatenate(grads(converted, matched))
    want = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert row["grad_cosine"]["4"]["all"] == pytest.approx(want, abs=1e-4)
    assert 0.5 < row["grad_cosine"]["4"]["all"] < 1.0  # a 4-bit backward is not exact
    assert row["grad_cosine"]["4"]["min"] <= row["grad_cosine"]["4"]["all"]
    assert row["grad_cosine"]["8"]["all"] > row["grad_cosine"]["4"]["all"]
    # The slope from the two peaks, and the ratio from the slopes.
    for key in ("original", "converted"):
        p1, p2 = row["step_peak_mib"][key]
        r1, r2 = row["step_resident_mib"][key]
        assert row["slope_mib_per_sample"][key] == pytest.approx(
            ((p2 - r2) - (p1 - r1)) / (BATCHES[1] - BATCHES[0]), abs=0.01)
        assert row["raw_peak_slope_mib_per_sample"][key] == pytest.approx(
            (p2 - p1) / (BATCHES[1] - BATCHES[0]), abs=0.01)
        assert abs(r2 - r1) < 16  # nothing built between the two measurements
    s = row["slope_mib_per_sample"]
    # The ratio of the stored slopes; none where the converted peak did not grow (this
    # tiny row is gradient-bound, so its converted slope is near 0 and may read <= 0).
    line = next(l for l in md.splitlines() if l.startswith("| MobileNetV2 |"))
    if s["converted"] > 0:
        assert row["slope_ratio"] == pytest.approx(s["original"] / s["converted"], rel=1e-3)
        assert f"{row['slope_ratio']:.2f}x" in line
    else:
        assert row["slope_ratio"] is None and "| n/a" in line
    # Converting shrinks what one more sample costs (the report's saving per sample,
    # within the allocator's transient working set).
    saved_per_sample = report.saved_bytes / BATCHES[0] / MIB
    assert s["original"] - s["converted"] > 0.5 * saved_per_sample
    # Step time: the medians of the recorded steps.
    t = row["step_time_all_s"]
    assert len(t["original"]) == len(t["converted"]) == 3
    assert row["step_time_ratio"] == pytest.approx(
        np.median(t["converted"]) / np.median(t["original"]), rel=0.01)
    # The markdown table has the row with these figures.
    assert f"| {row['blocks']} |" in line and f"{row['step_time_ratio']:.2f}x" in line


def test_bad_flags():
    with pytest.raises(SystemExit):
        applications.parse_args(["--models", "NoSuchNet"])
    with pytest.raises(SystemExit):
        applications.parse_args(["--batch-sizes", "32,16"])


def test_slope():
    assert applications.slope((100.0, 180.0), (16, 32)) == 5.0
    assert applications.slope_ratio({"original": 5.0, "converted": 0.4}) == 12.5
    assert applications.slope_ratio({"original": 5.0, "converted": 0.0}) is None
    assert applications.slope_ratio({"original": 5.0, "converted": -0.001}) is None


def test_merge_lists_each_command_once():
    """A re-run of a model's command moves it last instead of adding a copy."""
    assert applications._merged(["a", "b"], "c") == ["a", "b", "c"]
    assert applications._merged(["a", "b", "c"], "a") == ["b", "c", "a"]
    assert applications._merged([], "a") == ["a"]
