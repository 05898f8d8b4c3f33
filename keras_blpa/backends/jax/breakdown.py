"""What ``fit``'s compiled step keeps live at its peak, per mode (JAX).

    KERAS_BACKEND=jax python -m keras_blpa.backends.jax.breakdown \
        --depth 164 --batch 256 --modes exact blpa4 blpa8 \
        --out keras_blpa/benchmark/results/jax_breakdown/after.json

For each mode: ``compiled_step_memory``'s temp bytes and `peak_buffers`' breakdown
(bytes by category, float temporaries by shape, the largest live values), and the
temp-bytes ratio of "exact" to each compressed mode. XLA compiles the step; nothing runs
but one 2-sample step that builds the optimizer state.
"""

import argparse
import json
import sys
import time


def measure(mode, depth, batch, top=15, input_shape=(32, 32, 3), num_classes=10):
    """{"temp_bytes", "temp_MiB", "peak": peak_buffers(...)} of one mode's step at `batch`."""
    from keras_blpa.backends.jax.memory import compiled_step_memory
    from keras_blpa.backends.jax.memory import peak_buffers
    from keras_blpa.benchmark import modes

    model = modes.compile_model(modes.build_model(mode, depth, num_classes, input_shape, seed=0))
    modes.build_state(model, input_shape, num_classes)
    x, y = modes.random_batch(batch, input_shape, num_classes)
    start = time.time()
    temp = compiled_step_memory(model, x, y).temp_bytes
    peak = peak_buffers(model, x, y, top=top)
    assert peak["temp_bytes"] == temp, (peak["temp_bytes"], temp)
    modes.release()
    return {"temp_bytes": temp, "temp_MiB": round(temp / 2**20, 2),
            "seconds": round(time.time() - start, 1), "peak": peak}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=164)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=["exact", "blpa4", "blpa8"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--chunk-mib", default=None,
                        help="block.CHUNK_BYTES in MiB for this run ('none': no chunks)")
    args = parser.parse_args(argv)
    import jax
    import keras

    from keras_blpa.backends.jax import block

    if args.chunk_mib is not None and hasattr(block, "CHUNK_BYTES"):
        block.CHUNK_BYTES = (None if args.chunk_mib == "none"
                             else int(float(args.chunk_mib) * 2**20))

    result = {"command": "python -m keras_blpa.backends.jax.breakdown " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "depth": args.depth, "batch": args.batch, "jax": jax.__version__,
              "keras": keras.__version__, "device": str(jax.devices()[0]),
              "chunk_bytes": getattr(block, "CHUNK_BYTES", "no chunking in this version"),
              "modes": {}}
    for mode in args.modes:
        result["modes"][mode] = m = measure(mode, args.depth, args.batch, args.top)
        print(json.dumps({"mode": mode, "temp_MiB": m["temp_MiB"], "seconds": m["seconds"],
                          "categories_MiB": {k: round(v / 2**20, 2)
                                             for k, v in m["peak"]["categories"].items()}}),
              flush=True)
    if "exact" in result["modes"]:
        exact = result["modes"]["exact"]["temp_bytes"]
        result["ratio_exact_over"] = {
            mode: round(exact / m["temp_bytes"], 3) for mode, m in result["modes"].items()
            if mode != "exact"
        }
        print(json.dumps({"ratio_exact_over": result["ratio_exact_over"]}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return result


if __name__ == "__main__":
    main()
