"""keras_blpa benchmark: memory, largest batch, speed and accuracy of each mode.

    python -m keras_blpa.benchmark --quick --out benchmark_results
    python -m keras_blpa.benchmark --depths 164 --parts memory,timing,max_batch

Modes: exact (stock Keras), remat (keras.RematScope "activations"), recompute
(tf.recompute_grad around each residual unit), blpa8 / blpa4 (keras_blpa),
naive8 / naive4 (quantised forward). Parts:
  memory     allocator peak of one training step at fixed batch sizes (one process)
  timing     median time per sample at the fixed batch, modes interleaved
  max_batch  largest batch under --budget-mib, each trial in its own process
             (TF_CPU_ALLOCATOR_USE_BFC / TF_CPU_BFC_MEM_LIMIT_IN_MB)
  accuracy   Fashion-MNIST test error over seeds
  families   the same for small MobileNetV2-, EfficientNet- and ConvNeXt-like
             nets, exact (stock) vs keras_blpa.convert of them (families.py)
Results go to OUT/results.json, OUT/results.md and OUT/*.png; the JSON is
rewritten after every measurement, and --resume skips what it already holds.
"""

import argparse
import os
import platform
import shlex
import sys
import time

from keras_blpa import validation
from keras_blpa.benchmark.cli import comma_list

__all__ = ["PARTS", "build_parser", "main", "parse_depths", "resolve"]

_FULL = dict(
    depths="164,254,488,1001,1001x4",
    modes="exact,remat,recompute,blpa8,blpa4,naive8,naive4",
    max_batch_modes="exact,blpa4",
    max_batch_depths=None,  # the --depths
    max_batch_tol=0.04,
    batch=32,
    memory_batches="8,16,32,64",
    budget_mib=4096,
    timing_steps=5,
    warmup=2,
    acc_depth=20,
    acc_modes="exact,blpa8,blpa4,naive8,naive4",
    acc_seeds="0,1",
    acc_epochs=3,
    acc_batch=128,
    acc_train_samples=0,
    fam_families="mobilenetv2,efficientnet,convnext",
    fam_modes="exact,blpa8,blpa4,naive4",
    fam_seeds="0,1",
    fam_epochs=3,
    fam_batch=128,
    fam_train_samples=4096,
    fam_test_samples=0,
    parts="memory,timing,max_batch,accuracy",
)
_QUICK = dict(
    depths="11,29",
    modes="exact,remat,recompute,blpa8,blpa4,naive8,naive4",
    max_batch_modes="exact,blpa4",
    max_batch_depths="29",
    max_batch_tol=0.1,
    batch=16,
    memory_batches="8,16",
    budget_mib=192,
    timing_steps=3,
    warmup=1,
    acc_depth=11,
    acc_modes="exact,blpa4,naive4",
    acc_seeds="0,1",
    acc_epochs=1,
    acc_batch=64,
    acc_train_samples=2048,
    fam_families="mobilenetv2,efficientnet,convnext",
    fam_modes="exact,blpa4,naive4",
    fam_seeds="0,1",
    fam_epochs=1,
    fam_batch=64,
    fam_train_samples=1024,
    fam_test_samples=2000,
    parts="memory,timing,max_batch,accuracy",
)


