"""Trains a keras_blpa ResNet on a TFDS dataset: the one training loop of the examples.

Reproduces the paper's setups (Chakrabarti & Moseley, NeurIPS 2019):
CIFAR-10/100 with a pre-activation bottleneck ResNet-164, batch 128, 64k steps,
SGD momentum 0.9, weight decay 2e-4, lr 0.1 (0.01 for 400 warm-up steps, /10
at 50% and 75%); ImageNet with a ResNet-152-style network and 10-crop
evaluation at scale 256. `cifar10.py`, `cifar100.py`, `imagenet2012.py` and
`fashion_mnist.py` are thin wrappers that fix --dataset.

    python examples/train.py --dataset cifar10 --bits 4 --strategy mirrored
    python examples/fashion_mnist.py --compare

Each model trained prints ``RESULT dataset=... bits=... test_accuracy=...
time_per_sample_ms=... peak_memory_mib=...`` (the allocator's peak over the
whole ``fit``, input pipeline included); without --compare it is the last line.
--compare trains the exact (stock Keras) and the K-bit model, then measures one
training step's memory above what is resident on a fresh exact and K-bit ResNet
of --measure_depth (a ``STEP_MEMORY`` line per measured step): at the training
batch and twice it, then at the K-bit batch where the line through those two
points reaches 90% of the exact step's memory at the training batch (up to three
tries, interpolating after an overshoot). Its last line, ``COMPARE ...``, gives
both test accuracies, both step memories with their per-sample slope and fixed
part, and the largest K-bit batch measured within the exact step's memory.
"""

import argparse
import json
import math
import os
import sys
import time

import keras

try:
    import keras_blpa
except ImportError:  # Running from a checkout without `pip install -e .`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import keras_blpa
from keras_blpa import datasets
from keras_blpa import models
from keras_blpa import training
from keras_blpa import validation

# The allocator keeps statistics on every CPU only if this runs before
# TensorFlow's first op (PeakMemory raises with the reason otherwise).
keras_blpa.memory.enable_cpu_statistics()

