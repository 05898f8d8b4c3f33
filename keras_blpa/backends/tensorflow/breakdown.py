"""What is alive at a TensorFlow training step's peak, from the allocator's own events.

TensorFlow's profiler records every allocation and release of the BFC
allocator (``MemoryAllocation`` / ``MemoryDeallocation``, with the op, shape,
dtype, requested and chunk bytes, and the allocator's total after each event).
`step_breakdown` runs one training step under the profiler, replays those
events, and returns the set alive at the highest total, by kind.
"""

import collections
import os
import tempfile

import tensorflow as tf

__all__ = ["step_breakdown"]

_UINT8 = 4  # tensorflow.DataType.DT_UINT8
_TOP = 8  # the largest live tensors listed


def _events(logdir):
    """(time, is_allocation, stats) of the allocator events in the profile, in order."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = [
        os.path.join(root, name)
        for root, _, names in os.walk(logdir)
        for name in names
        if name.endswith(".xplane.pb")
    ]
    events = []
    for path in paths:
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            names = {k: v.name for k, v in plane.event_metadata.items()}
            stat_names = {k: v.name for k, v in plane.stat_metadata.items()}
            for line in plane.lines:
                for event in line.events:
                    name = names.get(event.metadata_id, "")
                    if name not in ("MemoryAllocation", "MemoryDeallocation"):
                        continue
                    stats = {}
                    for stat in event.stats:
                        kind = stat.WhichOneof("value")
                        value = getattr(stat, kind)
                        stats[stat_names[stat.metadata_id]] = (
                            stat_names[value] if kind == "ref_value" else value
                        )
                    t = line.timestamp_ns * 1000 + event.offset_ps
                    events.append((t, name == "MemoryAllocation", stats))
    events.sort(key=lambda e: e[0])
    return events


def step_breakdown(model, x, y):
    """One training step (``model.train_on_batch``) under the profiler: what is live at its peak.

    Run it after a first step (tracing and optimizer state); the allocator
    must keep statistics (`keras_blpa.memory.enable_cpu_statistics` on the CPU).
    Returns a `keras_blpa.memory.StepBreakdown`: ``resident`` is what was
    allocated before the step and is still held (weights, optimizer state,
    the batch, constants the graph keeps); ``codes`` the uint8 tensors the step
    made (the packed codes, pooling argmax indices); ``floats`` every other
    tensor the step made; ``fragmentation`` what the allocator's chunks hold
    beyond the requested bytes of the live tensors.
    """
    from keras_blpa.memory import MemoryStatsUnavailable
    from keras_blpa.memory import StepBreakdown

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            model.train_on_batch(x, y)
        finally:
            tf.profiler.experimental.stop()
        events = _events(logdir)
    if not events:
        raise MemoryStatsUnavailable(
            "TensorFlow's profiler recorded no allocator events: the allocator keeps no "
            "statistics (on the CPU call keras_blpa.memory.enable_cpu_statistics() before "
            "TensorFlow's first op)"
        )
    # The first event at the highest total, then the tensors alive after it.
    peak = max(range(len(events)), key=lambda i: (events[i][2]["bytes_allocated"], -i))
    peak_total, peak_op = events[peak][2]["bytes_allocated"], events[peak][2].get("tf_op", "")
    peak_live = {}
    for _, allocation, stats in events[: peak + 1]:
        if allocation:
            peak_live[stats["addr"]] = stats
        else:
            peak_live.pop(stats["addr"], None)
    totals = collections.Counter()
    largest = collections.Counter()
    for stats in peak_live.values():
        kind = "codes" if stats.get("data_type") == _UINT8 else "floats"
        totals[kind] += stats["requested_bytes"]
        totals["fragmentation"] += stats["allocation_bytes"] - stats["requested_bytes"]
        op = stats.get("tf_op", "?").split("/")
        largest[(op[-1], _layer(op), stats.get("shape", ""), kind)] += stats["requested_bytes"]
    made = sum(s["allocation_bytes"] for s in peak_live.values())
    return StepBreakdown(
        peak_bytes=peak_total,
        resident_bytes=peak_total - made,
        codes_bytes=totals["codes"],
        float_bytes=totals["floats"],
        fragmentation_bytes=totals["fragmentation"],
        peak_op=peak_op,
        largest=tuple(
            dict(op=op, layer=layer, shape=shape, kind=kind, bytes=b)
            for (op, layer, shape, kind), b in largest.most_common(_TOP)
        ),
    )


def _layer(op_path):
    """The layer scope of a tf_op path ("gradient_tape/model/layer_1/..." -> "layer")."""
    parts = [p for p in op_path[:-1] if p != "gradient_tape"]
    return parts[1].removesuffix("_1") if len(parts) > 1 else ""
