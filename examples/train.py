"""Trains a keras_blpa ResNet on a TFDS dataset: the one training loop of the examples.

Reproduces the paper's setups (Chakrabarti & Moseley, NeurIPS 2019):
CIFAR-10/100 with a pre-activation bottleneck ResNet-164, batch 128, 64k steps,
SGD momentum 0.9, weight decay 2e-4, lr 0.1 (0.01 for 400 warm-up steps, /10
at 50% and 75%); ImageNet with a ResNet-152-style network and 10-crop
evaluation at scale 256. `cifar10.py`, `cifar100.py`, `imagenet2012.py` and
`fashion_mnist.py` are thin wrappers that fix --dataset.

    python examples/train.py --dataset cifar10 --bits 4 --strategy mirrored
    python examples/fashion_mnist.py --compare

The last line printed is ``RESULT dataset=... bits=... test_accuracy=...
time_per_sample_ms=... peak_memory_mib=...``; with --compare one such line
for the exact (stock Keras) model and one for the K-bit model.
"""

import argparse
import json
import math
import os
import sys
import time

import keras
import tensorflow as tf

try:
    import keras_blpa
except ImportError:  # Running from a checkout without `pip install -e .`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_blpa
from keras_blpa import datasets
from keras_blpa import models
from keras_blpa import training
from keras_blpa import validation

# Per-dataset defaults. fashion_mnist is the README's short main job (about
# 80% test accuracy in 200 steps here; pass --steps N for a longer run).
DEFAULTS = {
    "cifar10": dict(depth=164, batch_size=128, steps=64000, lr=0.1, bn_momentum=0.99,
                    train_examples=50000),
    "cifar100": dict(depth=164, batch_size=128, steps=64000, lr=0.1, bn_momentum=0.99,
                     train_examples=50000),
    "fashion_mnist": dict(depth=11, batch_size=128, steps=200, lr=0.1, bn_momentum=0.9,
                          train_examples=60000),
    "imagenet2012": dict(depth=152, batch_size=256, steps=600000, lr=0.1, bn_momentum=0.99,
                         train_examples=1281167),
}
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def _parse_bits(text):
    if text.lower() in ("none", "exact", "32"):
        return None
    try:
        return validation.check_bits(int(text), allow_none=False)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser(dataset=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    if dataset is None:
        parser.add_argument("--dataset", required=True, help=f"one of {tuple(datasets.DATASETS)}")
    parser.add_argument("--depth", type=int, help="9n+2 (CIFAR stem) or 152 (ImageNet)")
    parser.add_argument("--bits", type=_parse_bits, default=4, help="2, 4, 8 or none (exact, stock layers)")
    parser.add_argument("--width", type=int, default=1, help="channel multiplier")
    parser.add_argument("--quantization", default="blpa", choices=("blpa", "naive"))
    parser.add_argument("--batch_size", type=int, help="global batch size")
    parser.add_argument("--steps", type=int, help="total training steps (overrides --epochs)")
    parser.add_argument("--epochs", type=int, help="training epochs")
    parser.add_argument("--steps_per_epoch", type=int, help="default: one pass over the training set")
    parser.add_argument("--lr", type=float, help="base learning rate")
    parser.add_argument("--warmup_steps", type=int,
                        help="steps at lr/10 (default: 400, at most 10%% of the steps)")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=2e-4)
    parser.add_argument("--bn_momentum", type=float,
                        help="BN moving-statistics momentum (default 0.99; 0.9 for fashion_mnist's short run)")
    parser.add_argument("--accumulation_steps", type=int, default=1,
                        help="batches per optimizer update (gradient accumulation)")
    parser.add_argument("--strategy", default="none",
                        help=f"one of {training.STRATEGIES} (multiworker reads TF_CONFIG)")
    parser.add_argument("--synchronized", action="store_true", help="cross-replica batch norm")
    parser.add_argument("--data_dir", help="TFDS data dir; for fashion_mnist also searched for IDX files")
    parser.add_argument("--manual_dir", help="TFDS manual dir with the original archives")
    parser.add_argument("--download", action="store_true", help="let TFDS download the data")
    parser.add_argument("--mixed_precision", default="float32", choices=PRECISIONS)
    parser.add_argument("--checkpoint_dir", help="keras.callbacks.BackupAndRestore dir: resume after a kill")
    parser.add_argument("--image_size", type=int, default=224, help="ImageNet crop size")
    parser.add_argument("--train_take", type=int, help="use only the first N training examples")
    parser.add_argument("--eval_take", type=int, help="evaluate on the first N test examples")
    parser.add_argument("--compare", action="store_true",
                        help="train the exact (stock) model, then the --bits model, and compare")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=1, help="Keras fit verbosity (1: progress bar)")
    return parser


