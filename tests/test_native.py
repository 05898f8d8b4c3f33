"""Native (C++/CUDA) quantisation ops against the pure-TF reference (the oracle).

Native-path tests skip with the loader's reason when the op library is not
built, and FAIL instead when KERAS_BLPA_REQUIRE_NATIVE=1 (CI sets it after
building the library).
"""

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import tensorflow as tf

from keras_blpa.backends.tensorflow import native
from keras_blpa.backends.tensorflow import native_build
from keras_blpa.backends.tensorflow import reference
from keras_blpa.blocks import Activation
from keras_blpa.codes import packed_size

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
X86 = platform.machine().lower() in ("x86_64", "amd64")
# What the CPU kernels report: the names KERAS_BLPA_CPU_ISA takes on x86, else "baseline".
ISA_NAMES = native.CPU_ISA_LEVELS if X86 else ("baseline",)


def _require_native():
    return os.environ.get("KERAS_BLPA_REQUIRE_NATIVE", "") == "1"


@pytest.fixture(scope="module")
def ops():
    """The loaded native kernels; skip (or fail under REQUIRE_NATIVE) if absent."""
    if native.pure_tf_forced():
        reason = "KERAS_BLPA_PURE_TF=1 forces the pure-TF path"
        loaded = None
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = native.load()
        reason = f"native op library unavailable: {native.load_error()}"
    if loaded is None:
        if _require_native():
            pytest.fail(f"KERAS_BLPA_REQUIRE_NATIVE=1 but {reason}")
        pytest.skip(reason)
    return loaded


# Every activation of the block, leaky_relu with two slopes.
ACTIVATIONS = [
    Activation("relu"),
    Activation("relu6"),
    Activation("leaky_relu", 0.1),
    Activation("leaky_relu", 0.3),
    Activation("linear"),
    Activation("silu"),
    Activation("gelu"),
    Activation("gelu_approximate"),
    Activation("hard_silu"),
]
# Those whose native decoded values are TF's bit for bit; the other ones call
# libm's exp / erfc / tanh where TF has Eigen's approximations. The forward
# output is TF's bits for every activation (silu and gelu: TF's own op on the
# native linear y, native.py), asserted by _assert_values(..., exact=True).
EXACT_VALUES = ("relu", "relu6", "leaky_relu", "linear", "hard_silu")


def _act_id(act):
    return act.name + (f"{act.negative_slope:g}" if act.name == "leaky_relu" else "")


# (bits, activation) of the kernel comparisons: every activation at 4 bits, and
# the 2- and 8-bit packings and bins with relu, relu6 (its own bins) and silu
# (the smooth tables); the activation code is the same struct at every width.
GRID = [(4, act) for act in ACTIVATIONS] + [
    (bits, act) for bits in (2, 8) for act in ACTIVATIONS if _act_id(act) in ("relu", "relu6", "silu")
]
GRID_IDS = [f"{bits}-{_act_id(act)}" for bits, act in GRID]


def _params(channels, bits, rng, negative_gamma=True, act=None):
    gamma = rng.uniform(0.2, 2.0, channels).astype(np.float32)
    if negative_gamma:
        gamma[1::3] *= -1.0
    beta = rng.normal(size=channels).astype(np.float32)
    p = reference.channel_params(gamma, beta, bits, act or Activation())
    inv_std = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    mean = rng.normal(scale=0.3, size=channels).astype(np.float32)
    scale = tf.constant(gamma * inv_std)
    offset = tf.constant(beta) - tf.constant(mean) * scale  # as the layer does
    return p, scale, offset


SPECIALS = np.array(
    [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30, 1e-40, -1e-40], np.float32
)


