"""Readable memory reports: the activation bytes a training step keeps for backprop.

`MemoryReport` is what `keras_blpa.memory_report` and
``keras_blpa.convert(..., return_report=True)`` return. Per layer it lists the
bytes of activations that the layer's backward pass keeps alive from the forward
pass to the backward pass, before and after conversion, and why a layer still
keeps float activations.

How the figures relate to the allocator. During one training step, the peak
memory is reached at the start of the backward pass, when every kept activation
is alive at once; it is about

    weights + gradients + optimizer slots + kept activations + transient working set

where the transient working set is what one layer's backward (or forward)
allocates at a time: a few tensors of the size of the largest activation. The
first three terms do not change with conversion, so the measured peak
difference between the original and the converted model equals
``report.saved_bytes`` to within ``report.transient_bytes``: three times the
largest float activation with the native kernels (incoming gradient, decoded
activation, result), eight times with the pure-TensorFlow fallback, whose
unfused kernels hold a few more full-size temporaries. Measured on ResNet50V2
(64x64, batch 32, 4 bits): 164.8 MiB saved vs 169.5 MiB reported (native,
transient 27.1 MiB), 109 to 125 MiB (pure TF, from run to run, transient 72
MiB). A tensor kept by several layers (a ReLU output also read by the next
conv) is counted once, at the first layer that keeps it.
"""

import dataclasses

__all__ = ["LayerMemory", "MemoryReport"]


def _mib(n):
    return f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass(frozen=True)
class LayerMemory:
    """One layer of the report.

    Attributes:
        name: layer name in the analysed (original) model.
        layer_type: its class name.
        before: bytes its backward keeps in the original model.
        after: bytes kept after conversion (by the block it went into, for a
            converted layer: the K-bit code, counted on the BatchNormalization).
        converted_into: name of the ApproxConvBlock it went into, or None.
        reason: why it still keeps float activations (None when it keeps none
            or was converted), or, for a row of `codes`, what it keeps.
        codes: True when what it keeps after conversion is a code, not float
            activations: the argmax of an ArgmaxPooling2D, or of a
            MaxPooling2D that `convert` makes one. Such rows are not in `still_float`.
    """

    name: str
    layer_type: str
    before: int
    after: int
    converted_into: object = None
    reason: object = None
    codes: bool = False


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    """Activation bytes kept for the backward pass, before and after conversion.

    Attributes:
        layers: list of `LayerMemory`, in topological order.
        batch_shapes: the model input shapes analysed (batch included).
        bits: bits of the code of each converted block (None: exact backward).
        transient_bytes: the scale of the transient working set (see module
            docstring), the tolerance between ``saved_bytes`` and the measured
            peak difference.
        blocks: ``{block name: [names of the original layers it replaces]}``.
    """

    layers: list
    batch_shapes: list
    bits: object
    transient_bytes: int
    blocks: dict

    @property
    def before_bytes(self):
        """Total bytes kept before conversion."""
        return sum(row.before for row in self.layers)

    @property
    def after_bytes(self):
        """Total bytes kept after conversion."""
        return sum(row.after for row in self.layers)

    @property
    def saved_bytes(self):
        """before_bytes - after_bytes."""
        return self.before_bytes - self.after_bytes

    @property
    def converted(self):
        """Rows of the layers that went into compressed blocks."""
        return [row for row in self.layers if row.converted_into is not None]

    @property
    def still_float(self):
        """Rows that still keep float activations after conversion, with reasons."""
        return [
            row
            for row in self.layers
            if row.converted_into is None and row.after > 0 and not row.codes
        ]

    @property
    def float_after_bytes(self):
        """Bytes still kept as float activations after conversion."""
        return sum(row.after for row in self.still_float)

    def summary(self, max_rows=None):
        """The report as text: totals, then one line per layer keeping bytes."""
        lines = [
            f"keras_blpa memory report (inputs {self.batch_shapes}, bits={self.bits})",
            f"  activations kept for backprop: {_mib(self.before_bytes)} -> "
            f"{_mib(self.after_bytes)} (saved {_mib(self.saved_bytes)}, "
            f"{self.before_bytes / max(self.after_bytes, 1):.2f}x)",
            f"  converted: {len(self.blocks)} blocks from "
            f"{len(self.converted)} layers; argmax codes: "
            f"{_mib(sum(r.after for r in self.layers if r.codes))} in "
            f"{sum(r.codes for r in self.layers)} poolings; still float: "
            f"{_mib(self.float_after_bytes)} in {len(self.still_float)} layers",
            f"  transient working set (peak tolerance): ~{_mib(self.transient_bytes)}",
            f"  {'layer':<36} {'type':<20} {'before':>12} {'after':>12}  note",
        ]
        rows = [r for r in self.layers if r.before or r.after]
        for row in rows[:max_rows]:
            if row.converted_into is not None:
                note = f"-> {row.converted_into}"
            else:
                note = row.reason or ""
            lines.append(
                f"  {row.name:<36.36} {row.layer_type:<20.20} "
                f"{_mib(row.before):>12} {_mib(row.after):>12}  {note}"
            )
        if max_rows is not None and len(rows) > max_rows:
            lines.append(f"  ... {len(rows) - max_rows} more rows")
        return "\n".join(lines)

    def __str__(self):
        return self.summary()
