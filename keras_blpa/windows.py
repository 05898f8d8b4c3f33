"""Max-pooling windows: their geometry and the argmax code, shared by the backends.

`ArgmaxPooling2D` keeps, per output element, the index of its window's max in
row-major window order (``i * pool_width + j`` for window row i, column j): a
uint8 when the window has at most 256 positions, an int32 otherwise. This
module needs neither TensorFlow nor JAX.
"""

import dataclasses

__all__ = ["Window", "index_dtype"]


def index_dtype(positions):
    """The argmax code's dtype for a window of `positions` elements."""
    return "uint8" if positions <= 256 else "int32"


@dataclasses.dataclass(frozen=True)
class Window:
    """One 2D pooling geometry on an NHWC input of spatial size `size`.

    "same" pads as TensorFlow and ``lax.reduce_window(padding="SAME")`` do: the
    total ``max((out - 1) * stride + pool - size, 0)``, half of it (rounded
    down) before. Padded positions are never the max (-inf semantics).
    """

    size: tuple  # (height, width) of the input
    pool_size: tuple
    strides: tuple
    padding: str  # "valid" or "same"

    def _axis(self, axis):
        n, k, s = self.size[axis], self.pool_size[axis], self.strides[axis]
        if self.padding == "valid":
            return (n - k) // s + 1, 0, 0
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        return out, total // 2, total - total // 2

    @property
    def output_size(self):
        """(height, width) of the output."""
        return tuple(self._axis(a)[0] for a in (0, 1))

    @property
    def pads(self):
        """((top, bottom), (left, right)) of the -inf padding."""
        return tuple(self._axis(a)[1:] for a in (0, 1))

    @property
    def padded_size(self):
        (top, bottom), (left, right) = self.pads
        return self.size[0] + top + bottom, self.size[1] + left + right

    @property
    def positions(self):
        return self.pool_size[0] * self.pool_size[1]

    @property
    def index_dtype(self):
        return index_dtype(self.positions)

    def offsets(self):
        """[(k, i, j)]: window position k at row i, column j, from the last to the first.

        The JAX backend visits the positions in this order: the argmax keeps
        the first position equal to the max (the last one written), and the
        backward adds the contributions to an input element in the outputs'
        row-major order, as TensorFlow's MaxPoolGrad (without oneDNN) and
        XLA's select_and_scatter do. (The TensorFlow backend takes the same
        first maximum from ``MaxPoolWithArgmax``.)
        """
        width = self.pool_size[1]
        return [(k, k // width, k % width) for k in reversed(range(self.positions))]

    def slice_end(self, i, j):
        """The exclusive (row, column) end of the strided slice of offset (i, j)."""
        (ho, wo), (sh, sw) = self.output_size, self.strides
        return i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1