def _input(shape, rng, specials=True):
    x = (2.0 * rng.normal(size=shape)).astype(np.float32)
    if specials and x.size:
        flat = x.reshape(-1)  # a view: writes go into x
        idx = np.arange(0, flat.size, max(1, flat.size // 40))
        flat[idx] = np.resize(SPECIALS, idx.size)  # spread over the tensor
        k = min(flat.size, SPECIALS.size)
        flat[:k] = SPECIALS[:k]  # and all of them in the first elements
    return x


def _bits_of(t):
    return np.asarray(t).view(np.uint32)


SHAPES = [
    (1, 1, 1, 1),
    (1, 3, 5, 1),
    (2, 7, 7, 3),
    (3, 5, 7, 3),
    (1, 1, 1, 257),
    (1, 13, 1, 255),
    (2, 9),
    (11,),
    (4, 6, 6, 64),
]


def _assert_values(act, got, want, y, exact=False):
    """got == want bit for bit (NaN and -0 included) when `exact` or for the
    exact activations; else equal to float32 rounding: NaN and infinities in the
    same places and |got - want| <= 4 ulp(want) + 4 ulp(y), the second term for
    TF's own cancellation in 0.5 y (1 + tanh) (or y * sigmoid) where f(y) is tiny."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    if exact or act.name in EXACT_VALUES:
        np.testing.assert_array_equal(_bits_of(got), _bits_of(want))
        return
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    np.testing.assert_array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    y = np.broadcast_to(np.asarray(y, np.float32), want.shape)[finite]
    tol = 4 * np.spacing(np.abs(want[finite])) + 4 * np.spacing(np.abs(y))
    err = np.abs(got[finite].astype(np.float64) - want[finite])
    assert np.all(err <= tol), f"max error {np.max(err / tol):.2f} x tolerance"


@pytest.mark.parametrize("bits, act", GRID, ids=GRID_IDS)
def test_encode_bit_identical(ops, bits, act):
    """Codes bit for bit, f(y) and the decoded output as the reference, every shape."""
    for shape in SHAPES:
        rng = np.random.default_rng(hash((bits, act.name) + shape) % 2**32)
        x = _input(shape, rng)
        p, scale, offset = _params(shape[-1], bits, rng, act=act)
        enc = (x, scale, offset, p["inv_step"], p["shift"], bits, act)
        want_a, want_codes = reference.bn_act_encode(*enc)
        got_a, got_codes = ops.bn_act_encode(*enc)
        assert got_codes.dtype == tf.uint8 and got_codes.shape == want_codes.shape
        np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy(), err_msg=str(shape))
        # f(y) bit for bit for every activation, NaN and -0 included.
        y = tf.cast(x, tf.float32) * scale + offset
        _assert_values(act, got_a, want_a, y, exact=True)

        dec = (want_codes, tf.shape(x), p["step"], p["shift"], bits, act)
        want_dec = reference.decode_activation(*dec)
        got_dec = ops.decode_activation(*dec)
        assert got_dec.shape == x.shape
        y_dec, _ = reference.decode(want_codes, tf.shape(x), p["step"], p["shift"], bits)
        _assert_values(act, got_dec, want_dec, y_dec)


def _edge_case(bits, act):
    """(y, gamma, beta) with the values where codes can go wrong: y exactly 0, 6
    and the bin edges, NaN, +-inf, huge and tiny y; negative and tiny (floored)
    gamma, |beta| = 10 |gamma| (saturated shifts) and 6 just inside, on and past
    the window's end."""
    gamma = np.array([1.0, -0.5, 2.0, 1e-9, -1e-9, 0.3, -0.3, 1.0, 0.05, 1.5], np.float32)
    beta = np.array([0.0, 0.7, -1.3, 0.0, 1e-9, 3.0, -3.0, -10.0, 0.5, 15.0], np.float32)
    base = np.array([0.0, -0.0, 6.0, -6.0, 3.0, -3.0, 5.999999, 6.000001, np.nan, np.inf,
                     -np.inf, 1e30, -1e30, 1e-40, -1e-40, 1e-30], np.float32)
    p = dict(reference.channel_params(gamma, beta, bits, act))
    # Two channels with set bins where round(6 * inv_step) is not floor (2.7)
    # and is a tie (4.5, to even), for relu6's upper code.
    extra = {"inv_step": [0.45, 0.75], "step": [1 / 0.45, 1 / 0.75], "shift": [2.0, 3.0],
             "gamma": [1.0, 1.0], "beta": [0.0, 0.0]}
    p = {k: tf.concat([v, tf.constant(extra[k], tf.float32)], 0) for k, v in p.items()}
    gamma = np.concatenate([gamma, np.float32([1.0, 1.0])])
    # Every bin edge of each channel, and just beside it.
    edges = (np.arange(2**bits + 1, dtype=np.float32)[:, None] - p["shift"].numpy()) * p["step"].numpy()
    beside = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    y = np.concatenate([np.repeat(base[:, None], gamma.size, 1), beside.astype(np.float32)])
    return y, gamma, beta, p


@pytest.mark.parametrize("act", ACTIVATIONS, ids=_act_id)
def test_edge_inputs_bit_identical(ops, act):
    for bits in (2, 4, 8):
        y, gamma, beta, p = _edge_case(bits, act)
        ones, zeros = tf.ones([gamma.size]), tf.zeros([gamma.size])
        enc = (y, ones, zeros, p["inv_step"], p["shift"], bits, act)
        want_a, want_codes = reference.bn_act_encode(*enc)
        got_a, got_codes = ops.bn_act_encode(*enc)
        np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy(), err_msg=f"bits={bits}")
        _assert_values(act, got_a, want_a, y, exact=True)
        dec = (want_codes, y.shape, p["step"], p["shift"], bits, act)
        y_dec, _ = reference.decode(want_codes, y.shape, p["step"], p["shift"], bits)
        _assert_values(act, ops.decode_activation(*dec), reference.decode_activation(*dec), y_dec)
        grad_a = np.resize(np.array([1.0, -2.0, 0.5, -0.25], np.float32), y.shape)
        args = (want_codes, grad_a, p["step"], p["shift"], p["gamma"], p["beta"])
        _check_grads(ops, act, bits, y.shape, args, tf.ones([gamma.size]))
    if act.name == "relu6":  # y == 6 is on an edge: the codes tell it apart
        codes = reference.unpack(got_codes, y.size, 8).numpy().reshape(y.shape)
        upper = reference._relu6_upper(p["shift"], p["inv_step"], 8).numpy()
        assert np.all((codes >= upper) == (y >= 6.0))


@pytest.mark.parametrize("act", [Activation("leaky_relu", 1.7), Activation("leaky_relu", 0.0)],
                         ids=_act_id)
def test_leaky_relu_any_slope_bit_identical(ops, act):
    """TF's LeakyRelu is y > 0 ? y : slope * y for any slope (not max(y, slope * y))."""
    rng = np.random.default_rng(5)
    x = _input((3, 7, 5), rng)
    p, scale, offset = _params(5, 4, rng, act=act)
    enc = (x, scale, offset, p["inv_step"], p["shift"], 4, act)
    (want_a, want_codes), (got_a, got_codes) = reference.bn_act_encode(*enc), ops.bn_act_encode(*enc)
    np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy())
    np.testing.assert_array_equal(_bits_of(got_a), _bits_of(want_a))
    dec = (want_codes, x.shape, p["step"], p["shift"], 4, act)
    np.testing.assert_array_equal(_bits_of(ops.decode_activation(*dec)),
                                  _bits_of(reference.decode_activation(*dec)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_large_tensor_bit_identical(ops, bits):
    rng = np.random.default_rng(bits)
    shape = (64, 32, 32, 64)  # a real block activation: 4M elements, odd packing too
    x = _input(shape, rng)
    p, scale, offset = _params(64, bits, rng)
    want_a, want_codes = reference.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)
    got_a, got_codes = ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)
    np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy())
    np.testing.assert_array_equal(_bits_of(got_a), _bits_of(want_a))
    odd = (3, 31, 33, 65)  # n not a multiple of 4, C not a multiple of the tile
    x = _input(odd, rng)
    p, scale, offset = _params(65, bits, rng)
    _, want_codes = reference.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)
    _, got_codes = ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)
    np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy())


def test_every_code_value_round_trips(ops):
    """A ramp through every bin of every code, for both gamma signs."""
    for bits in (2, 4, 8):
        levels = 2**bits
        gamma = np.array([1.0, -0.5, 2.0], np.float32)
        beta = np.array([0.0, 0.7, -1.3], np.float32)
        p = reference.channel_params(gamma, beta, bits)
        ramp = np.linspace(-4.0, 4.0, 8 * levels + 3, dtype=np.float32)
        y = np.stack([ramp * abs(g) + b for g, b in zip(gamma, beta)], axis=-1)
        ones, zeros = tf.ones([3]), tf.zeros([3])
        _, want = reference.bn_act_encode(y, ones, zeros, p["inv_step"], p["shift"], bits)
        _, got = ops.bn_act_encode(y, ones, zeros, p["inv_step"], p["shift"], bits)
        np.testing.assert_array_equal(got.numpy(), want.numpy())
        codes = reference.unpack(got, y.size, bits).numpy()
        assert codes.min() == 0 and codes.max() == levels - 1