def parse_depths(text):
    """"164,1001x4" -> [(164, 1), (1001, 4)]."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        depth, _, width = item.partition("x")
        try:
            out.append((int(depth), int(width) if width else 1))
        except ValueError:
            raise ValueError(
                f"Expected depths like 164 or 1001x4. Received: depth={item!r}"
            ) from None
    return out


_ints = comma_list(int)
_names = comma_list()


def build_parser():
    p = argparse.ArgumentParser(
        prog="keras-blpa-benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true",
                   help="small depths, small budget, few steps (CI)")
    p.add_argument("--out", default="benchmark_results", help="output folder")
    p.add_argument("--parts", help=f"comma list of parts (default all: {_FULL['parts']})")
    p.add_argument("--depths", help="comma list, e.g. 164,1001x4 (depth x width)")
    p.add_argument("--modes", help="modes for memory and timing")
    p.add_argument("--max-batch-modes", help="modes for the largest-batch search")
    p.add_argument("--max-batch-depths", help="depths for the largest-batch search "
                   "(default: --depths)")
    p.add_argument("--batch", type=int, help="fixed batch of the memory table and timing")
    p.add_argument("--memory-batches", help="batch sizes of the memory-vs-batch curve")
    p.add_argument("--budget-mib", type=int, help="memory budget of the largest-batch search")
    p.add_argument("--max-batch-tol", type=float,
                   help="relative width at which the largest-batch search stops")
    p.add_argument("--timing-steps", type=int, help="timed steps per mode")
    p.add_argument("--warmup", type=int, help="warm-up steps per mode")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--acc-depth", type=int)
    p.add_argument("--acc-modes")
    p.add_argument("--acc-seeds")
    p.add_argument("--acc-epochs", type=int)
    p.add_argument("--acc-batch", type=int)
    p.add_argument("--acc-train-samples", type=int, help="0 = all 60000")
    p.add_argument("--fam-families", help="families part: comma list of "
                   "mobilenetv2, efficientnet, convnext")
    p.add_argument("--fam-modes", help="families part: modes (exact, blpa8, blpa4, "
                   "naive8, naive4)")
    p.add_argument("--fam-seeds")
    p.add_argument("--fam-epochs", type=int)
    p.add_argument("--fam-batch", type=int)
    p.add_argument("--fam-train-samples", type=int, help="0 = all 60000")
    p.add_argument("--fam-test-samples", type=int, help="0 = all 10000")
    p.add_argument("--fam-width", type=int, help="families part: channels of the "
                   "first stage (default: each family's own, 16 / 16 / 24)")
    p.add_argument("--data-dir", help="TFDS data dir / folder of the IDX files")
    p.add_argument("--resume", action="store_true",
                   help="keep the measurements already in OUT/results.json")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md and the plots from OUT/results.json")
    return p


def resolve(args):
    """Fills unset flags from the quick or full defaults and validates them.

    Returns:
        The run's settings as a dict (also written to results.json).

    Raises:
        ValueError: naming the first bad value (mode, part, depth, count).
    """
    from keras_blpa.benchmark import modes as modes_lib

    defaults = _QUICK if args.quick else _FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    from keras_blpa.benchmark import families

    for key in ("batch", "budget_mib", "timing_steps", "image_size", "acc_depth",
                "acc_epochs", "acc_batch", "fam_epochs", "fam_batch"):
        validation.check_int(getattr(args, key), key)
    validation.check_int(args.warmup, "warmup", minimum=0)
    for key in ("acc_train_samples", "fam_train_samples", "fam_test_samples"):
        validation.check_int(getattr(args, key), key, minimum=0)
    if args.fam_width is not None:
        validation.check_int(args.fam_width, "fam_width")
    fam_modes = modes_lib.check_modes(_names(args.fam_modes))
    for mode in fam_modes:
        modes_lib.code_args(mode)  # recompute and remat are no conversion
    validation.check_number(args.max_batch_tol, "max_batch_tol", low=0, low_open=True)
    cfg = dict(
        quick=args.quick,
        parts=[validation.check_choice(p, "part", tuple(PARTS)) for p in _names(args.parts)],
        depths=parse_depths(args.depths),
        modes=modes_lib.check_modes(_names(args.modes)),
        max_batch_modes=modes_lib.check_modes(_names(args.max_batch_modes)),
        max_batch_depths=parse_depths(args.max_batch_depths or args.depths),
        batch=args.batch,
        memory_batches=sorted(set(_ints(args.memory_batches)) | {args.batch}),
        budget_mib=args.budget_mib,
        max_batch_tol=args.max_batch_tol,
        timing_steps=args.timing_steps,
        warmup=args.warmup,
        image_size=args.image_size,
        acc_depth=args.acc_depth,
        acc_modes=modes_lib.check_modes(_names(args.acc_modes)),
        acc_seeds=_ints(args.acc_seeds),
        acc_epochs=args.acc_epochs,
        acc_batch=args.acc_batch,
        acc_train_samples=args.acc_train_samples or None,
        fam_families=[validation.check_choice(f, "family", families.FAMILIES)
                      for f in _names(args.fam_families)],
        fam_modes=fam_modes,
        fam_seeds=_ints(args.fam_seeds),
        fam_epochs=args.fam_epochs,
        fam_batch=args.fam_batch,
        fam_train_samples=args.fam_train_samples or None,
        fam_test_samples=args.fam_test_samples or None,
        fam_width=args.fam_width,
        data_dir=args.data_dir,
    )
    return cfg


def _accelerator():
    """The backend's first accelerator ("CPU only" if none), e.g. "NVIDIA H100 80GB HBM3"."""
    from keras_blpa import backends

    return backends.get().accelerator()


