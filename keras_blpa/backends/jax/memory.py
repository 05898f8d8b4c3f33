"""JAX's device statistics, XLA's compiled-step memory, and the facts of ``keras_blpa.info``."""

import collections
import glob
import os
import re
import tempfile

import jax
import numpy as np

__all__ = [
    "accelerator",
    "compiled_step_memory",
    "facts",
    "memory_device",
    "memory_stats",
    "peak_buffers",
    "reset_peak_memory",
    "step_breakdown",
    "versions",
]


def _device():
    return jax.local_devices()[0]


def memory_device():
    """The first local device, e.g. "cuda:0" or "TFRT_CPU_0"."""
    return str(_device())


def memory_stats(device):
    """``{"current", "peak"}`` bytes of the first local device (the peak since the process started)."""
    from keras_blpa.memory import MemoryStatsUnavailable

    stats = _device().memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        raise MemoryStatsUnavailable(
            f"JAX keeps no memory statistics on {device}; "
            "use keras_blpa.memory.compiled_step_memory(model, x, y)"
        )
    return {"current": stats["bytes_in_use"], "peak": stats["peak_bytes_in_use"]}


def reset_peak_memory(device):
    """JAX cannot reset a device's peak: False (the peak is the one since the process started)."""
    memory_stats(device)  # raises where there are no statistics
    return False