# Per-dataset defaults. fashion_mnist is the README's short main job (about
# 80% test accuracy in 200 steps here; pass --steps N for a longer run); its
# --compare measures the step memory on a ResNet-56, where the saving shows
# (it grows with depth) and the measurement still takes about a minute.
DEFAULTS = {
    "cifar10": dict(depth=164, batch_size=128, steps=64000, lr=0.1, bn_momentum=0.99,
                    train_examples=50000),
    "cifar100": dict(depth=164, batch_size=128, steps=64000, lr=0.1, bn_momentum=0.99,
                     train_examples=50000),
    "fashion_mnist": dict(depth=11, batch_size=128, steps=200, lr=0.1, bn_momentum=0.9,
                          train_examples=60000, measure_depth=56),
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
    parser.add_argument("--measure_depth", type=int,
                        help="depth of the nets whose step memory --compare measures "
                             "(default: 56 for fashion_mnist, else --depth)")
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
    measure_depth = args.measure_depth or defaults.get("measure_depth", depth)
    models.stage_plan(measure_depth, stem)  # raises for an invalid depth
    validation.check_int(args.accumulation_steps, "accumulation_steps")
    if args.checkpoint_dir and os.path.exists(args.checkpoint_dir) and not os.path.isdir(
        args.checkpoint_dir
    ):
        raise ValueError(
            "Expected --checkpoint_dir to be a directory (it is created if missing). "
            f"Received: checkpoint_dir={args.checkpoint_dir!r}, an existing file"
        )
    return dict(
        spec=spec,
        depth=depth,
        measure_depth=measure_depth,
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


def _train_data(args, dataset, batch_size):
    """The shuffled, augmented, repeated training pipeline."""
    return datasets.make_dataset(
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


def _test_data(args, dataset, batch_size):
    """The test pipeline (ImageNet: 10 crops per image)."""
    return datasets.make_dataset(
        dataset,
        datasets.TEST_SPLITS[dataset],
        batch_size,
        data_dir=args.data_dir,
        manual_dir=args.manual_dir,
        download=args.download,
        image_size=args.image_size,
        ten_crop=dataset == "imagenet2012",
        take=args.eval_take,
    )


def _optimizer(args, run):
    """SGD on the paper's schedule, counted in optimizer updates."""
    total_steps = run["epochs"] * run["steps_per_epoch"]
    updates = max(1, total_steps // args.accumulation_steps)
    return training.make_optimizer(
        run["lr"],
        total_steps=updates,
        warmup_steps=(
            args.warmup_steps if args.warmup_steps is not None else min(400, updates // 10)
        ),
        momentum=args.momentum,
        accumulation_steps=args.accumulation_steps,
    )


def _compiled_model(args, run, bits, depth):
    """The run's ResNet at `depth` (bits=None: stock layers), compiled in its strategy's scope."""
    with run["strategy"].scope():
        model = models.resnet(
            depth,
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
        model.compile(
            optimizer=_optimizer(args, run),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
    return model


def _callbacks(checkpoint_dir):
    """BackupAndRestore (with a checkpoint dir), then the epoch markers."""
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
    return callbacks


def _fit(args, run, model, train_ds, checkpoint_dir):
    """Trains; returns the steps run, the seconds taken and the allocator's PeakMemory."""
    # Fails with the reason (never a silent nan) if the allocator keeps no statistics.
    with keras_blpa.memory.PeakMemory() as peak:
        start = time.perf_counter()
        history = model.fit(
            train_ds,
            epochs=run["epochs"],
            steps_per_epoch=run["steps_per_epoch"],
            callbacks=_callbacks(checkpoint_dir),
            verbose=args.verbose,
            shuffle=False,  # the pipeline shuffles
        )
        seconds = time.perf_counter() - start
    return len(history.epoch) * run["steps_per_epoch"], seconds, peak


def _test_accuracy(model, test_ds, dataset):
    """Top-1 test accuracy (ImageNet: averaged over the 10 crops)."""
    if dataset == "imagenet2012":
        return datasets.ten_crop_accuracy(model, test_ds)
    return model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"]


def _bits_label(bits):
    return "exact" if bits is None else bits


def _train_once(args, dataset, run, bits, checkpoint_dir):
    """Builds, trains and evaluates one model; prints and returns its RESULT dict."""
    keras.utils.set_random_seed(args.seed)
    train_ds = _train_data(args, dataset, run["batch_size"])
    test_ds = _test_data(args, dataset, run["batch_size"])
    model = _compiled_model(args, run, bits, run["depth"])
    steps_run, seconds, peak = _fit(args, run, model, train_ds, checkpoint_dir)
    result = dict(
        dataset=dataset,
        bits=_bits_label(bits),
        depth=run["depth"],
        params=model.count_params(),
        test_accuracy=round(float(_test_accuracy(model, test_ds, dataset)), 4),
        time_per_sample_ms=round(1000 * seconds / max(1, steps_run * run["batch_size"]), 3),
        peak_memory_mib=round(peak.peak_mib, 1),
        memory_device=peak.device,
        optimizer_steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        replicas=run["strategy"].num_replicas_in_sync,
    )
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()), flush=True)
    return result


def _step_mib(model, x, y):
    """MiB the allocator adds, at its peak, above what is resident (weights, optimizer
    state, the batch) during one training step, after a warm-up step on the same batch."""
    model.train_on_batch(x, y)
    with keras_blpa.memory.PeakMemory() as peak:
        model.train_on_batch(x, y)
    return peak.peak_mib - peak.resident_mib


def _step_meter(args, dataset, run, bits, depth):
    """A function batch size -> `_step_mib` of a fresh ResNet-`depth` on training images;
    it prints a STEP_MEMORY line per measurement."""
    model = _compiled_model(args, run, bits, depth)

    def measure(batch):
        x, y = next(iter(_train_data(args, dataset, batch)))
        mib = _step_mib(model, x, y)
        print(f"STEP_MEMORY bits={_bits_label(bits)} depth={depth} batch={batch} "
              f"step_mib={mib:.1f}", flush=True)
        return mib

    return measure


def _line(points):
    """Slope (MiB per sample) and fixed part (MiB) of the line through two (batch, MiB) points."""
    (b0, m0), (b1, m1) = points
    slope = (m1 - m0) / (b1 - b0)
    return slope, m0 - slope * b0


def _batch_within(measure, points, budget_mib, aim=0.9, tries=3):
    """A large batch whose step, run by `measure`, fits in the budget, by false position.

    The first try extrapolates the line through the two measured (batch, MiB)
    `points` to `aim` x the budget (a step's peak varies by some 10% from run to
    run); each later one interpolates there between the largest batch that fit and
    the smallest that did not.

    Returns (batch, MiB): the first try that fits, else the largest measured batch that
    fits; None if none of `points` fits.
    """
    fits = [p for p in points if p[1] <= budget_mib]
    over = [p for p in points if p[1] > budget_mib]
    if not fits:
        return None
    line = points
    for _ in range(tries):
        slope, fixed = _line(line)
        batch = int((aim * budget_mib - fixed) // slope) if slope > 0 else 0
        if batch <= max(fits)[0]:
            break
        mib = measure(batch)
        if mib <= budget_mib:
            return batch, mib
        over.append((batch, mib))
        line = [max(fits), min(over)]
    return max(fits)


def _compare_step_memory(args, dataset, run, bits):
    """Step memory of fresh exact and `bits` nets at the training batch and twice it,
    and `_batch_within` the exact net's step at the training batch, of the `bits` net."""
    batches = (run["batch_size"], 2 * run["batch_size"])
    keras.backend.clear_session()
    measure = _step_meter(args, dataset, run, None, run["measure_depth"])
    exact = [(batch, measure(batch)) for batch in batches]
    keras.backend.clear_session()
    measure = _step_meter(args, dataset, run, bits, run["measure_depth"])
    approx = [(batch, measure(batch)) for batch in batches]
    return exact, approx, _batch_within(measure, approx, exact[0][1])


def _memory_text(label, points):
    """'exact 869.8 MiB (6.89 MiB/sample + 12.0 MiB)': step memory at the first batch, its line."""
    slope, fixed = _line(points)
    sign = "+" if fixed >= 0 else "-"
    return (f"{label} {points[0][1]:.1f} MiB ({slope:.2f} MiB/sample {sign} "
            f"{abs(fixed):.1f} MiB)")


def _compare_line(run, results, exact, approx, within):
    """The COMPARE line: both accuracies, both step memories, the larger batch that fits."""
    label = f"{results[1]['bits']}-bit"
    (batch, budget), (batch2, _) = exact
    fits = (
        f"the {label} step runs batch {within[0]} ({within[0] / batch:.1f}x) in "
        f"{within[1]:.1f} MiB, measured, within exact's {budget:.1f} MiB"
        if within
        else f"the {label} step at batch {batch} does not fit in exact's {budget:.1f} MiB"
    )
    return (
        f"COMPARE ResNet-{run['depth']} after {results[1]['optimizer_steps']} steps: test "
        f"accuracy exact {results[0]['test_accuracy']:.4f}, {label} "
        f"{results[1]['test_accuracy']:.4f} | training-step memory above resident, "
        f"ResNet-{run['measure_depth']} built for this measurement, batch {batch} (per sample "
        f"+ fixed, from batches {batch} and {batch2}): {_memory_text('exact', exact)}, "
        f"{_memory_text(label, approx)} | {fits}"
    )


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
            results.append(_train_once(args, dataset, run, bits, sub))
        if args.compare:
            exact, approx, within = _compare_step_memory(args, dataset, run, args.bits)
            print(_compare_line(run, results, exact, approx, within), flush=True)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
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