def _backend_versions():
    """Keras, its backend and the backend's version; on TensorFlow, whether native ops run."""
    import keras

    from keras_blpa import backends

    backend = backends.get()
    return dict(keras=keras.__version__, backend=backend.NAME, **backend.versions())


def _machine():
    """CPU model, core count and accelerator, for the results' metadata."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPU cores, {platform.system()} ({_accelerator()})"


class _Session:
    """The results of one run, written to ``out`` after every measurement."""

    def __init__(self, out, results):
        self.out = out
        self.results = results

    def have(self, part, **key):
        """Whether `part` already holds a row matching every item of `key`."""
        return any(
            all(r.get(k) == v for k, v in key.items()) for r in self.results[part]
        )

    def add(self, part, rows):
        self.results[part].extend(rows)
        self.save()

    def save(self):
        from keras_blpa.benchmark import report

        self.results["meta"]["finished"] = _now()
        report.write(self.results, self.out)

    @staticmethod
    def log(message):
        print(time.strftime("%H:%M:%S ") + message, flush=True)


def _now():
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def _start(args, argv, cfg):
    """The session: earlier results (with --resume) and this run's metadata."""
    from keras_blpa.benchmark import report

    results = {}
    if args.resume and os.path.exists(os.path.join(args.out, "results.json")):
        results = report.load_json(args.out)
    meta = results.get("meta", {})
    command = "python -m keras_blpa.benchmark " + shlex.join(argv)
    results["schema_version"] = report.SCHEMA_VERSION
    results["meta"] = dict(
        machine=_machine(),
        **_backend_versions(),
        python=platform.python_version(),
        command=command,
        # Every run that wrote into this folder.
        commands=meta.get("commands", []) + [command],
        started=meta.get("started") or _now(),
    )
    # The data folder is this machine's business, not a result.
    results["config"] = {k: v for k, v in cfg.items() if k != "data_dir"}
    for part in report.PARTS:
        results.setdefault(part, [])
    report.save_json(results, args.out)
    return _Session(args.out, results)


def _shape(cfg):
    return (cfg["image_size"], cfg["image_size"], 3)


def _run_memory(session, cfg):
    from keras_blpa.benchmark import step_memory

    for depth, width in cfg["depths"]:
        for mode in cfg["modes"]:
            todo = [
                b for b in cfg["memory_batches"]
                if not session.have("memory", mode=mode, depth=depth, width=width, batch=b)
            ]
            if not todo:
                continue
            rows = step_memory.measure(mode, depth, todo, width, _shape(cfg))
            for r in rows:
                session.log(f"memory {mode} depth={depth} width={width} batch={r['batch']}: "
                            f"peak {r['peak_mib']} MiB (step {r['step_mib']} MiB)")
            session.add("memory", rows)


