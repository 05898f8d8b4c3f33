"""Convert a keras.applications model and compare its training-step memory.

Reproduces the "Convert your model" figures of the README: the memory report
of `keras_blpa.convert` (activation bytes kept for backprop, per layer, before
and after) and, with --measure, the allocator's peak of one training step of
the original and of the converted model.

    python examples/convert_applications.py \
        --model ResNet50V2 --input_size 128 --batch_size 32 --bits 4 --measure

The table over model families (keras.applications and keras-hub; blocks,
gradient cosines, per-sample memory slope, step time) is
`keras_blpa.benchmark.applications`, which measures each step the same way:

    python -m keras_blpa.benchmark.applications --models ResNet50V2,MobileNetV2 \
        --input-size 64 --batch-sizes 16,32
"""

import argparse

import keras
import tensorflow as tf

import keras_blpa

# The allocator keeps statistics on every CPU only if this runs before
# TensorFlow's first op (PeakMemory raises with the reason otherwise).
keras_blpa.memory.enable_cpu_statistics()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ResNet50V2", help="a keras.applications constructor")
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    parser.add_argument("--rows", type=int, default=25, help="report rows to print")
    parser.add_argument("--measure", action="store_true", help="measure the allocator peak")
    return parser.parse_args(argv)


def peak_bytes(model, batch_size, input_size):
    """Allocator peak of one training step (compiled with tf.function), after a warm-up step."""
    x = tf.random.normal([batch_size, input_size, input_size, 3])
    y = tf.one_hot(tf.range(batch_size) % 10, 10)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y, out))
        grads = tape.gradient(loss, model.trainable_variables)
        return tf.add_n([tf.reduce_sum(g) for g in grads])

    step(x, y)
    with keras_blpa.memory.PeakMemory() as peak:
        step(x, y)
    return peak.peak_bytes


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(0)
    shape = (args.input_size, args.input_size, 3)
    model = getattr(keras.applications, args.model)(weights=None, input_shape=shape, classes=10)
    converted, report = keras_blpa.convert(
        model, bits=args.bits, return_report=True, batch_size=args.batch_size
    )
    print(report.summary(max_rows=args.rows))
    if args.measure:
        before = peak_bytes(model, args.batch_size, args.input_size)
        after = peak_bytes(converted, args.batch_size, args.input_size)
        print(
            f"allocator peak of one training step: {before / 2**20:.0f} MiB -> "
            f"{after / 2**20:.0f} MiB ({before / after:.2f}x); measured saving "
            f"{(before - after) / 2**20:.1f} MiB vs reported "
            f"{report.saved_bytes / 2**20:.1f} MiB "
            f"(+- {report.transient_bytes / 2**20:.1f} MiB transient)"
        )


if __name__ == "__main__":
    main()
