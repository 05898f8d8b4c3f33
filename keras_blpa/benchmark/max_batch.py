"""Largest batch that fits a memory budget, each trial in its own process.

Every trial runs ``keras_blpa.benchmark.trial`` with
``TF_CPU_ALLOCATOR_USE_BFC=true TF_CPU_BFC_MEM_LIMIT_IN_MB=<budget>``: past the
budget TensorFlow raises RESOURCE_EXHAUSTED, as a GPU of that size would. On
JAX a trial fits when XLA's compiled step needs at most the budget (see
`keras_blpa.benchmark.trial`). The search is short because peak memory is
close to affine in the batch size: the peaks of two small batches (from the
memory part, or two probe trials) give an estimate, every successful trial
refines it, and a bracketing search then closes a narrow window around it to a
relative tolerance.
"""

import json
import math
import os
import subprocess
import sys
import time

from keras_blpa.benchmark import trial as trial_lib

__all__ = ["affine_fit", "run_trial", "search"]

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "ResourceExhaustedError", "OOM when allocating",
               "Out of memory", "bad_alloc", "MemoryError")


def run_trial(mode, depth, batch, budget_mib, width=1, steps=2, image_size=32,
              timeout_s=1800):
    """Runs one trial in a subprocess; returns a dict with ok, batch, peak_mib, ..."""
    env = dict(os.environ)
    env.update(
        TF_CPU_ALLOCATOR_USE_BFC="true",
        TF_CPU_BFC_MEM_LIMIT_IN_MB=str(int(budget_mib)),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    cmd = [sys.executable, "-m", "keras_blpa.benchmark.trial", "--mode", mode,
           "--depth", str(depth), "--width", str(width), "--batch", str(batch),
           "--steps", str(steps), "--image-size", str(image_size),
           "--budget-mib", str(budget_mib)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        stdout, out, returncode = proc.stdout, proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        stdout, out, returncode = "", f"timeout after {timeout_s} s", -1
    elapsed = round(time.perf_counter() - start, 1)
    for line in stdout.splitlines():
        if line.startswith(trial_lib.MARKER):
            result = json.loads(line[len(trial_lib.MARKER):])
            result["wall_s"] = elapsed
            return result
    # A crash without the marker: an allocation failure outside TF's error path
    # (std::bad_alloc, the kernel's OOM killer) also means "does not fit".
    # Far past the budget a trial can also die by a signal (SIGSEGV seen here,
    # from an allocation failure outside TF's error path): counted as not
    # fitting, with the signal recorded.
    oom = any(m in out for m in _OOM_MARKERS) or returncode in (-6, -9, -11, 134, 137, 139)
    result = {"ok": False, "batch": batch, "oom": oom, "wall_s": elapsed,
              "returncode": returncode}
    if not oom:
        result["error"] = out[-2000:]
    return result


def affine_fit(points):
    """(intercept, slope) in MiB of peak = intercept + slope * batch from (batch, peak) points."""
    points = sorted(set(points))
    if len(points) < 2:
        raise ValueError(f"Need two (batch, peak) points. Received: points={points}")
    # The two largest batches: closest to the budget, least affected by fixed costs.
    (b1, p1), (b2, p2) = points[-2], points[-1]
    slope = (p2 - p1) / (b2 - b1) if b2 != b1 else p2 / b2
    slope = max(slope, 1e-3)
    return p2 - slope * b2, slope


def search(mode, depth, budget_mib, points=(), width=1, steps=2, image_size=32,
           probe_batches=(4, 8), rel_tol=0.04, max_trials=10, log=print):
    """Largest batch of one mode that fits ``budget_mib``.

    Args:
        points: known (batch, peak_mib) pairs for this mode and depth (e.g. from
            the memory part). Probe trials at ``probe_batches`` fill in if fewer
            than two.
        rel_tol: stop when the failing and fitting batches are within this
            relative distance (at least 1 apart).

    Returns:
        dict with mode, depth, width, budget_mib, max_batch (0 if even the
        smallest probe does not fit), the estimate, every trial, and the
        time per sample of the largest batch that fit.
    """
    trials = []
    points = [tuple(p) for p in points]

    def attempt(batch):
        result = run_trial(mode, depth, batch, budget_mib, width, steps, image_size)
        trials.append(result)
        log(f"  max_batch {mode} depth={depth} batch={batch}: "
            f"{'fits' if result['ok'] else 'does not fit'}"
            + (f" peak={result['peak_mib']} MiB" if result["ok"] else "")
            + (f" ERROR {result.get('error', '')[-300:]}" if not result["ok"] and not result.get("oom") else "")
            + f" ({result['wall_s']} s)")
        if result["ok"]:
            points.append((batch, result["peak_mib"]))
        return result["ok"]

    for batch in probe_batches:
        if len(points) >= 2:
            break
        if not attempt(batch):
            return _summary(mode, depth, width, budget_mib, 0, None, trials)
    intercept, slope = affine_fit(points)
    estimate = max(1, int((budget_mib - intercept) / slope))
    # Largest batch known to fit.
    lo = max((b for b, p in points if p < budget_mib), default=0)
    hi = None                                     # smallest batch known not to fit
    guess = max(lo + 1, int(estimate * 0.97))
    while len(trials) < max_trials:
        if attempt(guess):
            lo = max(lo, guess)
        else:
            hi = guess if hi is None else min(hi, guess)
        if hi is not None and hi - lo <= max(1, math.ceil(rel_tol * lo)):
            break
        intercept, slope = affine_fit(points)
        refined = int((budget_mib - intercept) / slope)
        if hi is None:
            # Refit with the new point; try the refined estimate, or just above
            # the largest fit when the estimate says it is already the answer.
            step = max(1, math.ceil(rel_tol * lo))
            guess = refined if refined > lo else lo + step
        elif trials[-1]["ok"]:
            # A new fit refines the line: try its estimate if it lies inside the
            # bracket, else just above the fit (the estimate says lo is close).
            step = max(1, math.ceil(rel_tol * lo))
            guess = refined if lo < refined < hi else min(lo + step, (lo + hi) // 2)
        elif hi > 2 * lo:
            # The estimate was far too optimistic: bisect geometrically.
            guess = max(lo + 1, int(math.sqrt(max(lo, 1) * hi)))
        else:
            guess = (lo + hi) // 2
    return _summary(mode, depth, width, budget_mib, lo, estimate, trials)


def _summary(mode, depth, width, budget_mib, max_batch, estimate, trials):
    best = [t for t in trials if t["ok"] and t["batch"] == max_batch]
    return {
        "mode": mode,
        "depth": depth,
        "width": width,
        "budget_mib": budget_mib,
        "max_batch": max_batch,
        "estimate": estimate,
        "ms_per_sample_at_max": best[0]["ms_per_sample"] if best else None,
        "trials": trials,
    }