def _run_timing(session, cfg):
    from keras_blpa.benchmark import timing

    for depth, width in cfg["depths"]:
        todo = [m for m in cfg["modes"] if not session.have(
            "timing", mode=m, depth=depth, width=width, batch=cfg["batch"])]
        if not todo:
            continue
        rows = timing.measure(todo, depth, cfg["batch"], cfg["timing_steps"],
                              cfg["warmup"], width, _shape(cfg), log=session.log)
        for r in rows:
            session.log(f"timing {r['mode']} depth={depth} width={width} "
                        f"batch={r['batch']}: {r['ms_per_sample']} ms/sample")
        session.add("timing", rows)


def _run_max_batch(session, cfg):
    from keras_blpa.benchmark import max_batch

    budget = cfg["budget_mib"]
    for depth, width in cfg["max_batch_depths"]:
        for mode in cfg["max_batch_modes"]:
            if session.have("max_batch", mode=mode, depth=depth, width=width,
                            budget_mib=budget):
                continue
            # The memory part's peaks start the search's affine estimate.
            points = [(r["batch"], r["peak_mib"]) for r in session.results["memory"]
                      if (r["mode"], r["depth"], r["width"]) == (mode, depth, width)]
            row = max_batch.search(mode, depth, budget, points, width, steps=2,
                                   image_size=cfg["image_size"],
                                   rel_tol=cfg["max_batch_tol"], log=session.log)
            session.log(f"max_batch {mode} depth={depth} width={width}: "
                        f"{row['max_batch']} under {budget} MiB "
                        f"({len(row['trials'])} trials)")
            session.add("max_batch", [row])


def _run_accuracy(session, cfg):
    from keras_blpa.benchmark import accuracy

    todo = [m for m in cfg["acc_modes"] if not session.have(
        "accuracy", mode=m, depth=cfg["acc_depth"], epochs=cfg["acc_epochs"])]
    if todo:
        session.add("accuracy", accuracy.study(
            todo, cfg["acc_depth"], cfg["acc_seeds"], cfg["acc_epochs"],
            cfg["acc_batch"], cfg["acc_train_samples"], data_dir=cfg["data_dir"],
            log=session.log,
        ))


def _run_families(session, cfg):
    from keras_blpa.benchmark import families

    # --resume: the rows of the same schedule and data are done.
    same = dict(epochs=cfg["fam_epochs"], batch=cfg["fam_batch"], seeds=cfg["fam_seeds"],
                width=cfg["fam_width"])
    done = {(r["family"], r["mode"]) for r in session.results["families"]
            if all(r.get(k) == v for k, v in same.items())
            and (cfg["fam_train_samples"] is None or r["train_samples"] == cfg["fam_train_samples"])}
    session.add("families", families.study(
        cfg["fam_families"], cfg["fam_modes"], cfg["fam_seeds"], cfg["fam_epochs"],
        cfg["fam_batch"], cfg["fam_train_samples"], cfg["fam_test_samples"],
        data_dir=cfg["data_dir"], width=cfg["fam_width"], log=session.log, done=done,
    ))


# Part name -> function(session, cfg), in the order they run (max_batch starts
# from the memory part's peaks).
PARTS = {
    "memory": _run_memory,
    "timing": _run_timing,
    "max_batch": _run_max_batch,
    "accuracy": _run_accuracy,
    "families": _run_families,
}


def main(argv=None):
    """Runs the parts the flags ask for; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from keras_blpa import memory
    from keras_blpa.benchmark import report

    memory.enable_cpu_statistics()  # before TensorFlow's first op (trials inherit it)

    os.makedirs(args.out, exist_ok=True)
    if args.report_only:
        for path in report.write(report.load_json(args.out), args.out):
            print(path)
        return 0
    cfg = resolve(args)
    session = _start(args, argv, cfg)
    for part, run in PARTS.items():
        if part in cfg["parts"]:
            run(session, cfg)
    session.save()
    session.log(f"results in {args.out}/results.json, {args.out}/results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