def _grad_inputs(shape, bits, rng, act=None):
    act = act or Activation()
    x = _input(shape, rng, specials=False)
    p, scale, offset = _params(shape[-1], bits, rng, act=act)
    _, codes = reference.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits, act)
    grad_a = rng.normal(size=shape).astype(np.float32)
    return codes, grad_a, p, scale


def _check_grads(ops, act, bits, shape, args, coef):
    """bn_grad_reduce and bn_grad_input of the native ops against float64 sums of
    the reference's g = grad_a * f' and against the reference's bn_grad_input.
    Smooth activations add the rounding of their secant slope: the libm values
    f(lo), f(hi) differ from TF's by a few ulp of lo and hi, divided by the step."""
    codes, grad_a, step, shift, gamma, beta = args
    want_g, want_gx = reference.bn_grad_reduce(*args, bits, act)
    got_g, got_gx = ops.bn_grad_reduce(*args, bits, act)
    assert got_g.shape == want_g.shape == (shape[-1],)
    g, y_dec = reference._act_grad(codes, tf.constant(grad_a), step, shift, bits, act)
    g = g.numpy().astype(np.float64)
    x_hat = ((y_dec - beta) / gamma).numpy().astype(np.float64)
    slope_tol = np.zeros(shape)
    if act.name not in EXACT_VALUES:
        c = reference._codes(codes, shape, bits).numpy()
        st, sh = step.numpy(), shift.numpy()
        lo, hi = (c - sh) * st, (c + (1.0 - sh)) * st
        slope_tol = 8 * (np.spacing(np.abs(lo)) + np.spacing(np.abs(hi))) / st
    g_tol = np.abs(grad_a) * slope_tol
    axes = tuple(range(len(shape) - 1))
    exact_g, exact_gx = g.sum(axes), (g * x_hat).sum(axes)
    tol_g = 1e-5 * np.abs(g).sum(axes) + g_tol.sum(axes) + 1e-6
    tol_gx = 1e-5 * np.abs(g * x_hat).sum(axes) + (g_tol * np.abs(x_hat)).sum(axes) + 1e-6
    assert np.all(np.abs(got_g.numpy() - exact_g) <= tol_g)
    assert np.all(np.abs(got_gx.numpy() - exact_gx) <= tol_gx)
    assert np.all(np.abs(want_g.numpy() - exact_g) <= tol_g)  # the oracle too

    count = float(np.prod(shape[:-1]))
    mean_g, mean_gx = want_g / count, want_gx / count
    want_dx = reference.bn_grad_input(*args, coef, mean_g, mean_gx, bits, act)
    got_dx = ops.bn_grad_input(*args, coef, mean_g, mean_gx, bits, act)
    assert got_dx.shape == shape
    # The same quantity by another float formula (the reference expands it per
    # channel as coef * g + a * y_dec + b): equal to float32 rounding.
    want_dx = want_dx.numpy()
    coef = np.asarray(coef.numpy() if hasattr(coef, "numpy") else coef, np.float64)
    # Plus the rounding of the reference's two large terms, which cancel where
    # |beta| >> |gamma| (saturated channels): a * y_dec and b.
    a = -coef * mean_gx.numpy() / gamma.numpy()
    b = coef * (mean_gx.numpy() * beta.numpy() / gamma.numpy() - mean_g.numpy())
    big = np.abs(a * y_dec.numpy()) + np.abs(b)
    tol = 1e-5 * np.abs(want_dx) + 1e-6 + np.abs(coef) * g_tol + 4 * np.spacing(big.astype(np.float32))
    assert np.all(np.abs(got_dx.numpy() - want_dx) <= tol), np.max(np.abs(got_dx.numpy() - want_dx) / tol)


@pytest.mark.parametrize("bits, act", GRID, ids=GRID_IDS)
def test_grad_kernels_match_reference(ops, bits, act):
    for shape in [(1, 1, 1, 1), (3, 5, 7, 3), (2, 9, 9, 257), (16, 16, 16, 32)]:
        rng = np.random.default_rng(7 + bits)
        codes, grad_a, p, scale = _grad_inputs(shape, bits, rng, act)
        args = (codes, grad_a, p["step"], p["shift"], p["gamma"], p["beta"])
        _check_grads(ops, act, bits, shape, args, scale)


# Channels whose window does not contain 0: beta >= 3 |gamma| (shift < 1, the
# window wholly above 0), beta < -3 |gamma| (shift > 2^K - 1, wholly below),
# |beta| = 10 |gamma| as in pretrained BN layers, and |beta| so large that shift
# reaches its bound +-2^24; then the window's ends and two inside (not saturated).
SATURATED_GAMMA = np.array([1.0, -0.5, 2.0, 0.3, -0.3, 1.0, -1.0, 0.7, 1.2, 1.0, 0.8], np.float32)
SATURATED_BETA = np.array([10.0, 5.0, -20.0, 3.0, -3.01, 1e8, -1e8, 3.5, -3.7, 0.5, -0.2], np.float32)


def _saturated_case(bits, act, rng):
    """(y, params, gamma): values around each channel's window and 0, its bin
    edges and just beside them, specials."""
    gamma, beta = SATURATED_GAMMA, SATURATED_BETA
    p = reference.channel_params(gamma, beta, bits, act)
    top = 2**bits - 1
    shift = p["shift"].numpy()
    if act.name != "relu6":  # relu6's own bins keep shift in [1, top - 1]
        assert np.any(shift < 1) and np.any(shift > top) and np.any(np.abs(shift) == 2.0**24)
    ag, b = np.abs(gamma), beta
    spread = np.concatenate([
        b + ag * rng.uniform(-4.0, 4.0, (64, gamma.size)),  # the window
        ag * rng.uniform(-4.0, 4.0, (32, gamma.size)),  # around 0
        rng.normal(size=(16, gamma.size)) * 10.0 ** rng.uniform(-40, 9, (16, gamma.size)),
    ]).astype(np.float32)
    edges = ((np.arange(top + 2, dtype=np.float32)[:, None] - shift) * p["step"].numpy())
    beside = np.concatenate([edges, np.nextafter(edges, np.inf), np.nextafter(edges, -np.inf)])
    base = np.repeat(SPECIALS[:, None], gamma.size, 1)
    y = np.concatenate([base, spread, beside.astype(np.float32)]).astype(np.float32)
    return y, p, gamma


