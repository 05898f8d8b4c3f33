"""The example scripts: a few steps on tfds.testing.mock_data, the offline
Fashion-MNIST route on the real IDX files, --compare's measured step memory,
and clear errors for bad input."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_blpa import datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import train  # noqa: E402

DEBIAN_IDX = "/usr/share/datasets/fashion-mnist"
needs_debian_data = pytest.mark.skipif(
    datasets.find_idx_dir() is None,
    reason="no local Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
)
QUICK = ["--depth", "11", "--steps", "2", "--batch_size", "4", "--eval_take", "8", "--verbose", "0"]


def run_script(script, args, env=None, timeout=300):
    """Runs an example in a new process; `env` adds variables (None: removes one)."""
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script)] + args,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def result_lines(stdout, tag="RESULT"):
    rows = []
    for line in stdout.splitlines():
        if line.startswith(tag + " "):
            rows.append(dict(item.split("=", 1) for item in line.split()[1:]))
    return rows


@pytest.mark.parametrize(
    "script,extra",
    [
        ("cifar10", ["--mixed_precision", "mixed_bfloat16", "--accumulation_steps", "2"]),
        ("cifar100", ["--bits", "none", "--synchronized", "--strategy", "mirrored"]),
        ("fashion_mnist", ["--bits", "8"]),
        ("imagenet2012", ["--depth", "26", "--image_size", "32", "--bits", "2"]),
    ],
)
def test_example_runs_on_mock_data(script, extra, tmp_path, capsys):
    module = __import__(script)
    with tfds.testing.mock_data(num_examples=16):
        (result,) = module.main(QUICK + ["--data_dir", str(tmp_path)] + extra)
    assert result["dataset"] == script
    # 2 batches; with 2-step gradient accumulation, 1 optimizer update.
    assert result["optimizer_steps"] == (1 if "--accumulation_steps" in extra else 2)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored
    # Evaluated on exactly the --eval_take 8 test examples: a multiple of 1/8.
    assert result["test_accuracy"] * 8 == pytest.approx(round(result["test_accuracy"] * 8))
    assert result["time_per_sample_ms"] > 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT ")


def test_cifar_pipeline_augments_and_normalises():
    with tfds.testing.mock_data(num_examples=8):
        ds = datasets.make_dataset("cifar10", "train", 4, training=True)
        images, labels = next(iter(ds))
    assert images.shape == (4, 32, 32, 3) and images.dtype == "float32"
    assert labels.dtype == "int32"
    image = np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3) + 1
    shifted = datasets.cifar_augment(image).numpy()
    # A translation by at most 4 px (maybe flipped): some 24x24 window survives.
    found = False
    for flip in (shifted, shifted[:, ::-1]):
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                a = flip[max(0, dy):32 + min(0, dy), max(0, dx):32 + min(0, dx)]
                b = image[max(0, -dy):32 + min(0, -dy), max(0, -dx):32 + min(0, -dx)]
                found |= bool(np.array_equal(a, b))
    assert found


def test_ten_crops_at_scale_256():
    image = np.random.default_rng(0).integers(0, 255, (300, 400, 3)).astype(np.uint8)
    crops = datasets.ten_crops(image).numpy()
    assert crops.shape == (10, 224, 224, 3)
    np.testing.assert_allclose(crops[5:], crops[:5, :, ::-1])  # flipped copies


@needs_debian_data
def test_load_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    monkeypatch.delenv("KERAS_BLPA_IDX_DIRS", raising=False)
    assert datasets.fashion_mnist_source(str(tmp_path))[0] == "idx"
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(data_dir=str(tmp_path))
    assert x_train.shape == (60000, 28, 28, 1) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28, 1)
    # Fashion-MNIST is balanced: 6000 / 1000 images per class.
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10


@needs_debian_data
def test_fashion_mnist_example_on_real_files(tmp_path):
    proc = run_script(
        "fashion_mnist.py",
        ["--depth", "11", "--steps", "3", "--batch_size", "16", "--eval_take", "64",
         "--train_take", "512", "--verbose", "0", "--data_dir", str(tmp_path)],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = result_lines(proc.stdout)
    assert result["dataset"] == "fashion_mnist" and result["optimizer_steps"] == "3"


@needs_debian_data
def test_compare_runs_a_larger_4bit_batch_in_the_exact_step_memory(tmp_path):
    """--compare's last line: both step memories above resident and a 4-bit batch
    beyond the two measured ones, each figure a step the script ran and measured
    (its STEP_MEMORY lines); the script turns the allocator statistics on itself."""
    proc = run_script(
        "fashion_mnist.py",
        ["--compare", "--depth", "11", "--measure_depth", "20", "--steps", "3",
         "--batch_size", "32", "--train_take", "512", "--eval_take", "64", "--verbose", "0",
         "--data_dir", str(tmp_path)],
        env={"TF_CPU_ALLOCATOR_USE_BFC": None},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exact, approx = result_lines(proc.stdout)
    measured = result_lines(proc.stdout, "STEP_MEMORY")
    assert {r["depth"] for r in measured} == {"20"}
    step = {(r["bits"], int(r["batch"])): float(r["step_mib"]) for r in measured}
    # 4-bit codes are 1/8 of the float activations that exact keeps. Per sample
    # (the slope between the batches, free of batch-independent workspaces such
    # as the ~45 MiB of Eigen's convolution backward without oneDNN), ResNet-20
    # measured 2.9 vs 0.8 MiB with oneDNN and 2.0 vs 0.4 MiB without.
    for batch in (32, 64):
        assert 0 < step[("4", batch)] < step[("exact", batch)], step
    slope = {bits: (step[(bits, 64)] - step[(bits, 32)]) / 32 for bits in ("exact", "4")}
    assert 0 < 2 * slope["4"] < slope["exact"], slope
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("COMPARE ResNet-11 after 3 steps")
    assert (f"exact {float(exact['test_accuracy']):.4f}, 4-bit "
            f"{float(approx['test_accuracy']):.4f}") in last
    budget = step[("exact", 32)]
    batch = int(re.search(r"runs batch (\d+)", last).group(1))
    # Beyond the two measured batches (measured 2.9x-3.4x the training batch), run
    # and measured within exact's step memory at the training batch.
    assert batch > 64 and step[("4", batch)] <= budget, step
    assert f"in {step[('4', batch)]:.1f} MiB, measured, within exact's {budget:.1f} MiB" in last
    assert f"exact {budget:.1f} MiB" in last and f"4-bit {step[('4', 32)]:.1f} MiB" in last


def test_batch_within_returns_a_measured_batch_that_fits():
    """Against a fake convex memory curve: the first try overshoots, the next one
    interpolates and fits; what comes back was measured and fits."""
    def curve(batch):
        return 10.0 + 0.5 * batch + 0.002 * batch**2

    tried = []

    def measure(batch):
        tried.append(batch)
        return curve(batch)

    points = [(32, curve(32)), (64, curve(64))]
    batch, mib = train._batch_within(measure, points, budget_mib=300.0)
    assert len(tried) == 2 and tried[0] > tried[1] == batch > 64
    assert mib == curve(batch) <= 300.0 < curve(tried[0])
    # Every try overshoots: the largest measured batch that fits; none fits: None.
    assert train._batch_within(lambda b: 1e9, points, 300.0) == points[1]
    assert train._batch_within(measure, points, budget_mib=1.0) is None


def test_unknown_dataset():
    with pytest.raises(ValueError, match="'mnist'"):
        train.main(QUICK + ["--dataset", "mnist"])


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--steps", "0"),
                                        ("--epochs", "-1")])
def test_bad_counts_name_the_value(flag, value):
    with pytest.raises(ValueError, match=f"{flag[2:]}={value}"):
        train.main(["--dataset", "fashion_mnist", flag, value])


def test_bad_measure_depth_fails_before_training(monkeypatch):
    monkeypatch.setattr(train, "_train_once", None)  # never reached
    with pytest.raises(ValueError, match="depth=12"):
        train.main(["--dataset", "fashion_mnist", "--compare", "--measure_depth", "12"])


def test_missing_fashion_mnist_names_both_routes(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BLPA_IDX_DIRS", "")
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_fashion_mnist(data_dir=str(tmp_path / "empty"))
    message = str(info.value)
    assert "TFDS" in message and "IDX" in message and "dataset-fashion-mnist" in message


def test_missing_cifar_data_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--manual_dir"):
        datasets.make_dataset("cifar10", "test", 4, data_dir=str(tmp_path))


def test_cli_errors_write_no_checkpoint(tmp_path):
    checkpoints = tmp_path / "ckpt"
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        (["--strategy", "ring"], "'ring'"),
        (["--data_dir", str(tmp_path / "none")], "IDX"),
        (["--accumulation_steps", "0"], "accumulation_steps=0"),
    ]
    for args, expected in cases:
        proc = run_script(
            "fashion_mnist.py",
            QUICK + ["--checkpoint_dir", str(checkpoints)] + args,
            env={"KERAS_BLPA_IDX_DIRS": ""},
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "error:" in proc.stderr and expected in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not checkpoints.exists()
    proc = run_script("fashion_mnist.py", QUICK + ["--checkpoint_dir", str(a_file)])
    assert proc.returncode == 2 and "an existing file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "EPOCH_BEGIN" not in proc.stdout


@needs_debian_data
def test_truncated_idx_file_is_a_clear_error(tmp_path):
    """A cut-off IDX .gz (e.g. an interrupted copy) names the file, before training."""
    import shutil

    source = datasets.find_idx_dir()
    for name in os.listdir(source):
        shutil.copyfile(os.path.join(source, name), tmp_path / name)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:5000])
    proc = run_script("fashion_mnist.py", QUICK + ["--data_dir", str(tmp_path)])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "truncated or damaged" in proc.stderr and str(images) in proc.stderr
    assert "Traceback" not in proc.stderr and "EPOCH_BEGIN" not in proc.stdout


def test_batch_not_divisible_by_replicas(tmp_path, monkeypatch):
    class TwoReplicas:
        num_replicas_in_sync = 2

    monkeypatch.setattr(train.training, "make_strategy", lambda name: TwoReplicas())
    with pytest.raises(ValueError, match="divisible by the 2 replicas"):
        train.main(["--dataset", "fashion_mnist", "--depth", "11", "--batch_size", "5",
                    "--checkpoint_dir", str(tmp_path / "ckpt")])
    assert not (tmp_path / "ckpt").exists()
