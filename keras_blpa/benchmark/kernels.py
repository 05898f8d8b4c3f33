"""Throughput of the quantisation kernels and the ApproxConvBlock step time.

    python -m keras_blpa.benchmark.kernels [--quick] [--output FILE.json]

Part 1, kernels: encode (``bn_act_encode``: BN + ReLU + K-bit code from the
block input) and decode (``decode_activation``) of a block activation, through the
TensorFlow ops, for the native library and the pure-TF reference, next to a
plain copy of the same bytes (``tf.raw_ops.DeepCopy``) timed in the same run.
GB/s counts bytes read + written: encode reads 4n and writes 4n + the codes,
decode reads the codes and writes 4n, the copy reads and writes 4n.

Part 2, block: training-step time (forward + gradients of every variable) of
``--blocks`` units of each of ``--stacks`` (`keras_blpa.benchmark.stacks`:
"residual" BN -> activation -> 3x3 Conv2D with identity shortcuts, for each of
``--activations``; "depthwise" BN -> ReLU6 -> DepthwiseConv2D; "squeeze_excite"
BN -> SiLU -> squeeze-excite -> 1x1 Conv2D) at 4 bits, against the same stack
in stock Keras layers, on the native and the reference path. Modes are
interleaved step by step so that load from other processes hits them alike;
medians are reported, and each mode's allocator peak of one step (the CPU BFC
statistics, `keras_blpa.memory.PeakMemory`).

Each kernel row also records ``max_error_steps``: the largest distance, in bins,
between the timed decode(encode(x)) and the exact ReLU(BN(x)) over the elements
the code does not clip (at most 0.5 for a correct code), so that a figure never
comes from a kernel that computes the wrong thing.

Prints a table and writes JSON (default benchmark_results/kernels.json).
The whole-model step time of every mode is the main CLI's ``timing`` part.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import tensorflow as tf

from keras_blpa import validation

__all__ = ["bench_block", "bench_kernels", "main"]


def _median_times(fns, reps):
    """Interleaved timing: {name: median seconds} over `reps` rounds."""
    for fn in fns.values():
        fn()  # warm-up / tracing
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _kernel_fns(kernels, x, scale, offset, params, bits):
    """(encode fn, decode fn, packed bytes, decoded ReLU output) of one path."""
    shape = tf.shape(x)

    @tf.function
    def encode(x):
        return kernels.bn_act_encode(
            x, scale, offset, params["inv_step"], params["shift"], bits
        )

    _, packed = encode(x)

    @tf.function
    def decode(packed):
        return kernels.decode_activation(packed, shape, params["step"], params["shift"], bits)

    return (lambda: encode(x)), (lambda: decode(packed)), int(packed.shape[0]), decode(packed)


def _max_error_steps(decoded, x, gamma, beta, params, bits):
    """Largest |decoded - relu(gamma x + beta)| in bins over the elements below
    the top code's upper edge ``(2^K - shift) * step`` (above it the code clips)."""
    step, shift = params["step"].numpy(), params["shift"].numpy()
    y = gamma * x + beta
    error = np.abs(np.asarray(decoded) - np.maximum(y, 0.0)) / step
    return float(error[y < (2**bits - shift) * step].max())


def bench_kernels(shape, bits_list, reps):
    """Encode/decode timings of each kernel path next to a copy of the same bytes.

    Args:
        shape: NHWC shape of the float32 activation.
        bits_list: code widths to time.
        reps: timed rounds (interleaved; medians reported).

    Returns:
        A list of dicts, one per (path, bits): times in ms, GB/s, the fraction
        of the copy's GB/s, ``packed_bytes`` and ``max_error_steps``.
    """
    from keras_blpa.backends.tensorflow import native
    from keras_blpa.backends.tensorflow import reference

    rng = np.random.default_rng(0)
    channels = shape[-1]
    x_np = rng.normal(size=shape).astype(np.float32)
    x = tf.constant(x_np)
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    beta = rng.normal(size=channels).astype(np.float32)
    scale = tf.constant(gamma)
    offset = tf.constant(beta)
    n = int(np.prod(shape))
    copy = tf.function(lambda x: tf.raw_ops.DeepCopy(x=x))
    paths = {"reference": reference}
    ops = native.load()
    if ops is not None:
        paths["native"] = ops
    rows = []
    for bits in bits_list:
        params = reference.channel_params(gamma, beta, bits)
        fns = {"copy": lambda: copy(x)}
        nbytes, errors = 0, {}
        for name, kernels in paths.items():
            enc, dec, nbytes, decoded = _kernel_fns(kernels, x, scale, offset, params, bits)
            fns[f"{name}/encode"] = enc
            fns[f"{name}/decode"] = dec
            errors[name] = _max_error_steps(decoded, x_np, gamma, beta, params, bits)
        t = _median_times(fns, reps)
        copy_gbs = 2 * 4 * n / t["copy"] / 1e9
        # encode reads 4n, writes 4n + codes; decode reads codes, writes 4n.
        traffic = (4 * n + 4 * n + nbytes) + (nbytes + 4 * n)
        for name in paths:
            total = t[f"{name}/encode"] + t[f"{name}/decode"]
            gbs = traffic / total / 1e9
            rows.append(
                {
                    "path": name,
                    "bits": bits,
                    "elements": n,
                    "packed_bytes": nbytes,
                    "max_error_steps": errors[name],
                    "encode_ms": 1e3 * t[f"{name}/encode"],
                    "decode_ms": 1e3 * t[f"{name}/decode"],
                    "copy_ms": 1e3 * t["copy"],
                    "enc_dec_gb_s": gbs,
                    "copy_gb_s": copy_gbs,
                    "fraction_of_copy": gbs / copy_gbs,
                }
            )
    return rows