@pytest.mark.parametrize("bits, act", GRID, ids=GRID_IDS)
def test_saturated_channels_match_reference(ops, bits, act):
    """Saturated-high and saturated-low channels (shift < 1 or > 2^K - 1, down to
    -2^24): codes bit for bit, the mask code >= clip(shift, 1, 2^K - 1) equal to
    y > 0, the decoded output as the reference and its gradients."""
    rng = np.random.default_rng(bits)
    y, p, gamma = _saturated_case(bits, act, rng)
    C = gamma.size
    ones, zeros = tf.ones([C]), tf.zeros([C])
    enc = (y, ones, zeros, p["inv_step"], p["shift"], bits, act)
    want_a, want_codes = reference.bn_act_encode(*enc)
    got_a, got_codes = ops.bn_act_encode(*enc)
    np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy())
    _assert_values(act, got_a, want_a, y, exact=True)
    codes = reference.unpack(got_codes, y.size, bits).numpy().reshape(y.shape)
    edge = reference.mask_edge(p["shift"], bits).numpy()
    positive = (tf.constant(y) > 0.0).numpy()  # TF's: denormals count as 0
    np.testing.assert_array_equal(codes >= edge, positive)
    dec = (want_codes, y.shape, p["step"], p["shift"], bits, act)
    y_dec, mask = reference.decode(want_codes, y.shape, p["step"], p["shift"], bits)
    np.testing.assert_array_equal(mask.numpy(), positive)
    # The decoded y lies on the side of 0 that y does, saturated channels included.
    assert np.all(np.where(positive, y_dec.numpy() >= 0, y_dec.numpy() <= 0))
    _assert_values(act, ops.decode_activation(*dec), reference.decode_activation(*dec), y_dec)
    grad_a = rng.normal(size=y.shape).astype(np.float32)
    args = (want_codes, grad_a, p["step"], p["shift"], p["gamma"], p["beta"])
    _check_grads(ops, act, bits, y.shape, args, tf.constant(rng.uniform(0.5, 2.0, C), tf.float32))
    # And through a BN fold with random statistics (x -> y = x * scale + offset).
    x = _input((3, 5, 7, C), rng)
    inv_std = rng.uniform(0.5, 2.0, C).astype(np.float32)
    mean = rng.normal(scale=0.3, size=C).astype(np.float32)
    scale = tf.constant(gamma * inv_std)
    offset = tf.constant(SATURATED_BETA) - tf.constant(mean) * scale
    enc = (x, scale, offset, p["inv_step"], p["shift"], bits, act)
    (want_a, want_codes), (got_a, got_codes) = reference.bn_act_encode(*enc), ops.bn_act_encode(*enc)
    np.testing.assert_array_equal(got_codes.numpy(), want_codes.numpy())
    _assert_values(act, got_a, want_a, None, exact=True)
    dec = (want_codes, x.shape, p["step"], p["shift"], bits, act)
    y_dec, _ = reference.decode(want_codes, x.shape, p["step"], p["shift"], bits)
    _assert_values(act, ops.decode_activation(*dec), reference.decode_activation(*dec), y_dec)


def test_unknown_batch_in_tf_function(ops):
    bits, channels = 4, 5
    rng = np.random.default_rng(3)
    p, scale, offset = _params(channels, bits, rng)

    @tf.function(input_signature=[tf.TensorSpec([None, 3, 3, channels], tf.float32)])
    def round_trip(x):
        a, codes = ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)
        assert codes.shape.as_list() == [None]
        assert a.shape.as_list() == [None, 3, 3, channels]
        dec = ops.decode_activation(codes, tf.shape(x), p["step"], p["shift"], bits)
        assert dec.shape.as_list() == [None, 3, 3, channels]
        s_g, _ = ops.bn_grad_reduce(codes, x, p["step"], p["shift"], p["gamma"], p["beta"], bits)
        assert s_g.shape.as_list() == [channels]
        return codes, dec

    x = _input((3, 3, 3, channels), rng)
    codes, dec = round_trip(x)
    _, want = reference.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)
    np.testing.assert_array_equal(codes.numpy(), want.numpy())
    # Static shapes known: the packed length is computed by the shape function.
    concrete = tf.function(
        lambda x: ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits)[1]
    ).get_concrete_function(tf.TensorSpec([2, 3, 3, channels], tf.float32))
    assert concrete.output_shapes.as_list() == [packed_size(2 * 9 * channels, bits)]


def test_empty_tensor(ops):
    p, scale, offset = _params(3, 4, np.random.default_rng(0))
    x = tf.zeros([0, 2, 2, 3])
    a, codes = ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], 4)
    assert a.shape == (0, 2, 2, 3) and codes.shape == (0,)
    dec = ops.decode_activation(codes, tf.shape(x), p["step"], p["shift"], 4)
    assert dec.shape == (0, 2, 2, 3)
    s_g, s_gx = ops.bn_grad_reduce(codes, x, p["step"], p["shift"], p["gamma"], p["beta"], 4)
    np.testing.assert_array_equal(s_g.numpy(), np.zeros(3))


