"""The benchmark CLI: a reduced quick run (every part), its output schema, and the
claims it exists to check (4-bit peak well below the stock-Keras peak, trained
models well above chance); the kernel benchmark on a small activation; the
families study's nets and a tiny run of it."""

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from keras_blpa import ApproxConvBlock
from keras_blpa.backends.tensorflow import native
from keras_blpa.codes import packed_size
from keras_blpa.benchmark import __main__ as cli
from keras_blpa.benchmark import compounding
from keras_blpa.benchmark import families
from keras_blpa.benchmark import kernels
from keras_blpa.benchmark import max_batch
from keras_blpa.benchmark import report
from keras_blpa.benchmark.cli import comma_list

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick mode restricted to what CI can afford on 2 cores (about 4 minutes)."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, "-m", "keras_blpa.benchmark", "--quick", "--out", str(out),
        "--depths", "29", "--modes", "exact,recompute,blpa4", "--memory-batches", "8,32",
        "--max-batch-depths", "11", "--max-batch-modes", "blpa4", "--budget-mib", "128",
        "--max-batch-tol", "0.1",
        "--timing-steps", "2",
        "--acc-modes", "exact,blpa4", "--acc-seeds", "0", "--acc-train-samples", "256",
    ]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        return out, json.load(f)


@pytest.mark.slow
def test_quick_run_schema(quick_run):
    out, results = quick_run
    assert results["schema_version"] == report.SCHEMA_VERSION
    for key in ("machine", "tensorflow", "keras", "native_ops", "command"):
        assert key in results["meta"]
    assert set(report.PARTS) <= set(results)
    for row in results["memory"]:
        assert {"mode", "depth", "width", "batch", "peak_mib", "resident_mib",
                "step_mib", "params"} <= set(row)
        assert row["peak_mib"] > 0
    assert {(r["mode"], r["batch"]) for r in results["memory"]} == {
        (m, b) for m in ("exact", "recompute", "blpa4") for b in (8, 16, 32)
    }
    for row in results["timing"]:
        assert {"mode", "depth", "batch", "ms_per_sample", "ms_per_sample_all"} <= set(row)
        assert row["ms_per_sample"] > 0
    [mb] = results["max_batch"]
    assert {"mode", "depth", "budget_mib", "max_batch", "trials"} <= set(mb)
    assert mb["max_batch"] >= 1
    fits = [t["batch"] for t in mb["trials"] if t["ok"]]
    assert mb["max_batch"] == max(fits)
    assert all(t["batch"] > mb["max_batch"] for t in mb["trials"] if not t["ok"])
    assert all(t["peak_mib"] <= mb["budget_mib"] for t in mb["trials"] if t["ok"])
    assert {r["mode"] for r in results["accuracy"]} == {"exact", "blpa4"}
    for row in results["accuracy"]:
        assert row["train_samples"] == 256 and row["test_samples"] == 10000
        assert row["mean"] == round(statistics.mean(row["test_error"]), 2)
        # A model at chance errs on 90% of the 10000 balanced test images, +-0.3%
        # (binomial std); trained ones must be well below (measured: about 76%).
        assert row["mean"] < 90.0 - 3 * 100 * math.sqrt(0.9 * 0.1 / 10000), row
    for name in ("results.md", "memory_vs_batch.png", "max_batch_vs_depth.png"):
        assert (out / name).stat().st_size > 0
    assert "| blpa4" in (out / "results.md").read_text()


