"""The K-bit code against an independent numpy implementation of the paper's formula."""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from keras_blpa import quantization
from keras_blpa.backends.tensorflow import reference

BITS = (2, 4, 8)


def flush(a):
    """float32 with subnormals flushed to (signed) zero, as TensorFlow's CPU ops
    compute (flush-to-zero and denormals-are-zero)."""
    a = np.asarray(a, np.float32)
    return np.where(np.abs(a) < np.finfo(np.float32).tiny, np.copysign(np.float32(0), a), a)


def numpy_codes(y, gamma, beta, bits):
    """Paper formula in numpy: bins 6/2^K of the BN std, ReLU threshold on a bin edge;
    the window centred on beta even where it does not contain 0 (then one end code
    alone holds the other side of 0)."""
    levels = 2.0**bits
    gamma, beta = flush(gamma), flush(beta)
    g = np.where(gamma >= 0, np.maximum(gamma, 1e-8), np.minimum(gamma, -1e-8)).astype(np.float32)
    abs_g = np.abs(g)
    inv_step = (np.float32(levels) / (np.float32(6.0) * abs_g)).astype(np.float32)
    centre = np.floor(flush(flush(beta / abs_g) * np.float32(levels / 6.0)))
    shift = np.clip(levels / 2 - centre, -2.0**24, 2.0**24).astype(np.float32)
    edge = np.clip(shift, 1, levels - 1)
    with np.errstate(invalid="ignore", over="ignore"):
        raw = np.floor((y * inv_step).astype(np.float32)) + shift
        t = np.where(y > 0, np.maximum(raw, edge), np.minimum(raw, edge - 1))
        t = np.clip(t, 0, levels - 1)
    t = np.where(np.isnan(t), 0, t)
    step = (abs_g * np.float32(6.0 / levels)).astype(np.float32)
    return t.astype(np.uint8), raw, step


def numpy_pack(codes, bits):
    per = 8 // bits
    flat = codes.reshape(-1).astype(np.uint8)
    flat = np.concatenate([flat, np.zeros((-flat.size) % per, np.uint8)])
    groups = flat.reshape(-1, per)
    return np.bitwise_or.reduce(groups << (bits * np.arange(per, dtype=np.uint8)), axis=1).astype(np.uint8)


def encode_np(y, gamma, beta, bits):
    return quantization.encode(y, gamma, beta, bits).numpy()


channel_data = st.tuples(st.integers(1, 9), st.integers(1, 5)).flatmap(
    lambda rc: st.tuples(
        hnp.arrays(np.float32, rc, elements=st.floats(-8, 8, width=32, allow_subnormal=False)),
        hnp.arrays(np.float32, rc[1:], elements=st.floats(-3, 3, width=32)),
        hnp.arrays(np.float32, rc[1:], elements=st.floats(-2, 2, width=32)),
    )
)


@settings(max_examples=60, deadline=None)
@given(data=channel_data, bits=st.sampled_from(BITS))
def test_codes_match_numpy_formula_and_mask_is_exact(data, bits):
    y, gamma, beta = data
    packed = encode_np(y, gamma, beta, bits)
    codes, raw, step = numpy_codes(y, gamma, beta, bits)
    np.testing.assert_array_equal(packed, numpy_pack(codes, bits))
    y_dec, mask = quantization.decode(packed, y.shape, gamma, beta, bits)
    # The ReLU mask read back from the codes is exactly y > 0, element by element.
    np.testing.assert_array_equal(mask.numpy(), y > 0)
    # In its own bin (the code neither clipped nor moved across 0) the decoded
    # value is within half a bin.
    inside = codes == raw
    err = np.abs(y_dec.numpy() - y)
    half_bin = np.broadcast_to(step / 2, y.shape)
    assert np.all(err[inside] <= half_bin[inside] * (1 + 1e-4) + 1e-6)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8, 9, 1001])