def test_zero_channels_in_subprocess(ops):
    """C = 0 (a [4, 0] tensor) gives the reference's empty outputs. In a child
    process: BnGradReduce once divided by C there and killed it (SIGFPE)."""
    code = textwrap.dedent(
        """
        import tensorflow as tf
        from keras_blpa.backends.tensorflow import native, reference
        x, v = tf.zeros([4, 0]), tf.zeros([0])
        for k in (native.load(), reference):
            a, codes = k.bn_act_encode(x, v, v, v, v, 4)
            outs = [a, codes, k.decode_activation(codes, tf.shape(x), v, v, 4),
                    *k.bn_grad_reduce(codes, x, v, v, v, v, 4),
                    k.bn_grad_input(codes, x, v, v, v, v, v, v, v, 4)]
            print([tuple(t.shape) for t in outs])
        """
    )
    env = dict(os.environ, KERAS_BLPA_OPS_LIBRARY=ops.path, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    native_shapes, reference_shapes = out.stdout.strip().splitlines()[-2:]
    assert native_shapes == reference_shapes == "[(4, 0), (0,), (4, 0), (0,), (0,), (4, 0)]"


def test_op_requires_errors(ops):
    rng = np.random.default_rng(0)
    p, scale, offset = _params(3, 4, rng)
    x = tf.constant(rng.normal(size=(2, 3)).astype(np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="bits must be 2, 4 or 8, got 3"):
        ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"scale must be a vector of 3 floats"):
        ops.bn_act_encode(x, scale[:2], offset, p["inv_step"], p["shift"], 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"shift must be a vector of 3"):
        ops.bn_act_encode(x, scale, offset, p["inv_step"], tf.ones([4]), 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="rank >= 1"):
        ops.bn_act_encode(tf.constant(1.0), scale[:1], offset[:1], p["inv_step"][:1], p["shift"][:1], 4)
    _, codes = ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"ceil\(n \* bits / 8\) = 3 bytes"):
        ops.decode_activation(codes[:2], [2, 3], p["step"], p["shift"], 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"ceil\(n \* bits / 8\) = 2 bytes"):
        ops.decode_activation(codes, [2, 3], p["step"], p["shift"], 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="step must be a vector of 3"):
        ops.decode_activation(codes, [2, 3], p["step"][:1], p["shift"], 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="bits must be 2, 4 or 8, got 16"):
        ops.decode_activation(codes, [2, 3], p["step"], p["shift"], 16)
    bad = Activation.__new__(Activation)
    object.__setattr__(bad, "name", "swish")
    object.__setattr__(bad, "negative_slope", 0.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="activation must be one of relu, .*got 'swish'"):
        ops.decode_activation(codes, [2, 3], p["step"], p["shift"], 4, bad)
    with pytest.raises(tf.errors.InvalidArgumentError, match="got 'swish'"):
        ops.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], 4, bad)
    args = (codes, x, p["step"], p["shift"], p["gamma"], p["beta"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="gamma must be a vector of 3"):
        ops.bn_grad_reduce(codes, x, p["step"], p["shift"], p["gamma"][:2], p["beta"], 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mean_gx must be a vector of 3"):
        ops.bn_grad_input(*args, scale, scale, tf.ones([1]), 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="packed must be a 1-D uint8"):
        ops.bn_grad_input(codes[:1], *args[1:], scale, scale, scale, 4)
    # Wrong dtype of the codes is rejected by the op signature.
    with pytest.raises((TypeError, tf.errors.InvalidArgumentError, ValueError)):
        ops.decode_activation(tf.cast(codes, tf.int32), [2, 3], p["step"], p["shift"], 4)


def test_shape_function_rejects_static_mismatch(ops):
    p, scale, offset = _params(3, 4, np.random.default_rng(0))

    @tf.function
    def bad(x):
        return ops.bn_act_encode(x, scale[:2], offset, p["inv_step"], p["shift"], 4)

    with pytest.raises((ValueError, tf.errors.InvalidArgumentError)):
        bad(tf.zeros([2, 3]))


def test_layer_dispatches_to_native(ops):
    from keras_blpa import quantization
    from keras_blpa.backends.tensorflow import fused

    assert fused.ops() is ops
    assert quantization.native_ops_available()


# ---------------------------------------------------------------------------
# Argmax max pooling (ops/blpa_pool_ops.cc) against the TensorFlow-ops path.

# (input shape, pool_size, strides, padding): overlapping and not, uneven
# "same" pads, a rectangular window, and a 17x17 window (289 positions: int32 codes).
POOLS = [
    ((3, 9, 11, 5), (3, 3), (2, 2), "same"),
    ((3, 9, 11, 5), (3, 3), (2, 2), "valid"),
    ((2, 8, 8, 3), (2, 2), (2, 2), "valid"),
    ((2, 7, 6, 4), (3, 3), (1, 1), "same"),
    ((2, 9, 7, 3), (3, 2), (1, 2), "valid"),
    ((2, 20, 19, 2), (17, 17), (3, 3), "same"),
]


def _pool_pair(ops, shape, pool_size, strides, padding, x, dy):
    """((y, dx) native, (y, dx) TensorFlow ops, code) of one pooling."""
    from keras_blpa.backends.tensorflow import pooling
    from keras_blpa.windows import Window

    window = Window(shape[1:3], pool_size, strides, padding)
    out = []
    for fn in (lambda v: pooling._native_pool(ops, v, window), lambda v: pooling._tf_pool(v, window)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        out.append((y.numpy(), tape.gradient(y, x, dy).numpy()))
    return out[0], out[1], ops.argmax_pool(x, window)[1]


@pytest.mark.parametrize("shape,pool_size,strides,padding", POOLS)
@pytest.mark.parametrize("ties", [False, True])
def test_argmax_pool_bit_identical_to_tensorflow_ops(ops, shape, pool_size, strides, padding, ties):
    """The same output, code dtype and input gradient (ties after a ReLU included)."""
    from keras_blpa.windows import Window

    rng = np.random.default_rng(3)
    x = rng.normal(size=shape).astype(np.float32)
    x = tf.constant(np.maximum(x, 0) if ties else x)
    out_shape = (shape[0], *Window(shape[1:3], pool_size, strides, padding).output_size, shape[3])
    dy = tf.constant(rng.integers(-3, 4, size=out_shape).astype(np.float32) if ties
                     else rng.normal(size=out_shape).astype(np.float32))
    (y, dx), (y_tf, dx_tf), code = _pool_pair(ops, shape, pool_size, strides, padding, x, dy)
    stock = tf.nn.max_pool2d(x, (1, *pool_size, 1), (1, *strides, 1), padding.upper()).numpy()
    np.testing.assert_array_equal(y, stock)
    np.testing.assert_array_equal(y, y_tf)
    np.testing.assert_array_equal(dx, dx_tf)
    assert code.dtype == (tf.int32 if pool_size[0] * pool_size[1] > 256 else tf.uint8)


def test_argmax_pool_is_what_the_layer_runs_on_cpu(ops):
    """ArgmaxPooling2D's traced training step calls the native ops, not MaxPoolWithArgmax."""
    from keras_blpa import ArgmaxPooling2D

    layer = ArgmaxPooling2D(3, strides=2, padding="same")

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, x)

    graph = step.get_concrete_function(tf.TensorSpec([2, 8, 8, 3])).graph
    types = {op.type for op in graph.get_operations()}
    assert "Blpa>ArgmaxPool" in types and "Blpa>ArgmaxPoolGrad" in types, types
    assert "MaxPoolWithArgmax" not in types


def test_argmax_pool_ops_reject_bad_shapes(ops):
    from keras_blpa.windows import Window

    window = Window((4, 4), (2, 2), (2, 2), "valid")
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"x must be rank 4 \(NHWC\), got shape \[4,4,3\]"):
        ops.argmax_pool(tf.zeros([4, 4, 3]), window)
    _, code = ops.argmax_pool(tf.zeros([1, 4, 4, 3]), window)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"code must have dy's shape \[1,2,2,2\]"):
        ops.argmax_pool_grad(tf.zeros([1, 2, 2, 2]), code, window)
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        ops.argmax_pool_grad(tf.zeros([1, 2, 2, 3]), tf.cast(code, tf.float32), window)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"a 2x2 input and a 2x2 output do not fit"):
        ops.argmax_pool(tf.zeros([1, 2, 2, 3]), window)  # the window is for a 4x4 input
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"a 4x4 input and a 3x2 output do not fit"):
        ops.argmax_pool_grad(tf.zeros([1, 3, 2, 3]), tf.zeros([1, 3, 2, 3], tf.uint8), window)