@pytest.mark.slow
def test_quick_run_4bit_peak_below_exact(quick_run):
    _, results = quick_run
    step = {(r["mode"], r["batch"]): r["step_mib"] for r in results["memory"]}
    # Memory per sample: the slope of the step's peak between batches 8 and 32.
    # It is what the codes save (4-bit: 1/8 of each float activation, plus the
    # per-sample transients), free of batch-independent workspaces such as the
    # ~45 MiB that TensorFlow's Eigen convolution backward keeps without oneDNN
    # (AVX2-only CPUs). Without oneDNN the executor's scheduling moves each peak by
    # up to ~15 MiB between runs, so a span of 8 samples (exact: ~37 MiB) cannot
    # order the modes: recompute's slope measured above exact's once. Over 24
    # samples (3 runs each configuration): exact 85-118 MiB, recompute 50-63 MiB,
    # 4-bit 10-27 MiB. tests/test_memory.py asserts the 4x claim at 30 blocks.
    exact = step[("exact", 32)] - step[("exact", 8)]
    approx = step[("blpa4", 32)] - step[("blpa4", 8)]
    assert approx > 0 and exact >= 2 * approx, step
    for batch in (8, 16, 32):
        assert step[("blpa4", batch)] < step[("exact", batch)], step
    # tf.recompute_grad keeps only the unit inputs: a smaller slope than exact
    # (measured 0.43-0.74x at depth 29).
    recompute = step[("recompute", 32)] - step[("recompute", 8)]
    assert 0 < recompute < exact, step


def test_search_brackets_the_largest_batch(monkeypatch):
    """Against a fake affine memory model: the search returns the true largest batch."""
    calls = []

    def fake_trial(mode, depth, batch, budget_mib, *args, **kwargs):
        calls.append(batch)
        peak = 20.0 + 3.0 * batch
        if peak > budget_mib:
            return {"ok": False, "oom": True, "batch": batch, "wall_s": 0}
        return {"ok": True, "batch": batch, "peak_mib": peak, "ms_per_sample": 1.0,
                "wall_s": 0}

    monkeypatch.setattr(max_batch, "run_trial", fake_trial)
    row = max_batch.search("exact", 11, 1000, points=[(8, 44.0), (16, 68.0)],
                           rel_tol=0.0, max_trials=12, log=lambda m: None)
    assert row["max_batch"] == (1000 - 20) // 3
    assert len(calls) <= 4, calls  # the affine estimate makes the search short
    # From probes alone (no known points).
    calls.clear()
    row = max_batch.search("exact", 11, 1000, rel_tol=0.0, max_trials=12,
                           log=lambda m: None)
    assert row["max_batch"] == (1000 - 20) // 3


def test_bad_flags():
    with pytest.raises(ValueError, match="mode='fp16'"):
        cli.resolve(cli.build_parser().parse_args(["--modes", "exact,fp16"]))
    with pytest.raises(ValueError, match="part='speed'"):
        cli.resolve(cli.build_parser().parse_args(["--parts", "speed"]))
    with pytest.raises(ValueError, match="batch=0"):
        cli.resolve(cli.build_parser().parse_args(["--batch", "0"]))
    with pytest.raises(ValueError, match="depth='164y'"):
        cli.parse_depths("164y")
    assert cli.parse_depths("164,1001x4") == [(164, 1), (1001, 4)]