def test_pack_unpack_round_trip_odd_sizes(bits, n):
    rng = np.random.default_rng(n)
    codes = rng.integers(0, 2**bits, size=n).astype(np.uint8)
    packed = reference.pack(codes, bits).numpy()
    assert packed.shape == (quantization.packed_size(n, bits),)
    np.testing.assert_array_equal(packed, numpy_pack(codes, bits))
    np.testing.assert_array_equal(reference.unpack(packed, n, bits).numpy(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_nan_inf_and_out_of_range(bits):
    gamma, beta = np.array([1.0], np.float32), np.array([0.0], np.float32)
    y = np.array([[np.nan], [np.inf], [-np.inf], [0.0], [-0.0], [1e30], [-1e30], [1e-30]], np.float32)
    top = 2**bits - 1
    codes = reference.unpack(encode_np(y, gamma, beta, bits), y.size, bits).numpy()
    # NaN and -inf: code 0 (inactive); +inf and huge: top code; 0: just below the threshold.
    shift = 2 ** (bits - 1)
    np.testing.assert_array_equal(codes, [0, top, 0, shift - 1, shift - 1, top, 0, shift])
    y_dec, mask = quantization.decode(encode_np(y, gamma, beta, bits), y.shape, gamma, beta, bits)
    assert np.all(np.isfinite(y_dec.numpy()))
    np.testing.assert_array_equal(mask.numpy()[:, 0], [False, True, False, False, False, True, False, True])


def test_negative_gamma_and_tiny_gamma_keep_mask_exact():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(64, 4)).astype(np.float32)
    gamma = np.array([-1.5, 0.0, 1e-12, -0.3], np.float32)
    beta = np.array([0.2, -0.1, 0.5, 0.0], np.float32)
    for bits in BITS:
        packed = encode_np(y, gamma, beta, bits)
        _, mask = quantization.decode(packed, y.shape, gamma, beta, bits)
        np.testing.assert_array_equal(mask.numpy(), y > 0)


def test_unknown_batch_and_xla():
    gamma = tf.constant([1.0, 0.5, -2.0])
    beta = tf.constant([0.1, -0.4, 0.3])

    def round_trip(y):
        packed = quantization.encode(y, gamma, beta, 4)
        return quantization.decode(packed, tf.shape(y), gamma, beta, 4)

    spec = tf.TensorSpec([None, 5, 3], tf.float32)
    y = tf.random.normal([7, 5, 3], seed=1)
    eager = round_trip(y)
    for jit in (False, True):
        fn = tf.function(round_trip, input_signature=[spec], jit_compile=jit)
        y_dec, mask = fn(y)
        np.testing.assert_array_equal(y_dec.numpy(), eager[0].numpy())
        np.testing.assert_array_equal(mask.numpy(), eager[1].numpy())


def test_bits_validation_names_value():
    with pytest.raises(ValueError, match="bits=3"):
        quantization.encode(tf.zeros([2, 2]), tf.ones([2]), tf.zeros([2]), bits=3)


@pytest.mark.parametrize("bits", BITS)
def test_saturated_windows_keep_the_data_and_the_sign(bits):
    """Windows wholly above 0 (beta = 10 |gamma|) and below (beta = -10 |gamma|): the
    codes of the values around beta keep their bins (decoded within half a bin), one end
    code holds the other side of 0, the mask is exactly y > 0, and every decoded value
    lies on its own side of 0."""
    gamma = np.array([1.0, -2.0, 0.5, -1.0], np.float32)
    beta = np.array([10.0, 20.0, -5.0, -10.0], np.float32)
    rng = np.random.default_rng(9)
    y = (beta + np.abs(gamma) * rng.normal(size=(400, 4))).astype(np.float32)
    y = np.concatenate([y, [[-0.5, -3.0, 0.25, 2.0], [0.0, 1e-3, -1e-3, 0.0]]]).astype(np.float32)
    packed = encode_np(y, gamma, beta, bits)
    y_dec, mask = (t.numpy() for t in quantization.decode(packed, y.shape, gamma, beta, bits))
    np.testing.assert_array_equal(mask, y > 0)
    assert np.all(y_dec[y > 0] >= 0) and np.all(y_dec[y <= 0] <= 0)
    codes, raw, step = numpy_codes(y, gamma, beta, bits)
    own = codes == raw  # in its own bin: neither clipped nor moved across 0
    assert own.sum() > 0.75 * y.size
    err = np.abs(y_dec - y)
    assert np.all(err[own] <= np.broadcast_to(step / 2, y.shape)[own] * (1 + 1e-4) + 1e-6)