class _EpochLog(keras.callbacks.Callback):
    """Prints EPOCH_BEGIN / EPOCH_DONE markers (runs after BackupAndRestore)."""

    def on_epoch_begin(self, epoch, logs=None):
        print(f"EPOCH_BEGIN {epoch + 1}", flush=True)

    def on_epoch_end(self, epoch, logs=None):
        print(f"EPOCH_DONE {epoch + 1}", flush=True)


def _resolve(args, dataset):
    """Validates the flags before anything is written; returns the run settings."""
    spec = datasets.check_dataset(dataset)
    defaults = DEFAULTS[dataset]
    depth = args.depth or defaults["depth"]
    batch_size = validation.check_int(
        args.batch_size if args.batch_size is not None else defaults["batch_size"],
        "batch_size",
    )
    strategy = training.make_strategy(args.strategy)
    training.check_batch_size(batch_size, strategy)
    input_shape = spec["input_shape"]
    stem = "cifar"
    if dataset == "imagenet2012":
        stem = "imagenet"
        input_shape = (args.image_size, args.image_size, 3)
    examples = args.train_take or defaults["train_examples"]
    steps_per_epoch = args.steps_per_epoch or max(1, examples // batch_size)
    validation.check_int(steps_per_epoch, "steps_per_epoch")
    if args.epochs is not None and args.steps is None:
        epochs = validation.check_int(args.epochs, "epochs")
    else:
        # Total steps, split into whole epochs of at most one pass each (the
        # total is rounded up to a multiple of the epoch count).
        total = args.steps if args.steps is not None else defaults["steps"]
        validation.check_int(total, "steps")
        epochs = max(1, math.ceil(total / steps_per_epoch))
        steps_per_epoch = math.ceil(total / epochs)
    return dict(
        spec=spec,
        depth=depth,
        batch_size=batch_size,
        strategy=strategy,
        input_shape=input_shape,
        stem=stem,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        lr=args.lr or defaults["lr"],
        bn_momentum=(
            args.bn_momentum if args.bn_momentum is not None else defaults["bn_momentum"]
        ),
    )


def _train_once(args, dataset, run, bits, checkpoint_dir):
    """Builds, trains and evaluates one model; returns its result dict."""
    keras.utils.set_random_seed(args.seed)
    strategy = run["strategy"]
    batch_size = run["batch_size"]
    train_ds = datasets.make_dataset(
        dataset,
        "train",
        batch_size,
        training=True,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        download=args.download,
        image_size=args.image_size,
        take=args.train_take,
        seed=args.seed,
        shuffle_buffer=min(10000, args.train_take or 10000),
    )
    ten_crop = dataset == "imagenet2012"
    test_ds = datasets.make_dataset(
        dataset,
        datasets.TEST_SPLITS[dataset],
        batch_size,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        download=args.download,
        image_size=args.image_size,
        ten_crop=ten_crop,
        take=args.eval_take,
    )
    total_steps = run["epochs"] * run["steps_per_epoch"]
    updates = max(1, total_steps // args.accumulation_steps)
    with strategy.scope():
        model = models.resnet(
            run["depth"],
            run["spec"]["num_classes"],
            run["input_shape"],
            bits=bits,
            width=args.width,
            stem=run["stem"],
            quantization=args.quantization,
            weight_decay=args.weight_decay,
            synchronized=args.synchronized,
            bn_momentum=run["bn_momentum"],
        )
        optimizer = training.make_optimizer(
            run["lr"],
            total_steps=updates,
            warmup_steps=(
                args.warmup_steps
                if args.warmup_steps is not None
                else min(400, updates // 10)
            ),
            momentum=args.momentum,
            accumulation_steps=args.accumulation_steps,
        )
        model.compile(
            optimizer=optimizer,
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    callbacks = []
    if checkpoint_dir:
        # Saves weights, optimizer state and the epoch at each epoch end; a
        # restarted run resumes there and the backup is deleted at the end.
        # double_checkpoint keeps the previous backup, used if a kill leaves
        # the latest one half-written.
        callbacks.append(
            keras.callbacks.BackupAndRestore(checkpoint_dir, double_checkpoint=True)
        )
    callbacks.append(_EpochLog())
    # Fails with the reason (never a silent nan) if the allocator keeps no statistics.
    with keras_blpa.memory.PeakMemory() as peak:
        start = time.perf_counter()
        history = model.fit(
            train_ds,
            epochs=run["epochs"],
            steps_per_epoch=run["steps_per_epoch"],
            callbacks=callbacks,
            verbose=args.verbose,
            shuffle=False,  # the pipeline shuffles
        )
        seconds = time.perf_counter() - start
    steps_run = len(history.epoch) * run["steps_per_epoch"]
    if ten_crop:
        accuracy = datasets.ten_crop_accuracy(model, test_ds)
    else:
        accuracy = model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"]
    result = dict(
        dataset=dataset,
        bits="exact" if bits is None else bits,
        depth=run["depth"],
        params=model.count_params(),
        test_accuracy=round(float(accuracy), 4),
        time_per_sample_ms=round(
            1000 * seconds / max(1, steps_run * run["batch_size"]), 3
        ),
        peak_memory_mib=round(peak.peak_mib, 1),
        memory_device=peak.device,
        optimizer_steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        replicas=strategy.num_replicas_in_sync,
    )
    print(
        "RESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True
    )
    return result, model


def main(argv=None, dataset=None):
    """Parses flags, validates them (before writing anything), trains, prints results."""
    args = build_parser(dataset).parse_args(argv)
    dataset = dataset or args.dataset
    run = _resolve(args, dataset)
    # Fail early (and write nothing) when no data route exists.
    if dataset == "fashion_mnist":
        datasets.fashion_mnist_source(args.data_dir, args.download)
    checkpoint_dir = args.checkpoint_dir
    if checkpoint_dir and args.strategy == "multiworker":
        # One backup per worker (each deletes its own at the end).
        task = json.loads(os.environ["TF_CONFIG"])["task"]
        checkpoint_dir = os.path.join(checkpoint_dir, f"{task['type']}_{task['index']}")
    previous_policy = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(args.mixed_precision)
    results = []
    try:
        variants = [None, args.bits] if args.compare else [args.bits]
        if args.compare and args.bits is None:
            raise ValueError("--compare needs --bits 2, 4 or 8 (it adds the exact run).")
        for bits in variants:
            sub = checkpoint_dir
            if checkpoint_dir and args.compare:
                sub = os.path.join(checkpoint_dir, "exact" if bits is None else f"{bits}bit")
            keras.backend.clear_session()
            result, _ = _train_once(args, dataset, run, bits, sub)
            results.append(result)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
    if args.compare:
        exact, approx = results
        print(
            f"COMPARE exact: accuracy {exact['test_accuracy']:.4f}, peak "
            f"{exact['peak_memory_mib']:.1f} MiB | {approx['bits']}-bit: accuracy "
            f"{approx['test_accuracy']:.4f}, peak {approx['peak_memory_mib']:.1f} MiB",
            flush=True,
        )
    return results


def cli(dataset=None):
    """Command-line entry: bad flags or missing data exit with status 2 and one line."""
    try:
        main(dataset=dataset)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