# ---------------------------------------------------------------------------
# Loader behaviour (no compiled library needed).


@pytest.fixture
def fresh_loader(monkeypatch):
    native._reset_for_tests()
    yield monkeypatch
    monkeypatch.undo()
    native._reset_for_tests()


def test_loader_missing_library_warns_once(fresh_loader, tmp_path):
    path = str(tmp_path / "no_such_dir" / "_blpa_ops.so")
    fresh_loader.setenv(native.LIBRARY_ENV, path)
    fresh_loader.delenv(native.PURE_TF_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load() is None
        assert native.load() is None
        from keras_blpa import quantization
        from keras_blpa.backends.tensorflow import fused

        assert fused.ops() is reference
        assert not quantization.native_ops_available()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert path in messages[0] and "FileNotFoundError" in messages[0]


def test_loader_broken_library_warns_once(fresh_loader, tmp_path):
    path = tmp_path / "_blpa_ops.so"
    path.write_bytes(b"this is not an ELF shared object")
    fresh_loader.setenv(native.LIBRARY_ENV, str(path))
    fresh_loader.delenv(native.PURE_TF_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load() is None
        assert native.load() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert str(path) in messages[0]
    assert native.load_error() is not None
    assert native.status() == {"kernels": "pure-TF", "reason": native.load_error()}


def test_pure_tf_env_forces_reference_in_subprocess():
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error", RuntimeWarning)
        import keras_blpa
        from keras_blpa.backends.tensorflow import fused, reference
        assert not keras_blpa.native_ops_available()
        assert fused.ops() is reference
        print("PURE_TF_OK")
        """
    )
    env = dict(os.environ, KERAS_BLPA_PURE_TF="1", TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "PURE_TF_OK" in out.stdout


# ---------------------------------------------------------------------------
# Finding or building the library for the TensorFlow in use (native_build).


def test_library_stamped_for_another_tensorflow_is_never_loaded(fresh_loader, tmp_path):
    built, _ = _a_built_library()
    library = tmp_path / "_blpa_ops.so"
    shutil.copyfile(built, library)
    stamp = dict(native_build.read_stamp(built) or {}, tensorflow="2.0.0", key="0" * 20)
    (tmp_path / "_blpa_ops.json").write_text(json.dumps(stamp))
    tf_info = native_build.tensorflow_info()
    assert not native_build.matches(str(library), tf_info)  # never picked from the package
    fresh_loader.setenv(native.LIBRARY_ENV, str(library))  # nor when named explicitly
    fresh_loader.delenv(native.PURE_TF_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match=r"built for TensorFlow 2\.0\.0, not " + tf.__version__):
        assert native.load() is None


def test_packaged_library_matches_only_its_own_sources_and_tensorflow(tmp_path):
    built, tf_info = _a_built_library()
    if native_build.read_stamp(built) is None:
        pytest.skip(f"{built} has no stamp (not built by setup.py or the cache)")
    assert native_build.matches(built, tf_info)
    assert not native_build.matches(built, dict(tf_info, version="2.0.0"))
    assert not native_build.matches(built, dict(tf_info, cflags=tf_info["cflags"] + ["-DX"]))
    root = tmp_path / "src"
    for rel in native_build.library_files():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.join(REPO, rel), root / rel)
    assert native_build.matches(built, tf_info, root=str(root))
    with open(root / "ops" / "blpa_ops.cc", "a") as f:
        f.write("// an edit\n")
    assert not native_build.matches(built, tf_info, root=str(root))


def _a_built_library():
    """A library the loader would use here (built by setup.py or in the cache)."""
    tf_info = native_build.tensorflow_info()
    packaged = native.packaged_library()
    if native_build.matches(packaged, tf_info):
        return packaged, tf_info
    try:
        return native_build.cached_library(tf_info), tf_info
    except native_build.BuildError as e:
        if _require_native():
            pytest.fail(str(e))
        pytest.skip(str(e))


BUILD_IN_CACHE = """
import json, logging, sys, tensorflow as tf
from keras_blpa.backends.tensorflow import native_build
logging.basicConfig(level=logging.WARNING, format="%(message)s")
path = native_build.cached_library()
module = tf.load_op_library(path)
print(json.dumps(dict(path=path, isa=module.blpa_cpu_isa().numpy().decode())))
"""


@pytest.mark.slow
def test_cache_builds_once_for_parallel_processes(tmp_path):
    """Two processes asking at once: one compiles under the lock, both load the result."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    env = dict(os.environ, KERAS_BLPA_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    procs = [subprocess.Popen([sys.executable, "-c", BUILD_IN_CACHE], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    outs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert outs[0]["path"] == outs[1]["path"]
    assert outs[0]["isa"] in ISA_NAMES
    compiles = sum(err.count("compiling the native ops") for _, err in results)
    assert compiles == 1, [err[-2000:] for _, err in results]
    entries = [p for p in os.listdir(tmp_path) if p.startswith("ops-")]
    assert len(entries) == 1
    stamp = native_build.read_stamp(outs[0]["path"])
    assert stamp["tensorflow"] == tf.__version__


def test_no_compiler_warns_once_and_falls_back(fresh_loader, tmp_path):
    fresh_loader.setattr(native, "packaged_library", lambda: str(tmp_path / "none.so"))
    fresh_loader.setenv("KERAS_BLPA_CACHE", str(tmp_path / "cache"))
    fresh_loader.setenv("CXX", str(tmp_path / "no-such-compiler"))
    fresh_loader.delenv(native.LIBRARY_ENV, raising=False)
    fresh_loader.delenv(native.PURE_TF_ENV, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert native.load() is None and native.load() is None
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "no C++ compiler" in messages[0], messages
    assert "pure-TensorFlow" in messages[0]


def test_failed_compile_is_remembered_with_its_output(tmp_path, monkeypatch):
    compiler = tmp_path / "broken-cxx"
    compiler.write_text("#!/bin/sh\necho 'broken-cxx: simulated failure' >&2\nexit 1\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("KERAS_BLPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(compiler))
    with pytest.raises(native_build.BuildError, match="simulated failure"):
        native_build.cached_library()
    with pytest.raises(native_build.BuildError, match="delete .*build-error.txt to try again"):
        native_build.cached_library()


# ---------------------------------------------------------------------------
# Faults: a damaged or read-only cache, a killed compiler, a bad CPU_ISA value.
# Loads run in a fresh interpreter, where a crash (SIGBUS) shows as its return code.

LOAD_STATUS = """
import json, sys
from keras_blpa.backends.tensorflow import native
native.packaged_library = lambda: sys.argv[1]
print(json.dumps(native.status()))
"""
NO_PACKAGED = "/nonexistent/_blpa_ops.so"


def _python(args, env):
    """A fresh interpreter running `args`, which must exit 0; None in `env` unsets."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", native.LIBRARY_ENV: None,
           native.PURE_TF_ENV: None, **env}
    out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                         env={k: v for k, v in env.items() if v is not None}, timeout=600)
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    return out


def _facts(out):
    """What `python -m keras_blpa.info` or LOAD_STATUS printed, as a dict."""
    lines = out.stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        return json.loads(lines[-1])
    return dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """(cache, library's path in it): a cache with one entry, compiled once for the tests to copy."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERAS_BLPA_CACHE", str(cache))
        try:
            library = native_build.cached_library()
        except native_build.BuildError as e:
            if _require_native():
                pytest.fail(str(e))
            pytest.skip(str(e))
    return cache, os.path.relpath(library, cache)


def _cache_copy(built_cache, tmp_path):
    """(cache, library) of a copy of `built_cache` in tmp_path, to damage."""
    cache, rel = built_cache
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache", tmp_path / "cache" / rel


def _truncate(library):
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["truncated", "zero-filled"])
def test_damaged_cache_entry_is_rebuilt(built_cache, tmp_path, damage):
    """A library cut short (SIGBUS when mapped) or zero-filled (power loss) beside a
    valid stamp fails its stamp's size or sha256: rebuilt in place, then loaded."""
    cache, library = _cache_copy(built_cache, tmp_path)
    if damage == "truncated":
        _truncate(library)
    else:
        library.write_bytes(bytes(library.stat().st_size))
    out = _python(["-c", LOAD_STATUS, NO_PACKAGED], {"KERAS_BLPA_CACHE": str(cache)})
    status = _facts(out)
    assert status["kernels"] == "native" and status["library"] == str(library), status
    assert out.stderr.count("compiling the native ops") == 1, out.stderr[-2000:]
    assert "rebuilding: the cached library is " in out.stderr
    assert native_build.library_problem(str(library)) is None
    assert not list(library.parent.glob("*.tmp"))  # written beside, then renamed


@pytest.mark.parametrize("route", ["override", "override without stamp", "packaged"])
def test_damaged_library_not_ours_is_refused(built_cache, tmp_path, route):
    """A truncated KERAS_BLPA_OPS_LIBRARY or packaged library, not ours to rebuild, is
    refused with one warning naming it and what to do; the pure-TF path runs."""
    _, library = _cache_copy(built_cache, tmp_path)
    _truncate(library)
    if route == "override without stamp":  # a Bazel build: its ELF segments are checked
        os.remove(native_build.stamp_path(str(library)))
    env = {"KERAS_BLPA_CACHE": str(tmp_path / "unused")}
    if route == "packaged":
        out = _python(["-c", LOAD_STATUS, str(library)], env)
        remedy = f"reinstall keras_blpa, or delete {library} and "
    else:
        out = _python(["-m", "keras_blpa.info"], {**env, native.LIBRARY_ENV: str(library)})
        remedy = f"rebuild {library}, or unset {native.LIBRARY_ENV}"
    assert _facts(out)["kernels"] == "pure-TF"
    warned = [line for line in out.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 1, out.stderr[-2000:]
    assert f"{library} not loaded: truncated" in warned[0] and remedy in warned[0], warned
    assert "compiling" not in out.stderr


def test_read_only_cache_with_a_valid_entry_is_used(built_cache, tmp_path):
    """A valid entry is loaded without taking its lock. The cache is made read-only
    (chmod), and, since root writes through that, opening build.lock is made to fail
    too: build.lock is replaced by a directory."""
    cache, library = _cache_copy(built_cache, tmp_path)
    lock = library.parent / "build.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    folders = [cache, library.parent]
    for folder in folders:
        folder.chmod(0o555)
    try:
        out = _python(["-c", LOAD_STATUS, NO_PACKAGED], {"KERAS_BLPA_CACHE": str(cache)})
    finally:
        for folder in folders:
            folder.chmod(0o755)
    status = _facts(out)
    assert status["kernels"] == "native" and status["library"] == str(library), status
    assert status["origin"] == "per-user cache" and "compiling" not in out.stderr


@pytest.mark.parametrize("killed", ["compiler", "cc1plus under g++"])
def test_compiler_killed_by_a_signal_is_retried_not_remembered(tmp_path, monkeypatch, killed):
    """A compiler killed by a signal (e.g. SIGKILL from the out-of-memory killer) made
    no compile error: nothing is recorded, the next use compiles again. Either the
    compiler dies (a negative return code) or g++'s cc1plus does (g++ exits 1)."""
    calls = tmp_path / "calls"
    script = tmp_path / "killed"
    if killed == "compiler":
        script.write_text(f'#!/bin/sh\n[ "$1" = --version ] && exit 0\necho >> {calls}\n'
                          "kill -KILL $$\n")
        cxx = str(script)
    else:
        if shutil.which("g++") is None:
            pytest.skip("no g++")
        script.write_text(f'#!/bin/sh\ncase "$1" in *cc1plus) echo >> {calls}; kill -KILL $$;; '
                          'esac\nexec "$@"\n')
        cxx = f"g++ -wrapper {script}"
    script.chmod(0o755)
    monkeypatch.setenv("KERAS_BLPA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", cxx)
    for attempt in (1, 2):
        with pytest.raises(native_build.BuildError, match="killed by (signal 9|SIGKILL)") as e:
            native_build.cached_library()
        assert "build-error.txt" not in str(e.value)
        assert calls.read_text().count("\n") == attempt
    assert not list((tmp_path / "cache").glob("*/build-error.txt"))


@pytest.mark.skipif(not X86, reason="the CPU levels are x86's")
def test_cpu_isa_cap_takes_any_case_and_warns_on_other_values(ops):
    """KERAS_BLPA_CPU_ISA takes avx, avx2 or avx512 in any case, and info reports the
    level by that name; another value runs uncapped with one warning naming it."""
    levels = native.CPU_ISA_LEVELS

    def run(value):
        out = _python(["-m", "keras_blpa.info"],
                      {native.LIBRARY_ENV: ops.path, native.CPU_ISA_ENV: value})
        facts = _facts(out)
        assert facts["kernels"] == "native", facts
        warned = out.stderr.count(f"{native.CPU_ISA_ENV}={value!r} is not one of avx, avx2, avx512")
        return facts["cpu_isa"], warned

    best, _ = run(None)
    assert best in levels
    capped = {"AVX2": levels[min(levels.index(best), 1)], "Avx": "avx", "sse": best, "avx1024": best}
    for value, want in capped.items():
        assert run(value) == (want, int(value.lower() not in levels)), value


def test_build_can_be_forbidden(fresh_loader, tmp_path):
    fresh_loader.setattr(native, "packaged_library", lambda: str(tmp_path / "none.so"))
    fresh_loader.setenv(native.BUILD_ENV, "0")
    fresh_loader.delenv(native.LIBRARY_ENV, raising=False)
    fresh_loader.delenv(native.PURE_TF_ENV, raising=False)
    with pytest.warns(RuntimeWarning, match=f"{native.BUILD_ENV}=0"):
        assert native.load() is None


def test_cuda_plan_matches_the_tensorflow_build(monkeypatch):
    info = dict(native_build.tensorflow_info(), version="2.21.0")
    plan, reason = native_build.cuda_plan(dict(info, cuda_version=None))
    assert plan is None and "not a CUDA build" in reason
    monkeypatch.setattr(native_build, "find_cuda",
                        lambda: {"nvcc": "/x/bin/nvcc", "lib_dir": "/x/lib64", "version": "13.0"})
    plan, reason = native_build.cuda_plan(dict(info, cuda_version="12.5.1"))
    assert plan is None and "CUDA 12.5.1" in reason and "CUDA 13.0" in reason
    plan, reason = native_build.cuda_plan(dict(info, cuda_version="13.0"))
    assert plan["nvcc"] == "/x/bin/nvcc" and "built with" in reason
    monkeypatch.setenv("KERAS_BLPA_CUDA", "0")
    assert native_build.cuda_plan(dict(info, cuda_version="13.0"))[0] is None


def test_info_entry_point_names_the_path_in_use():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, "-m", "keras_blpa.info"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    facts = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    assert facts["tensorflow"] == tf.__version__
    assert facts["memory_stats"].startswith("available on")
    if facts["kernels"] == "native":
        assert os.path.exists(facts["library"])
        assert facts["cpu_isa"] in ISA_NAMES
    else:
        assert not _require_native(), facts
    env.update(KERAS_BLPA_PURE_TF="1")
    out = subprocess.run([sys.executable, "-m", "keras_blpa.info", "--require-native"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "kernels: pure-TF" in out.stdout


# ---------------------------------------------------------------------------
# Builds: every native source is listed, and every build exports the ops.


def test_every_native_source_is_listed():
    bzl = native_build.sources()
    listed = set(sum((bzl[k] for k in ("OP_SOURCES", "HEADERS", "CUDA_SOURCES",
                                         "STANDALONE_SOURCES")), []))
    on_disk = {
        f"{d}/{f}"
        for d in ("cc", "ops")
        for f in os.listdir(os.path.join(REPO, d))
        if f.endswith((".cc", ".h", ".cu"))
    }
    assert listed == on_disk


def _registered_ops():
    """Op names registered in the op sources, as TensorFlow's Python wrappers name them."""
    names = []
    for rel in native_build.sources()["OP_SOURCES"]:
        text = open(os.path.join(REPO, rel), encoding="utf-8").read()
        names += re.findall(r'REGISTER_OP\("Blpa>(\w+)"\)', text)
    return {"blpa_" + re.sub(r"(?<!^)(?=[A-Z])", "_", n).lower() for n in names}


def test_library_in_use_exports_every_registered_op(ops):
    """Run against each build (pip here; ops/ci.sh runs it on Bazel's library)."""
    exported = {n for n in dir(ops._module) if n.startswith("blpa_")}
    assert _registered_ops() <= exported and len(_registered_ops()) >= 5, exported


# ---------------------------------------------------------------------------
# The standalone cc/ program (no TensorFlow) and the CUDA sources.


def test_standalone_cc_program(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        if _require_native():
            pytest.fail("no C++ compiler to build cc/blpa_quant_test.cc")
        pytest.skip("no C++ compiler")
    bzl = native_build.sources()
    exe = str(tmp_path / "blpa_quant_test")
    subprocess.run(
        [cxx, "-std=c++17", *bzl["HOST_COPTS"], "-pthread", "-I", REPO,
         *[os.path.join(REPO, s) for s in bzl["STANDALONE_SOURCES"]], "-o", exe],
        check=True, timeout=600,
    )
    out = subprocess.run([exe, "--quick", "--threads", "2"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 mismatches" in out.stdout and "GB/s" in out.stdout


def test_cuda_sources_compile_and_standalone_gpu_check(tmp_path):
    """nvcc compiles the kernels; the standalone program links with them and
    checks GPU against CPU results when a device exists (skips that part here)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    bzl = native_build.sources()
    obj = str(tmp_path / "blpa_quant_cuda.o")
    for source in bzl["CUDA_SOURCES"]:
        subprocess.run(
            [nvcc, "-c", *bzl["NVCC_FLAGS"], "-gencode=arch=compute_75,code=sm_75",
             "-gencode=arch=compute_90,code=sm_90", "-I", REPO,
             os.path.join(REPO, source), "-o", obj],
            check=True, timeout=600,
        )
    toolkit = native_build.find_cuda()
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if toolkit is None or cxx is None:
        pytest.skip("no static CUDA runtime or C++ compiler to link the standalone program")
    lib_dir = toolkit["lib_dir"]
    include_dir = os.path.join(os.path.dirname(os.path.dirname(toolkit["nvcc"])), "include")
    exe = str(tmp_path / "blpa_quant_test_cuda")
    subprocess.run(
        [cxx, "-std=c++17", *bzl["HOST_COPTS"], "-pthread", "-DBLPA_WITH_CUDA", "-I", REPO,
         "-I", include_dir, *[os.path.join(REPO, s) for s in bzl["STANDALONE_SOURCES"]], obj,
         "-L" + lib_dir, *bzl["CUDA_LINKOPTS"], "-o", exe],
        check=True, timeout=600,
    )
    out = subprocess.run([exe, "--quick", "--no-bench"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "GPU checks" in out.stdout