def test_kernel_benchmark_times_correct_kernels(tmp_path):
    """Every timed path decodes to ReLU(BN(x)) within half a bin, and the byte
    accounting uses the packed size of the code."""
    out = tmp_path / "kernels.json"
    result = kernels.main(["--shape", "2,8,8,5", "--reps", "1", "--block-reps", "1",
                           "--blocks", "1", "--activations", "relu,silu", "--output", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    paths = {"reference"} | ({"native"} if native.load() is not None else set())
    rows = {(r["path"], r["bits"]): r for r in result["kernels"]}
    assert set(rows) == {(p, b) for p in paths for b in (2, 4, 8)}
    n = 2 * 8 * 8 * 5
    for (path, bits), r in rows.items():
        assert r["elements"] == n
        assert r["packed_bytes"] == packed_size(n, bits) == math.ceil(n * bits / 8)
        # Bin centres: at most half a bin (plus float rounding) from the exact value.
        assert r["max_error_steps"] <= 0.5 + 1e-3, (path, bits, r["max_error_steps"])
        assert r["encode_ms"] > 0 and r["decode_ms"] > 0
        # encode reads x, writes relu(y) and the codes; decode reads codes, writes 4n.
        traffic = 3 * 4 * n + 2 * r["packed_bytes"]
        assert r["enc_dec_gb_s"] == pytest.approx(
            traffic / (r["encode_ms"] + r["decode_ms"]) / 1e6)
    assert [b["activation"] for b in result["block_step"]] == ["relu", "silu"]
    for block in result["block_step"]:
        assert {"stock", "blpa4_reference"} | {"blpa4_native" for p in paths if p == "native"} == set(block["step_ms"])
        assert set(block["peak_mib"]) == set(block["step_ms"]) and min(block["peak_mib"].values()) > 0
    with pytest.raises(SystemExit):
        kernels.main(["--shape", "2,8,8"])


def test_main_runs_the_requested_parts_in_order(monkeypatch, tmp_path):
    """main runs each requested part of the registry once, in registry order,
    and --resume keeps what an earlier run wrote."""
    assert set(cli.PARTS) == set(report.PARTS)
    calls = []
    row = {"mode": "exact", "depth": 11, "width": 1, "batch": 16, "peak_mib": 10.0,
           "resident_mib": 1.0, "step_mib": 9.0, "params": 1}

    def fake(part):
        def run(session, cfg):
            calls.append(part)
            if part == "memory" and not session.have("memory", **row):
                session.add("memory", [row])
        return run

    for part in cli.PARTS:
        monkeypatch.setitem(cli.PARTS, part, fake(part))
    out = str(tmp_path)
    assert cli.main(["--quick", "--out", out, "--parts", "accuracy,memory"]) == 0
    assert calls == ["memory", "accuracy"]
    assert report.load_json(out)["memory"] == [row]
    cli.main(["--quick", "--out", out, "--parts", "memory", "--resume"])
    results = report.load_json(out)
    assert results["memory"] == [row] and len(results["meta"]["commands"]) == 2
    cli.main(["--quick", "--out", out, "--parts", "timing"])
    assert report.load_json(out)["memory"] == [] and calls[-1] == "timing"


# Blocks each family is written to give convert (its BN -> activation -> conv
# chains); others may join them as convert learns more patterns.
_FAMILY_BLOCKS = {
    "mobilenetv2": ["expanded_conv_depthwise", "expanded_conv_project"]
    + [f"block_{i}_{head}" for i in range(1, 5) for head in ("depthwise", "project")],
    "efficientnet": [f"block{i}a_dwconv" for i in range(1, 6)],
    "convnext": [f"stage_{s}_block_{b}_pointwise_conv_2" for s in (0, 1) for b in (0, 1)],
}


@pytest.mark.parametrize("family", families.FAMILIES)
def test_family_converts_with_the_stock_forward(family):
    """Each mode's model starts from the stock net's weights: the converted nets
    hold the ApproxConvBlocks the report names and compute the stock outputs
    (blpa: in training too; naive quantises its training forward)."""
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype("float32")
    stock = families.build_mode(family, "exact", width=8, seed=3)
    # Inference first: a training call moves the BN moving statistics.
    inference, training = stock(x, training=False), stock(x, training=True)
    count, blocks = families.conversion_count(family, width=8)
    assert set(_FAMILY_BLOCKS[family]) <= set(blocks), sorted(blocks)
    for mode in ("blpa8", "blpa4", "naive4"):
        model, names = families.build_mode(family, mode, width=8, seed=3, return_report=True)
        converted = [layer.name for layer in model.layers if isinstance(layer, ApproxConvBlock)]
        assert sorted(converted) == sorted(names) == sorted(blocks) and len(names) == count
        np.testing.assert_array_equal(model(x, training=False), inference)
        if mode.startswith("blpa"):
            np.testing.assert_array_equal(model(x, training=True), training)


@pytest.mark.slow
def test_families_tiny_run(tmp_path):
    """One epoch of two steps per family and mode: finite figures in every row,
    and the table and plot the part writes (about 90 s on 2 cores: each of the
    9 models traces its train, test and recalibration functions)."""
    modes = ["exact", "blpa4", "naive4"]
    rows = families.study(list(families.FAMILIES), modes, [0], epochs=1, batch_size=64,
                          train_samples=128, test_samples=100, width=8, log=lambda m: None)
    assert [(r["family"], r["mode"]) for r in rows] == [
        (f, m) for f in families.FAMILIES for m in modes]
    for r in rows:
        assert r["blocks_converted"] == families.conversion_count(r["family"], width=8)[0] > 0
        assert r["train_samples"] == 128 and r["test_samples"] == 100
        assert 0 <= r["mean"] <= 100 and r["std"] == 0.0
        assert all(math.isfinite(v) and v > 0 for v in r["train_loss"] + [r["epoch_s"]])
    results = {"meta": {}, "config": {}, "families": rows}
    report.write(results, str(tmp_path))
    md = (tmp_path / "results.md").read_text()
    for f in families.FAMILIES:
        assert f"| {f} | - | exact |" in md and f"| {f} | " in md
    assert md.count(" | blpa4 | ") == len(families.FAMILIES)
    assert (tmp_path / "families.png").stat().st_size > 0


def test_families_flags():
    args = cli.build_parser().parse_args(["--parts", "families", "--fam-modes", "exact,recompute"])
    with pytest.raises(ValueError, match="mode='recompute'"):
        cli.resolve(args)
    args = cli.build_parser().parse_args(["--parts", "families", "--fam-families", "vgg"])
    with pytest.raises(ValueError, match="family='vgg'"):
        cli.resolve(args)
    cfg = cli.resolve(cli.build_parser().parse_args(["--parts", "families", "--fam-width", "8"]))
    assert cfg["fam_families"] == list(families.FAMILIES) and cfg["fam_width"] == 8


def test_compounding_relu_holds_and_silu_drifts(tmp_path):
    """The paper's claim and its limit, on a 16-unit chain at 4 bits: with ReLU
    (exact mask) the kernel gradients stay as close to stock far from the loss as
    near it; with silu (derivative read from the bin) they drift and shrink. The
    exact chain (bits=None) matches stock; the CLI writes its files."""
    exact = compounding.measure("relu", None, 4, batch=8, channels=8, size=6)
    assert [r["from_loss"] for r in exact] == [1, 2, 3, 4]
    assert all(r["cosine"] > 0.99999 and abs(r["norm_ratio"] - 1) < 1e-4 for r in exact)
    def deepest(act):  # mean cosine and norm ratio of the 4 convs farthest from the loss
        rows = compounding.measure(act, 4, 16, batch=16, channels=16, size=6)[-4:]
        return np.mean([r["cosine"] for r in rows]), np.mean([r["norm_ratio"] for r in rows])

    (relu_cos, relu_norm), (silu_cos, silu_norm) = deepest("relu"), deepest("silu")
    assert relu_cos > 0.98 and abs(relu_norm - 1) < 0.05, (relu_cos, relu_norm)  # 0.987, 1.01
    assert silu_cos < relu_cos - 0.01 and silu_norm < 0.93, (silu_cos, silu_norm)  # 0.963, 0.875
    out = tmp_path / "out"
    assert compounding.main(["--activations", "relu,gelu", "--bits", "4", "--depth", "2",
                             "--seeds", "0", "--batch", "4", "--channels", "4", "--size", "4",
                             "--out", str(out)]) == 0
    data = json.loads((out / "compounding.json").read_text())
    assert {(r["activation"], r["from_loss"]) for r in data["summary"]} == {
        (a, d) for a in ("relu", "gelu") for d in (1, 2)}
    assert "| 4 | gelu |" in (out / "compounding.md").read_text()
    assert (out / "compounding.png").stat().st_size > 0
    with pytest.raises(SystemExit):
        compounding.main(["--activations", "tanh", "--out", str(out)])


def test_comma_lists_parse_and_name_a_bad_value(capsys):
    """Every benchmark's list options: blanks dropped, each item cast; a bad item
    stops argparse with the option and the whole value named."""
    assert comma_list(int)(" 8, 16,,") == [8, 16]
    assert comma_list()("exact, blpa4") == ["exact", "blpa4"]
    with pytest.raises(SystemExit):
        compounding.main(["--seeds", "0,x", "--out", "unused"])
    assert "argument --seeds: invalid comma-separated int list value: '0,x'" in capsys.readouterr().err
