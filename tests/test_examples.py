"""The example scripts: a few steps on tfds.testing.mock_data, the offline
Fashion-MNIST route on the real IDX files, and clear errors for bad input."""

import os
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
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, script)] + args,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


def result_lines(stdout):
    rows = []
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
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


def test_unknown_dataset():
    with pytest.raises(ValueError, match="'mnist'"):
        train.main(QUICK + ["--dataset", "mnist"])


@pytest.mark.parametrize("flag,value", [("--batch_size", "0"), ("--steps", "0"),
                                        ("--epochs", "-1")])
def test_bad_counts_name_the_value(flag, value):
    with pytest.raises(ValueError, match=f"{flag[2:]}={value}"):
        train.main(["--dataset", "fashion_mnist", flag, value])


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
    cases = [
        (["--strategy", "ring"], "'ring'"),
        (["--data_dir", str(tmp_path / "none")], "IDX"),
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


def test_batch_not_divisible_by_replicas(tmp_path, monkeypatch):
    class TwoReplicas:
        num_replicas_in_sync = 2

    monkeypatch.setattr(train.training, "make_strategy", lambda name: TwoReplicas())
    with pytest.raises(ValueError, match="divisible by the 2 replicas"):
        train.main(["--dataset", "fashion_mnist", "--depth", "11", "--batch_size", "5",
                    "--checkpoint_dir", str(tmp_path / "ckpt")])
    assert not (tmp_path / "ckpt").exists()