def _step_fn(model, x):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            y = model(x, training=True)
            loss = tf.reduce_mean(tf.square(y))
        grads = tape.gradient(loss, model.trainable_variables)
        return loss, grads

    return lambda: step()


def bench_block(shape, blocks, reps, activation=None, stack="residual"):
    """Training-step ms of `blocks` units of `keras_blpa.benchmark.stacks.STACKS[stack]`
    at 4 bits (native and pure-TF paths) against the same stack in stock layers.

    `activation`: the block's (None: the stack's default)."""
    from keras_blpa.backends.tensorflow import native
    from keras_blpa.benchmark.stacks import STACKS
    from keras_blpa.memory import PeakMemory

    build = STACKS[stack]
    kwargs = {} if activation is None else {"activation": activation}
    size, channels = shape[1], shape[3]

    def model(mode):
        return build(mode, depth=blocks, channels=channels, size=size, **kwargs)

    x = tf.constant(np.random.default_rng(1).normal(size=shape).astype(np.float32))
    fns = {"stock": _step_fn(model("stock"), x)}
    real_load = native.load
    if real_load() is not None:
        fns["blpa4_native"] = _step_fn(model("4"), x)
        fns["blpa4_native"]()  # trace while the native path is active
    native.load = lambda: None  # trace the reference path
    try:
        fns["blpa4_reference"] = _step_fn(model("4"), x)
        fns["blpa4_reference"]()
    finally:
        native.load = real_load
    t = _median_times(fns, reps)
    peaks = {}
    for k, fn in fns.items():
        with PeakMemory() as peak:
            fn()
        peaks[k] = peak.peak_mib
    result = {
        "stack": stack,
        "activation": activation or "default",
        "batch_shape": list(shape),
        "blocks": blocks,
        "step_ms": {k: 1e3 * v for k, v in t.items()},
        "peak_mib": peaks,
    }
    for k in t:
        if k != "stock":
            result[f"ratio_{k}_vs_stock"] = t[k] / t["stock"]
    return result


def _shape(text):
    shape = tuple(int(v) for v in text.split(","))
    return validation.check_shape(shape, "shape", 4)


def main(argv=None):
    """Runs both parts; prints a table, writes the JSON and returns it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--output", default=os.path.join("benchmark_results", "kernels.json"))
    parser.add_argument("--shape", type=_shape, default=(64, 32, 32, 64),
                        help="NHWC activation shape (default 64,32,32,64)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (kernels)")
    parser.add_argument("--block-reps", type=int, default=None, help="timed steps (block)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks in the timed stack")
    parser.add_argument("--no-block", action="store_true", help="skip the block timing")
    parser.add_argument("--activations", default="relu",
                        help="comma list of the residual stack's activations to time (default relu)")
    parser.add_argument("--stacks", default="residual",
                        help="comma list of keras_blpa.benchmark.stacks to time (default "
                             "residual; the others with their own activation)")
    args = parser.parse_args(argv)
    from keras_blpa import memory

    memory.enable_cpu_statistics()  # before TensorFlow's first op (the block part's peaks)
    reps = validation.check_int(args.reps or (10 if args.quick else 40), "reps")
    block_reps = validation.check_int(
        args.block_reps or (3 if args.quick else 10), "block_reps"
    )
    validation.check_int(args.blocks, "blocks")
    shape = args.shape

    from keras_blpa.backends.tensorflow import native

    ops = native.load()
    info = {
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "python": sys.version.split()[0],
        "native": None if ops is None else ops.path,
        "native_error": native.load_error(),
        "activation_shape": list(shape),
        "reps": reps,
    }
    rows = bench_kernels(shape, (2, 4, 8), reps)
    print(f"Kernels on a {shape} float32 activation (median of {reps}, interleaved):")
    print(f"{'path':<10} {'bits':>4} {'enc ms':>8} {'dec ms':>8} {'GB/s':>7} "
          f"{'copy GB/s':>9} {'vs copy':>8}")
    for r in rows:
        print(f"{r['path']:<10} {r['bits']:>4} {r['encode_ms']:>8.2f} {r['decode_ms']:>8.2f} "
              f"{r['enc_dec_gb_s']:>7.2f} {r['copy_gb_s']:>9.2f} {r['fraction_of_copy']:>7.0%}")
    from keras_blpa.benchmark.stacks import STACKS

    runs = []
    for stack in ([] if args.no_block else args.stacks.split(",")):
        validation.check_choice(stack, "stack", tuple(STACKS))
        activations = args.activations.split(",") if stack == "residual" else [None]
        runs += [(stack, activation) for activation in activations]
    blocks = []
    for stack, activation in runs:
        block = bench_block(shape, args.blocks, block_reps, activation, stack)
        blocks.append(block)
        print(f"\nTraining step, {args.blocks} {stack} units ({block['activation']}), batch "
              f"{shape} (median of {block_reps}, interleaved):")
        for k, v in block["step_ms"].items():
            ratio = block.get(f"ratio_{k}_vs_stock")
            extra = f"  {ratio:.2f}x stock" if ratio else ""
            print(f"  {k:<16} {v:9.1f} ms{extra}   peak {block['peak_mib'][k]:7.1f} MiB")
    result = {"info": info, "kernels": rows, "block_step": blocks}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.output}")
    return result


if __name__ == "__main__":
    main()
