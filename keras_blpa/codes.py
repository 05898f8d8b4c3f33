"""Sizes and constants of the K-bit code, shared by every implementation.

The code itself is defined in `keras_blpa.backends.tensorflow.reference`
(TensorFlow, the oracle); the native ops (cc/) and `keras_blpa.backends.jax`
implement the same one. This module needs neither TensorFlow nor JAX.
"""

__all__ = ["GAMMA_FLOOR", "PAPER_WINDOW", "VALID_BITS", "WIDE_WINDOW", "codes_per_byte", "packed_size"]

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


def codes_per_byte(bits):
    """Codes packed into one byte: 1, 2 or 4 at 8, 4 or 2 bits."""
    return 8 // bits


def packed_size(num_elements, bits):
    """Number of bytes that hold `num_elements` codes of `bits` bits."""
    per = codes_per_byte(bits)
    return (num_elements + per - 1) // per
