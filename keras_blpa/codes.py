"""Sizes and constants of the K-bit code, shared by every implementation.

The code itself is defined in `keras_blpa.backends.tensorflow.reference`
(TensorFlow, the oracle); the native ops (cc/) and `keras_blpa.backends.jax`
implement the same one. This module needs neither TensorFlow nor JAX.
"""

__all__ = [
    "GAMMA_FLOOR", "PAPER_WINDOW", "VALID_BITS", "WIDE_WINDOW", "WINDOW_GRID", "codes_per_byte",
    "data_window", "packed_size",
]

# Code widths the block supports.
VALID_BITS = (2, 4, 8)

# |gamma| is floored here to keep the bin width finite.
GAMMA_FLOOR = 1e-8

# Width of the code's window of 2^K bins, in units of |gamma| (the BN output's
# standard deviation), centred on beta: the paper's beta +- 3 |gamma|, and
# beta +- 8 |gamma| for the 8-bit codes of activations without an exact mask
# (`keras_blpa.blocks.Activation.window`).
PAPER_WINDOW = 6.0
WIDE_WINDOW = 16.0
# The batch-sized window (`data_window`) is rounded up to this grid, so that
# float rounding in the batch statistics (TensorFlow vs XLA) rarely moves it.
WINDOW_GRID = 0.5


def data_window(spread, ceil, clip, where, isnan):
    """Per-channel window width for a code that follows the batch
    (`keras_blpa.blocks.Activation.follows_data`), in units of |gamma|.

    `spread` is the largest |y - beta| / |gamma| of the channel in the batch (its
    farthest value from beta, in BN standard deviations). The window's
    half-width lies midway between the paper's 3 and that value, rounded up to
    `WINDOW_GRID`, within [3, 8]: ``W = clip(ceil((spread + 3) / g) * g, 6, 16)``.
    A Gaussian channel (spread 4-5) gets 7-8 |gamma|, a heavy-tailed one
    (spread 11) 14 |gamma|. NaN (from a NaN input) gives
    the paper's window. The backend passes its own ``ceil``, ``clip(t, low,
    high)``, ``where`` and ``isnan``.
    """
    w = clip(ceil((spread + PAPER_WINDOW / 2.0) * (1.0 / WINDOW_GRID)) * WINDOW_GRID,
             PAPER_WINDOW, WIDE_WINDOW)
    return where(isnan(spread), PAPER_WINDOW, w)


def codes_per_byte(bits):
    """Codes packed into one byte: 1, 2 or 4 at 8, 4 or 2 bits."""
    return 8 // bits


def packed_size(num_elements, bits):
    """Number of bytes that hold `num_elements` codes of `bits` bits."""
    per = codes_per_byte(bits)
    return (num_elements + per - 1) // per
