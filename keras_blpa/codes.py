"""Sizes and constants of the K-bit code, shared by every implementation.

The code itself is defined in `keras_blpa.reference` (TensorFlow, the oracle);
the native kernels (cc/) and `keras_blpa.jax_ops` implement the same one. This
module needs neither TensorFlow nor JAX.
"""

__all__ = ["GAMMA_FLOOR", "codes_per_byte", "packed_size"]

# |gamma| is floored here to keep the bin width finite.
GAMMA_FLOOR = 1e-8


def codes_per_byte(bits):
    """Codes packed into one byte: 1, 2 or 4 at 8, 4 or 2 bits."""
    return 8 // bits


def packed_size(num_elements, bits):
    """Number of bytes that hold `num_elements` codes of `bits` bits."""
    per = codes_per_byte(bits)
    return (num_elements + per - 1) // per
