"""Which tensors are alive at the memory peak of one mode's training step.

    python -m keras_blpa.benchmark.peak_profile --mode blpa4 --depth 164 --batch 32 --budget-mib 90

Runs one trial under a BFC budget just below the step's peak, so that the
allocation at the peak fails; TensorFlow then dumps every chunk in use. The
chunks are grouped by size and each size is matched to the tensors of the CIFAR
ResNet that have it (float32 activations, 8/4-bit packed codes) at that batch.
"""

import argparse
import collections
import os
import re
import subprocess
import sys

CHUNK = re.compile(r"InUse at [0-9a-fx]+ of size (\d+)")
FAILED = re.compile(r"OOM when allocating tensor with shape\[([\d,]+)\]")
NODE = re.compile(r"Detected at node (\S+)")


def candidates(batch, width=1, image_size=32):
    """{bytes: [label, ...]} for the activation-shaped tensors of the CIFAR ResNet."""
    out = collections.defaultdict(list)
    for stage, base in enumerate((16, 32, 64)):
        side = image_size // (2 ** stage)
        for channels in sorted({base * width, 4 * base * width, 2 * base * width}):
            elems = batch * side * side * channels
            label = f"[{batch},{side},{side},{channels}]"
            out[4 * elems].append(f"float32 {label}")
            out[elems].append(f"8-bit codes {label}")
            out[-(-elems // 2)].append(f"4-bit codes {label}")
    return out


def match(size, table):
    """Labels whose byte size is within the allocator's rounding of ``size``."""
    for want, labels in table.items():
        if want <= size < want + 512 + want // 64:
            return labels
    return []


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", required=True)
    p.add_argument("--depth", type=int, required=True)
    p.add_argument("--width", type=int, default=1)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--budget-mib", type=int, required=True,
                   help="a little below the step's peak, so the peak allocation fails")
    args = p.parse_args(argv)
    env = dict(os.environ, TF_CPU_ALLOCATOR_USE_BFC="true",
               TF_CPU_BFC_MEM_LIMIT_IN_MB=str(args.budget_mib), TF_CPP_MIN_LOG_LEVEL="0")
    cmd = [sys.executable, "-m", "keras_blpa.benchmark.trial", "--mode", args.mode,
           "--depth", str(args.depth), "--width", str(args.width),
           "--batch", str(args.batch), "--steps", "1"]
    log = subprocess.run(cmd, env=env, capture_output=True, text=True).stderr
    # The last dump: the allocation that failed for good (earlier ones were retried).
    start = log.rfind("BFCAllocator dump for")
    end = log.find("Stats:", start)
    dump = log[start:end] if start >= 0 else ""
    sizes = collections.Counter(int(s) for s in CHUNK.findall(dump))
    if not sizes:
        print(f"The step fit under {args.budget_mib} MiB: lower --budget-mib.")
        return 1
    table = candidates(args.batch, args.width)
    total = sum(s * n for s, n in sizes.items())
    failed = FAILED.search(log)
    node = NODE.search(log)
    print(f"{args.mode} depth={args.depth} batch={args.batch}: "
          f"{total / 2**20:.1f} MiB in use when allocating "
          f"[{failed.group(1) if failed else '?'}] at {node.group(1) if node else '?'}")
    print("| chunk size (MiB) | count | total (MiB) | matches |")
    print("|---:|---:|---:|---|")
    rest = 0
    for size, count in sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1]):
        if size * count < total / 200:
            rest += size * count
            continue
        labels = match(size, table)
        print(f"| {size / 2**20:.3f} | {count} | {size * count / 2**20:.1f} | "
              f"{' or '.join(labels[:3]) or '-'} |")
    print(f"| (smaller groups) | | {rest / 2**20:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