def _lowered_step(model, x, y):
    """``jax.jit(model.train_step, donate_argnums=0)`` lowered on fit's state and batch (x, y)."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        raise ValueError(
            "compiled_step_memory needs a compiled model that ran one training step "
            "(e.g. model.train_on_batch(x[:2], y[:2])), which builds the optimizer "
            f"and metric state. Received: model={model.name!r} with optimizer={optimizer!r}"
        )
    state = tuple(
        [v.value for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables,
                          optimizer.variables, model.metrics_variables)
    )
    data = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype)),
        (x,) if y is None else (x, y),
    )
    return jax.jit(model.train_step, donate_argnums=0).lower(state, data)


def compiled_step_memory(model, x, y):
    """XLA's buffer assignment of ``model.fit``'s training step on batch (x, y), compiled, not run.

    The step is the model's own ``train_step``, jitted with the state donated as
    ``fit`` does; x and y may be arrays or anything with ``shape`` and ``dtype``.

    Raises:
        ValueError: if the model has not been compiled and run one training step
            (which builds optimizer and metric state).
    """
    from keras_blpa.memory import CompiledMemory

    stats = _lowered_step(model, x, y).compile().memory_analysis()
    return CompiledMemory(
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
    )


# ------------------------------------------------- what is live at the peak

_ALLOCATION = re.compile(r"^allocation (\d+): size (\d+), (.*)$")
_VALUE = re.compile(r"^ value: <\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(\S+) = .*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def _parse_shape(text):
    """("f32", (8, 32, 32, 16)) from "f32[8,32,32,16]{3,2,1,0}" (a tuple: (text, None))."""
    match = re.match(r"^([a-z]+\d*)\[([\d,]*)\]", text)
    if not match:
        return text, None
    dims = tuple(int(d) for d in match.group(2).split(",") if d)
    return match.group(1), dims


def _dump(lowered, directory):
    """Compiles `lowered` with XLA's after-optimisation dumps written to `directory`;
    returns (compiled, {suffix: text}) for the buffer assignment, live ranges and HLO."""
    compiled = lowered.compile(compiler_options={
        "xla_dump_to": directory, "xla_dump_hlo_as_text": True,
    })
    texts = {}
    for suffix in ("-buffer-assignment.txt", "-live-range.txt", ".txt"):
        paths = sorted(glob.glob(os.path.join(directory, f"*train_step*after_optimizations{suffix}")))
        if not paths:
            raise RuntimeError(f"XLA wrote no *after_optimizations{suffix} to {directory}")
        with open(paths[-1]) as f:
            texts[suffix] = f.read()
    return compiled, texts


def peak_buffers(model, x, y, top=20):
    """What is live at the peak of ``fit``'s compiled step (the one of `compiled_step_memory`).

    Reads XLA's own dumps of the compiled step: the buffer assignment (where
    each value lives: the parameters, the output, or, at an offset, the one
    preallocated temporary buffer whose size is ``temp_bytes``) and the live
    ranges of the values over the scheduled instruction sequence. The peak is
    the instruction at which the live values of the temporary buffer cover the
    most bytes (values that share a slice of it, e.g. an in-place update and
    its operand, count once); ``temp_bytes`` exceeds it by the buffer's
    fragmentation. Parameters (weights, optimizer and metric state, the batch)
    and the outputs (the new state, mostly aliased to the donated parameters)
    are not temporaries: ``argument_bytes`` gives them.

    Returns:
        A dict: ``temp_bytes`` (XLA's, as `compiled_step_memory`),
        ``argument_bytes``, ``output_bytes`` and ``alias_bytes`` (the same),
        ``peak_time`` and ``peak_instruction`` (the instruction running at
        the peak and its JAX op name), ``temp_live_bytes`` (the temporaries live at the peak), ``fragmentation_bytes``
        (``temp_bytes - temp_live_bytes``), ``categories`` (the live
        temporaries' bytes by kind: "codes" (u8, or the u16 words of 8-bit codes), "per-channel vectors" (rank
        <= 1), "weight-shaped floats" (a trainable variable's element count),
        "activation-sized floats", "other temporaries"),
        ``float_temps_by_shape`` ({shape: [count, bytes]}) and ``largest`` (the
        `top` largest live temporaries: name, op_name, shape, bytes, category).
    """
    lowered = _lowered_step(model, x, y)
    weight_sizes = {int(np.prod(v.shape)) for v in model.trainable_variables}
    with tempfile.TemporaryDirectory(prefix="keras_blpa_xla_dump_") as directory:
        compiled, texts = _dump(lowered, directory)
    stats = compiled.memory_analysis()

    # The preallocated temporary buffer's values: name -> (offset, size, shape text).
    temps, in_temp, temp_size = {}, False, None
    for line in texts["-buffer-assignment.txt"].splitlines():
        match = _ALLOCATION.match(line)
        if match:
            in_temp = "preallocated-temp" in match.group(3)
            if in_temp:
                temp_size = int(match.group(2))
            continue
        match = _VALUE.match(line)
        if match and in_temp:
            temps[match.group(1)] = (int(match.group(3)), int(match.group(2)), match.group(4))

    # The HLO: op names, which computation defines each instruction, and the while loops'
    # body and condition computations.
    op_names, computation_of, loops, computation = {}, {}, {}, None
    for line in texts[".txt"].splitlines():
        header = re.match(r"^(?:ENTRY )?%(\S+) .*\{\s*$", line)
        if header:
            computation = header.group(1)
            continue
        match = re.match(r"^\s*(?:ROOT )?%(\S+) = ", line)
        if match:
            computation_of[match.group(1)] = computation
            loop = re.search(r"\bwhile\(.*condition=%([^,\s]+).*body=%([^,\s]+)", line)
            if loop:
                loops[match.group(1)] = loop.groups()
        match = _INSTRUCTION.match(line)
        if match:
            op_names.setdefault(match.group(1), match.group(2))

    live_text = texts["-live-range.txt"]
    sequence = dict(re.findall(r"^    (\d+):(\S+)$", live_text, re.M))
    ranges = re.findall(r"^    (\S+?)\{[\d,]*\}:(\d+)-(\d+)$", live_text, re.M)
    # The live ranges cover the entry computation; a while loop's own temporaries
    # (its body's and condition's values, and those of loops nested in them) count as
    # live, all together, at the loop's time in the sequence.
    time_of = {name: int(time) for time, name in sequence.items()}
    inner = collections.defaultdict(list)
    for name in temps:
        inner[computation_of.get(name)].append(name)
    for loop, time in sorted(time_of.items()):
        if loop not in loops:
            continue
        pending, seen_computations = list(loops[loop]), set()
        while pending:
            called = pending.pop()
            if called in seen_computations:
                continue
            seen_computations.add(called)
            for name in inner.get(called, ()):
                ranges.append((name, str(time), str(time)))
                if name in loops:
                    pending.extend(loops[name])
    # Sweep over time: each temporary value holds its slice [offset, offset + size)
    # from its definition to its last use (both included); co-located values count once.
    events = []
    for name, begin, end in ranges:
        if name in temps:
            offset, size, _ = temps[name]
            events.append((int(begin), 0, (offset, size), name))
            events.append((int(end) + 1, -1, (offset, size), name))
    events.sort(key=lambda e: (e[0], e[1]))
    holders, live_bytes, best, best_time = collections.Counter(), 0, -1, None
    index = 0
    while index < len(events):
        time_now = events[index][0]
        while index < len(events) and events[index][0] == time_now:
            _, kind, piece, _ = events[index]
            if kind < 0:
                holders[piece] -= 1
                if holders[piece] == 0:
                    del holders[piece]
                    live_bytes -= piece[1]
            else:
                if holders[piece] == 0:
                    live_bytes += piece[1]
                holders[piece] += 1
            index += 1
        if live_bytes > best:
            best, best_time = live_bytes, time_now
    live_names = [name for name, begin, end in ranges
                  if name in temps and int(begin) <= best_time <= int(end)]

    categories = collections.Counter()
    by_shape = collections.defaultdict(lambda: [0, 0])
    live, seen = [], set()
    for name in live_names:
        offset, size, shape_text = temps[name]
        if (offset, size) in seen:
            continue
        seen.add((offset, size))
        dtype, dims = _parse_shape(shape_text)
        if dims is None:
            category = "other temporaries"
        elif dtype in ("u8", "u16"):  # (8-bit codes are packed as 16-bit words)
            category = "codes"
        elif dtype in ("f32", "bf16", "f16", "f64"):
            elements = int(np.prod(dims)) if dims else 1
            if len(dims) <= 1:
                category = "per-channel vectors"
            elif elements in weight_sizes:
                category = "weight-shaped floats"
            else:
                category = "activation-sized floats"
            key = f"{dtype}[{','.join(map(str, dims))}]"
            by_shape[key][0] += 1
            by_shape[key][1] += size
        else:
            category = "other temporaries"
        categories[category] += size
        live.append({"name": name, "op_name": op_names.get(name, ""),
                     "shape": shape_text.split("{")[0], "bytes": size, "category": category})
    live.sort(key=lambda v: (-v["bytes"], v["name"]))
    peak_instruction = sequence.get(str(best_time))
    return {
        "temp_bytes": stats.temp_size_in_bytes,
        "temp_allocation_bytes": temp_size,
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "peak_time": best_time,
        "peak_instruction": peak_instruction,
        "peak_op_name": op_names.get(peak_instruction, ""),
        "temp_live_bytes": best,
        "fragmentation_bytes": stats.temp_size_in_bytes - best,
        "categories": dict(categories.most_common()),
        "float_temps_by_shape": dict(sorted(by_shape.items(), key=lambda kv: -kv[1][1])),
        "largest": live[:top],
    }

def step_breakdown(model, x, y):
    """`peak_buffers` as a `keras_blpa.memory.StepBreakdown` (compiled, not run).

    resident = what `compiled_step_memory` counts outside the temporaries
    (arguments + new outputs - reused), codes = the live "codes" temporaries,
    floats = every other live temporary, fragmentation = the temporary
    buffer's bytes not live at the peak; they sum to its ``peak_bytes``.
    """
    from keras_blpa.memory import StepBreakdown

    from keras_blpa.memory import CompiledMemory

    peak = peak_buffers(model, x, y, top=8)
    step = CompiledMemory(  # the same compiled step's figures, not compiled again
        argument_bytes=peak["argument_bytes"],
        output_bytes=peak["output_bytes"],
        alias_bytes=peak["alias_bytes"],
        temp_bytes=peak["temp_bytes"],
    )
    codes = peak["categories"].get("codes", 0)
    return StepBreakdown(
        peak_bytes=step.peak_bytes,
        resident_bytes=step.peak_bytes - step.temp_bytes,
        codes_bytes=codes,
        float_bytes=peak["temp_live_bytes"] - codes,
        fragmentation_bytes=peak["fragmentation_bytes"],
        peak_op=peak["peak_op_name"] or (peak["peak_instruction"] or ""),
        largest=tuple(
            dict(op=v["name"], layer=v["op_name"], shape=v["shape"],
                 kind="codes" if v["category"] == "codes" else "floats", bytes=v["bytes"])
            for v in peak["largest"]
        ),
    )


def accelerator():
    """The first device's kind, or "CPU only"."""
    device = jax.devices()[0]
    return "CPU only" if device.platform == "cpu" else device.device_kind


def versions():
    return {"jax": jax.__version__}


def facts():
    """jax's version, the kernels, the device, and how memory is measured."""
    from keras_blpa import memory

    try:
        with memory.PeakMemory() as peak:
            pass
        stats = f"available on {peak.device} (peak since the process started)"
    except memory.MemoryStatsUnavailable:
        stats = "compiled step only (keras_blpa.memory.compiled_step_memory)"
    return {
        "jax": jax.__version__,
        "kernels": "jnp (keras_blpa.backends.jax, compiled by XLA)",
        "device": f"{jax.devices()[0]} ({jax.devices()[0].device_kind})",
        "memory_stats": stats,
    }
