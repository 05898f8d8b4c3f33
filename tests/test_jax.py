"""The JAX backend (keras_blpa.backends.jax) against the TensorFlow reference and stock Keras.

Run with KERAS_BACKEND=jax in an environment with jax, keras and tensorflow
(tests/run_jax.sh); under any other backend the module is skipped with a reason.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

if keras.backend.backend() != "jax":
    pytest.skip(
        "JAX backend tests: run tests/run_jax.sh (KERAS_BACKEND=jax)",
        allow_module_level=True,
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_blpa  # noqa: E402
from keras_blpa import ApproxConvBlock, ResidualBuffer  # noqa: E402
from keras_blpa.backends.jax import block as jax_ops  # noqa: E402
from keras_blpa.blocks import ACTIVATIONS  # noqa: E402
from keras_blpa.blocks import RELU  # noqa: E402
from keras_blpa.blocks import Activation  # noqa: E402
from keras_blpa.blocks import BlockConfig  # noqa: E402
from keras_blpa.blocks import Head  # noqa: E402
from keras_blpa.codes import packed_size  # noqa: E402
from keras_blpa.backends.tensorflow import reference  # noqa: E402
from keras_blpa.benchmark.stacks import residual_stack  # noqa: E402
from stacks import step_temp_bytes  # noqa: E402
from trajectories import assert_same_steps  # noqa: E402
from trajectories import fit_batch  # noqa: E402
from trajectories import forced_steps  # noqa: E402
from trajectories import reference_trajectory  # noqa: E402
from trajectories import step_errors  # noqa: E402


# Every activation of the block, and leaky_relu with a slope other than Keras' 0.2.
ACTS = [Activation.get(name) for name in ACTIVATIONS] + [Activation.get("leaky_relu", 0.05)]
ACT_IDS = [a.name if a.name != "leaky_relu" else f"leaky_relu{a.negative_slope}" for a in ACTS]
EPS32 = float(np.finfo(np.float32).eps)


def block_config(bits, strides=(1, 1), act=RELU, naive=False):
    """One 3x3 "same" conv head at `strides`, float32 (the kernel sets the filters)."""
    head = Head(filters=1, kernel_size=(3, 3), strides=tuple(strides))
    return BlockConfig(bits=bits, epsilon=1e-3, heads=(head,), compute_dtype="float32",
                       activation=act, naive=naive)


def special_values(rng, shape, bits):
    """Normal values with NaN, +-inf, zeros, exact bin edges and relu6's 6 mixed in."""
    y = (rng.normal(size=shape) * 3).astype(np.float32)
    flat = y.reshape(-1)
    flat[:9] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 6.0 / 2**bits, 6.0, -6.0, np.nextafter(np.float32(6), 0)]
    return y


def edge_disagreement(act, step, shift, bits):
    """delta: the largest |f_TF - f_JAX| over every bin edge (k - shift) * step.

    TensorFlow (the reference's tf.nn ops) and JAX (keras.ops, what stock Keras
    gives) evaluate a smooth f by different float32 formulas; the secant slope
    (f(hi) - f(lo)) / step then differs by at most 2 delta / step. 0 for the
    piecewise-linear activations (exact on both).
    """
    k = np.arange(2**bits + 1, dtype=np.float32)[:, None]
    edges = ((k - np.asarray(shift)) * np.asarray(step)).astype(np.float32)
    f_tf = reference.activation_forward(act, tf.constant(edges)).numpy()
    return float(np.abs(f_tf - np.asarray(act(jnp.asarray(edges)))).max())


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(3, 5, 7, 6), (1, 1, 3, 5), (2, 4, 4, 8)])
def test_packed_bytes_identical_to_tf_reference(bits, shape, act):
    """Same bytes, vectors and decoded values as the TensorFlow reference, for every
    activation, gamma of both signs, zero and tiny gamma, |beta| = 10 |gamma|, and
    odd element counts (padded last byte)."""
    rng = np.random.default_rng(bits + len(shape))
    c = shape[-1]
    y = special_values(rng, shape, bits)
    gamma = rng.normal(size=c).astype(np.float32)
    gamma[0], gamma[-1] = 0.0, -1e-9
    beta = rng.normal(size=c).astype(np.float32) * 2
    beta[1], beta[2] = 10 * abs(gamma[1]), -10 * abs(gamma[2])
    p_tf = reference.channel_params(gamma, beta, bits, act)
    p_jx = jax.jit(jax_ops.channel_params, static_argnums=(2, 3))(gamma, beta, bits, act)
    for key in p_tf:
        np.testing.assert_array_equal(p_tf[key].numpy(), np.asarray(p_jx[key]), err_msg=key)
    packed_tf = reference.encode(y, p_tf["inv_step"], p_tf["shift"], bits, act).numpy()
    encode = jax.jit(jax_ops.encode, static_argnums=(3, 4))
    packed_jx = np.asarray(encode(y, p_jx["inv_step"], p_jx["shift"], bits, act))
    assert packed_jx.dtype == np.uint8
    assert packed_jx.shape == (packed_size(y.size, bits),)
    np.testing.assert_array_equal(packed_jx, packed_tf)
    # And both agree with a numpy packing of the reference codes.
    codes = reference.encode_codes(y, p_tf["inv_step"], p_tf["shift"], bits, act).numpy().ravel()
    per = 8 // bits
    padded = np.concatenate([codes, np.zeros(-codes.size % per, np.uint8)]).reshape(-1, per)
    expected = np.bitwise_or.reduce(padded << (bits * np.arange(per, dtype=np.uint8)), axis=1)
    np.testing.assert_array_equal(packed_jx, expected)
    np.testing.assert_array_equal(np.asarray(jax_ops.unpack(packed_jx, y.size, bits)), codes)
    dec_tf, mask_tf = reference.decode(packed_tf, shape, p_tf["step"], p_tf["shift"], bits)
    dec_jx, mask_jx = jax_ops.decode(packed_jx, shape, p_jx["step"], p_jx["shift"], bits)
    np.testing.assert_array_equal(np.asarray(dec_jx), dec_tf.numpy())
    np.testing.assert_array_equal(np.asarray(mask_jx), mask_tf.numpy())
    # The mask is exactly y > 0 (NaN inactive), whatever the sign of gamma.
    np.testing.assert_array_equal(np.asarray(mask_jx), y > 0)
    # The decoded activation output.
    out_tf = reference.decode_activation(packed_tf, shape, p_tf["step"], p_tf["shift"], bits, act).numpy()
    decode = jax.jit(jax_ops.decode_activation, static_argnums=(1, 4, 5))
    out_jx = np.asarray(decode(packed_jx, shape, p_jx["step"], p_jx["shift"], bits, act))
    if act.piecewise_linear:
        np.testing.assert_array_equal(out_jx, out_tf)
    else:
        # f(bin centre), f with keras.ops on JAX and tf.nn in the reference: two float32
        # formulas, each within a few ulps of max(1, |y|) (XLA's fusion may move an ulp).
        bound = 8 * EPS32 * np.maximum(1.0, np.abs(dec_tf.numpy()))
        assert np.all(np.abs(out_jx - out_tf) <= bound)
    if act.name == "relu6":
        # 6 is a bin edge: the decoded output is exactly 6 where y >= 6, below it elsewhere.
        np.testing.assert_array_equal(out_jx == 6.0, y >= 6.0)
        assert np.all(out_jx[~(y >= 6.0)] < 6.0)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_relu6_params_identical_to_tf_reference_for_every_bin_count(bits):
    """relu6's resized bins (6 = m whole bins above 0) for every m up to 2^K and
    windows inside, above and below 0: the same vectors and codes as the
    TensorFlow reference (XLA turns a division by a constant into a multiplication
    by its reciprocal, so m / 6 would differ in the last bit for m = 5, 7, 10, ...)."""
    levels = 2**bits
    m = np.arange(1, levels + 1, dtype=np.float32)
    gamma = np.repeat(levels / m, 5).astype(np.float32)  # 6 / step0 = m
    beta = (np.tile([-4.0, -1.0, 0.0, 1.0, 4.0], levels) * gamma).astype(np.float32)
    act = Activation.get("relu6")
    p_tf = reference.channel_params(gamma, beta, bits, act)
    p_jx = jax.jit(jax_ops.channel_params, static_argnums=(2, 3))(gamma, beta, bits, act)
    for key in p_tf:
        np.testing.assert_array_equal(p_tf[key].numpy(), np.asarray(p_jx[key]), err_msg=key)
    y = (np.random.default_rng(bits).normal(size=(3, 4, gamma.size)) * 3 * gamma + beta)
    y = y.astype(np.float32)
    packed_tf = reference.encode(y, p_tf["inv_step"], p_tf["shift"], bits, act).numpy()
    packed_jx = jax.jit(jax_ops.encode, static_argnums=(3, 4))(
        y, p_jx["inv_step"], p_jx["shift"], bits, act)
    np.testing.assert_array_equal(packed_tf, np.asarray(packed_jx))


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_batch_window_params_identical_to_tf_reference(bits, act):
    """The window that follows the batch (`Activation.follows_data`): the same spread
    and vectors as the TensorFlow reference, bit for bit, for heavy-tailed channels
    whose spread is exactly on the window's 0.5 grid or far beyond its cap."""
    rng = np.random.default_rng(bits)
    y = rng.standard_t(2, (4, 6, 6, 5)).astype(np.float32)
    mean, std = y.mean((0, 1, 2)), y.std((0, 1, 2))
    gamma = np.array([1.2, -0.7, 0.5, -1.5, 0.9], np.float32)
    beta = np.array([0.3, -0.2, 0.0, 0.4, -0.9], np.float32)
    s_tf = reference.batch_spread(tf.constant(y), tf.constant(mean), tf.constant(std))
    s_jx = jax.jit(jax_ops.batch_spread)(y, mean, std)
    np.testing.assert_array_equal(s_tf.numpy(), np.asarray(s_jx))
    spread = np.concatenate([s_tf.numpy()[:3], [3.5, 40.0]]).astype(np.float32)
    p_tf = reference.channel_params(gamma, beta, bits, act, spread=spread)
    p_jx = jax.jit(jax_ops.channel_params, static_argnums=(2, 3))(gamma, beta, bits, act, spread)
    for key in p_tf:
        np.testing.assert_array_equal(p_tf[key].numpy(), np.asarray(p_jx[key]), err_msg=key)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bn_grad_sums_match_tf_reference(bits, act):
    """sum g and sum g x_hat, g = dL/da * f' from the code, to float32 summation
    rounding (and, for smooth f, the secant's 2 delta / step, `edge_disagreement`)."""
    rng = np.random.default_rng(bits)
    y = (rng.normal(size=(4, 6, 6, 5)) * 3).astype(np.float32)  # crosses relu6's 6
    grad = rng.normal(size=y.shape).astype(np.float32)
    gamma = np.array([1.2, -0.7, 0.5, -1.5, 0.9], np.float32)
    beta = np.array([0.3, -0.2, 0.0, 0.4, -0.9], np.float32)
    p = reference.channel_params(gamma, beta, bits, act)
    packed = reference.encode(y, p["inv_step"], p["shift"], bits, act)
    expected = reference.bn_grad_reduce(
        packed, grad, p["step"], p["shift"], p["gamma"], beta, bits, act
    )
    reduce = jax.jit(jax_ops.bn_grad_reduce, static_argnums=(6, 7))
    got = reduce(
        jnp.asarray(packed.numpy()), jnp.asarray(grad), p["step"].numpy(),
        p["shift"].numpy(), p["gamma"].numpy(), beta, bits, act,
    )
    delta = edge_disagreement(act, p["step"], p["shift"], bits)
    total = np.abs(grad).sum(axis=(0, 1, 2))
    bound = total * (1e-6 + 2 * delta / p["step"].numpy())
    y_dec = reference.decode(packed, y.shape, p["step"], p["shift"], bits)[0].numpy()
    x_hat = np.abs((y_dec - beta) / gamma).max(axis=(0, 1, 2))
    for a, b, atol in zip(got, expected, (bound, bound * np.maximum(1.0, x_hat))):
        assert np.all(np.abs(np.asarray(a) - b.numpy()) <= atol + 1e-5 * np.abs(b.numpy()))


def exact_block(x, gamma, beta, kernel, epsilon=1e-3, strides=(1, 1), act=jax.nn.relu):
    """Independent BN (batch statistics) -> act -> conv, differentiated by jax.grad."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + epsilon) * gamma + beta
    return jax.lax.conv_general_dilated(
        act(y), kernel, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def compressed(bits, strides=(1, 1), act=RELU):
    block = jax_ops.compressed_block(block_config(bits, strides, act))

    def f(x, gamma, beta, kernel):
        stats = jax.lax.stop_gradient(x)
        mean, var = jnp.mean(stats, axis=(0, 1, 2)), jnp.var(stats, axis=(0, 1, 2))
        return block(x.shape, x, gamma, beta, mean, var, kernel)[0]

    return f


def block_inputs(rng, shape=(8, 8, 8, 6), filters=7, max_gamma=1.5):
    """Uniform x (|x_hat| <= sqrt(3)), |beta / gamma| <= 1: no code saturates, since
    the 2^K bins cover x_hat in [-beta/gamma - 3, -beta/gamma + 3] (less one bin)."""
    c = shape[-1]
    x = rng.uniform(-1.0, 2.0, size=shape).astype(np.float32)
    gamma = (rng.uniform(0.3, max_gamma, c) * np.where(np.arange(c) % 2, -1, 1)).astype(np.float32)
    beta = rng.uniform(-0.3, 0.3, c).astype(np.float32)
    kernel = rng.normal(0, 0.2, (3, 3, c, filters)).astype(np.float32)
    return x, gamma, beta, kernel


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("strides", [(1, 1), (2, 2)])
def test_custom_vjp_gradients_against_exact_jax_grad(bits, strides):
    """Forward exact; d_beta exact (the ReLU mask comes from the code exactly and
    the incoming dA is exact); the kernel gradient within the half-bin bound
    (3|gamma|/2^K per input channel times sum|dy| per tap and output channel),
    d_gamma = sum(g * x_hat) within (3/2^K) * sum|dA| per channel (x_hat decoded
    within half a bin, 3/2^K); d_x and d_kernel 1 - cos <= (3/2^K)^2."""
    rng = np.random.default_rng(bits)
    x, gamma, beta, kernel = block_inputs(rng)
    exact = lambda *a: exact_block(*a, strides=strides)  # noqa: E731
    approx = jax.jit(compressed(bits, strides))
    y_ref = exact(x, gamma, beta, kernel)
    np.testing.assert_allclose(approx(x, gamma, beta, kernel), y_ref, rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=y_ref.shape).astype(np.float32)
    g = jax.grad(lambda *a: jnp.sum(approx(*a) * dy), argnums=(0, 1, 2, 3))(x, gamma, beta, kernel)
    g_ref = jax.grad(lambda *a: jnp.sum(exact(*a) * dy), argnums=(0, 1, 2, 3))(x, gamma, beta, kernel)
    np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-4, atol=1e-4)  # d_beta
    # The decoded ReLU output is within half a bin of the exact one, and dK is linear in it;
    # 9 taps read distinct input positions, so each tap is bounded separately.
    half_bin = 3.0 * np.abs(gamma) / 2**bits
    bound = half_bin[None, None, :, None] * np.abs(dy).sum(axis=(0, 1, 2))[None, None, None, :]
    assert np.all(np.abs(np.asarray(g[3]) - np.asarray(g_ref[3])) <= bound * 1.001 + 1e-5)
    d_a = jax.vjp(
        lambda a: jax.lax.conv_general_dilated(a, kernel, strides, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        jnp.zeros_like(x),
    )[1](dy)[0]
    gamma_bound = 3.0 / 2**bits * np.abs(np.asarray(d_a)).sum(axis=(0, 1, 2))
    assert np.all(np.abs(np.asarray(g[1]) - np.asarray(g_ref[1])) <= gamma_bound * 1.001 + 1e-5)
    for a, b in (g[0], g_ref[0]), (g[3], g_ref[3]):
        a, b = np.ravel(a), np.ravel(b)
        cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
        assert 1 - cos <= (3 / 2**bits) ** 2


def tf_reference_gradients(x, gamma, beta, kernel, dy, bits, act, strides=(1, 1)):
    """(d_x, d_gamma, d_beta, d_kernel) of the compressed block from the TensorFlow
    reference's functions: bn_act_encode, decode_activation, the conv gradients of
    the decoded output (tf autodiff), bn_grad_reduce, bn_grad_input.

    The batch statistics and the folded scale come from JAX, as the block's do,
    so that both encode the same y."""
    mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
    scale = np.asarray(gamma * jax.lax.rsqrt(var + 1e-3))
    offset = beta - np.asarray(mean) * scale
    p = reference.channel_params(gamma, beta, bits, act)
    _, packed = reference.bn_act_encode(x, scale, offset, p["inv_step"], p["shift"], bits, act)
    a_dec = reference.decode_activation(packed, x.shape, p["step"], p["shift"], bits, act)
    k = tf.constant(kernel)
    with tf.GradientTape() as tape:
        tape.watch([a_dec, k])
        out = tf.nn.conv2d(a_dec, k, (1,) + tuple(strides) + (1,), "SAME")
    d_a, d_kernel = tape.gradient(out, [a_dec, k], output_gradients=tf.constant(dy))
    sum_g, sum_gx = reference.bn_grad_reduce(
        packed, d_a, p["step"], p["shift"], p["gamma"], beta, bits, act
    )
    count = float(np.prod(x.shape[:-1]))
    d_x = reference.bn_grad_input(
        packed, d_a, p["step"], p["shift"], p["gamma"], beta, scale,
        sum_g / count, sum_gx / count, bits, act,
    )
    return [t.numpy() for t in (d_x, sum_gx, sum_g, d_kernel)], p


def activation_case(bits, act, seed=0):
    """Block inputs with |gamma| up to 4 (y crosses relu6's 6), dy, and the JAX
    block's and the exact chain's (BN -> act -> conv, jax.grad) gradients."""
    rng = np.random.default_rng(seed + bits)
    x, gamma, beta, kernel = block_inputs(rng, max_gamma=4.0)
    approx = jax.jit(compressed(bits, act=act))
    exact = lambda *a: exact_block(*a, act=act)  # noqa: E731
    y_ref = exact(x, gamma, beta, kernel)
    np.testing.assert_allclose(approx(x, gamma, beta, kernel), y_ref, rtol=1e-5, atol=1e-5)
    dy = rng.normal(size=y_ref.shape).astype(np.float32)
    args, argnums = (x, gamma, beta, kernel), (0, 1, 2, 3)
    g = jax.grad(lambda *a: jnp.sum(approx(*a) * dy), argnums=argnums)(*args)
    g_ref = jax.grad(lambda *a: jnp.sum(exact(*a) * dy), argnums=argnums)(*args)
    return args, dy, [np.asarray(v) for v in g], [np.asarray(v) for v in g_ref]


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_gradients_equal_tf_reference_backward(bits, act):
    """The custom_vjp's d_x, d_gamma, d_beta, d_kernel equal the TensorFlow reference's
    backward on the same codes: to float32 rounding, plus for smooth f the secant's
    2 delta / step relative error (`edge_disagreement`)."""
    (x, gamma, beta, kernel), dy, g, _ = activation_case(bits, act)
    expected, p = tf_reference_gradients(x, gamma, beta, kernel, dy, bits, act)
    tol = 1e-5 + 2 * edge_disagreement(act, p["step"], p["shift"], bits) / p["step"].numpy().min()
    for name, a, b in zip(("d_x", "d_gamma", "d_beta", "d_kernel"), g, expected):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=name)


# 1 - cos bounds against the exact gradient: piecewise-linear f reads f' exactly
# (only x_hat and a are quantised), smooth f also its derivative.
COSINE = {8: (0.999, 0.99), 4: (0.99, 0.97)}


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("bits", [8, 4])
def test_activation_gradients_close_to_exact(bits, act):
    """Every gradient's cosine with the exact chain's (gamma of both signs); d_beta =
    sum(dL/da * f') exact for piecewise-linear f (f' and dL/da are both exact)."""
    _, _, g, g_ref = activation_case(bits, act)
    floor = COSINE[bits][0 if act.piecewise_linear else 1]
    cosines = {}
    for name, a, b in zip(("d_x", "d_gamma", "d_beta", "d_kernel"), g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        cosines[name] = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    print(json.dumps({"bits": bits, "activation": act.get_config(), "cosine": cosines}))
    assert min(cosines.values()) >= floor, cosines
    if act.piecewise_linear:
        np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act", [a for a in ACTS if a.name in ("relu6", "silu", "leaky_relu")],
                         ids=["relu6", "silu", "leaky_relu0.2", "leaky_relu0.05"])
def test_naive_mode_decodes_the_activation(act):
    """naive: the forward convolves the decoded activation output (the paper's baseline)."""
    rng = np.random.default_rng(3)
    x, gamma, beta, kernel = block_inputs(rng, max_gamma=4.0)
    block = jax_ops.compressed_block(block_config(4, act=act, naive=True))
    mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
    out = block(x.shape, x, gamma, beta, mean, var, kernel)[0]
    p = jax_ops.channel_params(gamma, beta, 4, act)
    scale = gamma * jax.lax.rsqrt(var + 1e-3)
    _, packed = jax_ops.bn_act_encode(x, scale, beta - mean * scale, p["inv_step"], p["shift"], 4, act)
    a_dec = jax_ops.decode_activation(packed, x.shape, p["step"], p["shift"], 4, act)
    head = block_config(4).heads[0]
    np.testing.assert_allclose(out, jax_ops.conv(a_dec, kernel, head), rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out) - np.asarray(exact_block(x, gamma, beta, kernel, act=act))).max() > 1e-4


@pytest.mark.parametrize("channels", [16, 64])
def test_working_set_factor_is_what_xla_assigns(channels):
    """One block's compiled gradient: XLA's temporaries are about
    `working_set_factor()` float tensors of the block input's size (the report's
    transient estimate rests on it)."""
    shape = (32, 32, 32, channels)
    block = jax_ops.compressed_block(block_config(4))

    def loss(x, gamma, beta, kernel):
        mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
        return jnp.sum(block(shape, x, gamma, beta, mean, var, kernel)[0] ** 2)

    specs = [jax.ShapeDtypeStruct(s, jnp.float32)
             for s in (shape, (channels,), (channels,), (3, 3, channels, channels))]
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    temp = grad.lower(*specs).compile().memory_analysis().temp_size_in_bytes
    factor = keras_blpa.backends.get().working_set_factor()
    assert factor - 0.5 <= temp / (np.prod(shape) * 4) <= factor + 0.5


@pytest.mark.parametrize("act", ["relu", "relu6", "silu", "gelu"])
def test_residuals_are_codes_vectors_and_kernel(act):
    """What the backward keeps: the packed 4-bit codes (1/8 of the float32 input),
    [C] vectors and the kernel; no float array of the activation's size."""
    rng = np.random.default_rng(0)
    x, gamma, beta, kernel = block_inputs(rng, shape=(4, 8, 8, 6))
    block = jax_ops.compressed_block(block_config(4, act=Activation.get(act)))
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    _, residuals = block.fwd(x.shape, x, gamma, beta, mean, var, kernel)
    leaves = jax.tree_util.tree_leaves(residuals)
    codes = [r for r in leaves if r.dtype == jnp.uint8]
    assert [c.shape for c in codes] == [(x.size // 2,)]
    others = sorted(r.shape for r in leaves if r.dtype != jnp.uint8)
    assert others == sorted([(6,)] * 5 + [kernel.shape])
    # jax.vjp of the block closes over no more than that either.
    _, vjp = jax.vjp(
        lambda x, g, b, k: block(x.shape, x, g, b, mean, var, k)[0], x, gamma, beta, kernel
    )
    assert max(leaf.size for leaf in jax.tree_util.tree_leaves(vjp) if leaf.dtype != jnp.uint8) < x.size


@pytest.mark.parametrize("case", [("silu", "silu", "sigmoid"), ("hard_silu", "relu", "hard_sigmoid")],
                         ids=["efficientnet", "mobilenet_v3"])
def test_squeeze_excite_block_matches_stock_and_keeps_codes(case):
    """A block with a squeeze-excite gate against the stock chain BN -> activation ->
    GAP / 1x1 convs / Multiply -> Conv2D: the training and inference forward equal,
    every gradient (the gate's weights included) within the smooth 4-bit cosine, and
    the residuals only codes and vectors (no float array of the activation's size)."""
    activation, inner, gate = case
    rng = np.random.default_rng(23)
    x = rng.normal(0.3, 1.5, size=(4, 8, 8, 6)).astype(np.float32)
    block = ApproxConvBlock(5, 1, bits=4, activation=activation,
                            squeeze_excite=dict(filters=3, activation=inner, gate=gate))
    block.build(x.shape)
    for v in block.trainable_variables:
        v.assign(rng.normal(0, 0.5, v.shape))
    inp = keras.Input(x.shape[1:])
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    a = Activation.get(activation).stock_layer()(bn(inp))
    reduce = keras.layers.Conv2D(3, 1, activation=inner)
    expand = keras.layers.Conv2D(6, 1, activation=keras.activations.get(gate))
    s = expand(reduce(keras.layers.Reshape((1, 1, 6))(keras.layers.GlobalAveragePooling2D()(a))))
    conv = keras.layers.Conv2D(5, 1, use_bias=False)
    stock = keras.Model(inp, conv(keras.layers.Multiply()([a, s])))
    bn.set_weights([np.asarray(v) for v in (block.gamma, block.beta, block.moving_mean,
                                            block.moving_variance)])
    conv.set_weights([np.asarray(block.kernel)])
    reduce.set_weights([np.asarray(w) for w in block.gate_weights[:2]])
    expand.set_weights([np.asarray(w) for w in block.gate_weights[2:]])
    for training in (True, False):
        np.testing.assert_allclose(block(x, training=training), stock(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    g = flat(layer_grads(block, x))
    d_x, d_stock = flat(layer_grads(stock, x))[:1], layer_grads(stock, x)[1]
    by_variable = dict(zip([id(v) for v in stock.trainable_variables], d_stock))
    order = [bn.gamma, bn.beta, conv.kernel, reduce.kernel, reduce.bias, expand.kernel, expand.bias]
    g_ref = d_x + [np.asarray(by_variable[id(v)], np.float32) for v in order]
    assert [a.shape for a in g] == [b.shape for b in g_ref]
    for a, b in zip(g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= COSINE[4][1]
    config = block._block_config()
    fn = jax_ops.compressed_block(config)
    x32 = jnp.asarray(x)
    mean, var = x32.mean((0, 1, 2)), x32.var((0, 1, 2))
    weights = [v.value for v in block.kernels + block.gate_weights]
    _, residuals = fn.fwd(x.shape, x32, block.gamma.value, block.beta.value, mean, var, *weights)
    leaves = jax.tree_util.tree_leaves(residuals)
    assert [r.shape for r in leaves if r.dtype == jnp.uint8] == [(x.size // 2,)]
    assert max(r.size for r in leaves if r.dtype != jnp.uint8) < x.size // 4


# ------------------------------------------------------------------ layers


def stock_block(filters, kernel_size, strides=1):
    return keras.Sequential(
        [
            keras.layers.BatchNormalization(epsilon=1e-3),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters, kernel_size, strides=strides, padding="same", use_bias=False),
        ]
    )


def matched_pair(rng, shape, filters, strides, bits, **kwargs):
    block = ApproxConvBlock(filters, 3, strides=strides, bits=bits, **kwargs)
    block.build(shape)
    c = shape[-1]
    gamma = rng.uniform(0.3, 1.5, c) * np.where(np.arange(c) % 2, -1, 1)
    block.gamma.assign(gamma)
    block.beta.assign(rng.uniform(-1, 1, c))
    block.moving_mean.assign(rng.uniform(-0.5, 0.5, c))
    block.moving_variance.assign(rng.uniform(0.5, 1.5, c))
    block.kernel.assign(rng.normal(0, 0.2, (3, 3, c, filters)))
    stock = stock_block(filters, 3, strides)
    stock.build(shape)
    stock.layers[0].set_weights(
        [np.asarray(v) for v in (block.gamma, block.beta, block.moving_mean, block.moving_variance)]
    )
    stock.layers[2].set_weights([np.asarray(block.kernel)])
    return block, stock


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("training", [False, True])
def test_layer_forward_equals_stock(bits, training):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 9, 7, 5)).astype(np.float32)
    block, stock = matched_pair(rng, x.shape, 6, 2, bits)
    np.testing.assert_allclose(
        block(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5
    )
    bn = stock.layers[0]
    np.testing.assert_allclose(block.moving_mean, bn.moving_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(block.moving_variance, bn.moving_variance, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_layer_activation_forward_and_gradients_match_stock(act):
    """ApproxConvBlock(activation=...) at 4 bits: the training forward equals stock
    BatchNormalization -> activation -> Conv2D; gradients within the 4-bit cosines."""
    rng = np.random.default_rng(21)
    x = rng.normal(0.5, 1.5, size=(4, 8, 8, 5)).astype(np.float32)
    kwargs = {"activation": act.name}
    if act.name == "leaky_relu":
        kwargs["negative_slope"] = act.negative_slope
    block, _ = matched_pair(rng, x.shape, 6, 1, 4, **kwargs)
    block.gamma.assign(np.asarray(block.gamma) * 3.0)  # y crosses relu6's 6
    stock = keras.Sequential([
        keras.layers.BatchNormalization(epsilon=1e-3),
        act.stock_layer(),
        keras.layers.Conv2D(6, 3, padding="same", use_bias=False),
    ])
    stock.build(x.shape)
    copy_to_stock(block, stock)
    g, g_ref = flat(layer_grads(block, x)), flat(layer_grads(stock, x))
    floor = COSINE[4][0 if act.piecewise_linear else 1]
    for a, b in zip(g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= floor
    np.testing.assert_allclose(block(x, training=True), stock(x, training=True), rtol=1e-5, atol=1e-5)


def layer_grads(layer, x):
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        ys, _ = layer.stateless_call(trainable, fixed, x, training=True)
        ys = [jnp.asarray(y, jnp.float32) for y in (ys if isinstance(ys, list) else [ys])]
        return sum(jnp.sum(jnp.sin(y) * y) for y in ys)

    return jax.grad(loss, argnums=(1, 0))(trainable, jnp.asarray(x))


def flat(grads):
    dx, dw = grads
    return [np.asarray(dx, np.float32)] + [np.asarray(g, np.float32) for g in dw]


@pytest.mark.parametrize("name", ["relu", "relu6", "silu", "linear"])
@pytest.mark.parametrize("normalization", ["frozen", "none"])
def test_layer_frozen_and_unnormalised_match_stock(normalization, name):
    """normalization="frozen" (BN frozen, conv trainable) and "none" (activation ->
    conv) at 4 bits against the stock chains: the training and inference outputs are
    equal, the trainable weights are the conv's, the moving statistics stay, and the
    input and kernel gradients are within the 4-bit cosines."""
    rng = np.random.default_rng(22)
    x = rng.normal(0.3, 1.5, size=(4, 8, 8, 5)).astype(np.float32)
    act = Activation.get(name)
    block = ApproxConvBlock(6, 3, bits=4, activation=name, normalization=normalization)
    block.build(x.shape)
    block.kernel.assign(rng.normal(0, 0.2, block.kernel.shape))
    layers = []
    if normalization == "frozen":
        bn = keras.layers.BatchNormalization(epsilon=1e-3)
        bn.build(x.shape)
        values = [rng.uniform(0.5, 1.5, 5) * np.where(np.arange(5) % 2, -1, 1),
                  rng.normal(0, 0.5, 5), rng.normal(0, 0.3, 5), rng.uniform(0.5, 2.0, 5)]
        for v, value in zip((block.gamma, block.beta, block.moving_mean, block.moving_variance), values):
            v.assign(value)
        bn.set_weights([np.asarray(v, np.float32) for v in values])
        bn.trainable = False
        layers.append(bn)
    conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False)
    stock = keras.Sequential(layers + [act.stock_layer(), conv])
    stock.build(x.shape)
    conv.set_weights([np.asarray(block.kernel)])
    before = [np.asarray(v).copy() for v in block.non_trainable_variables]
    for training in (True, False):
        np.testing.assert_allclose(block(x, training=training), stock(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    for v, old in zip(block.non_trainable_variables, before):
        np.testing.assert_array_equal(np.asarray(v), old)
    g, g_ref = flat(layer_grads(block, x)), flat(layer_grads(stock, x))
    assert len(g) == len(g_ref) == 2  # input, kernel
    floor = COSINE[4][0 if act.piecewise_linear else 1]
    for a, b in zip(g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= floor


@pytest.mark.parametrize("name", ["relu", "silu"])
def test_block_without_heads_matches_stock_bn_and_activation(name):
    """ApproxConvBlock(heads=[], return_activation=True) against stock BN -> activation
    at 8 bits: the outputs equal, the gradients (input, gamma, beta) within the
    cosines, and the residuals only the code and per-channel vectors."""
    rng = np.random.default_rng(23)
    x = rng.normal(0.3, 1.5, size=(4, 8, 8, 5)).astype(np.float32)
    act = Activation.get(name)
    block = ApproxConvBlock(heads=[], return_activation=True, bits=8, activation=name)
    block.build(x.shape)
    values = [rng.uniform(0.5, 1.5, 5) * np.where(np.arange(5) % 2, -1, 1), rng.normal(0, 0.5, 5)]
    block.gamma.assign(values[0])
    block.beta.assign(values[1])
    bn = keras.layers.BatchNormalization(epsilon=1e-3)
    stock = keras.Sequential([bn, act.stock_layer()])
    stock.build(x.shape)
    bn.set_weights([*values, np.zeros(5), np.ones(5)])
    for training in (True, False):
        np.testing.assert_allclose(block(x, training=training), stock(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    g, g_ref = flat(layer_grads(block, x)), flat(layer_grads(stock, x))
    assert len(g) == len(g_ref) == 3
    floor = COSINE[8][0 if act.piecewise_linear else 1]
    for a, b in zip(g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= floor
    fn = jax_ops.compressed_block(block._block_config())
    mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
    _, residuals = fn.fwd(x.shape, jnp.asarray(x), block.gamma.value, block.beta.value, mean, var)
    sizes = [leaf.size for leaf in jax.tree_util.tree_leaves(residuals)]
    assert max(sizes) == x.size  # the uint8 code of 8 bits, and vectors of 5
    assert [leaf.dtype for leaf in jax.tree_util.tree_leaves(residuals) if leaf.size == x.size] == [jnp.uint8]


@pytest.mark.parametrize("bits", [8, 4])
def test_layer_gradients_close_to_stock(bits):
    rng = np.random.default_rng(13)
    x = rng.normal(0.5, 1.5, size=(8, 8, 8, 6)).astype(np.float32)
    block, stock = matched_pair(rng, x.shape, 7, 2, bits)
    g, g_ref = flat(layer_grads(block, x)), flat(layer_grads(stock, x))
    assert len(g) == len(g_ref) == 4  # input, gamma, beta, kernel
    for a, b in zip(g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        assert 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) <= (3 / 2**bits) ** 2


@pytest.mark.parametrize("bits", [8, 4])
def test_two_heads_and_activation_gradients_close_to_exact(bits):
    """One code feeding a 1x1 stride-2 head, a 3x3 head with folded padding and the
    returned activation: gradients against the same block with bits=None (autodiff)."""
    rng = np.random.default_rng(5)
    x = rng.normal(0.3, 1.2, size=(4, 8, 8, 6)).astype(np.float32)
    heads = [
        dict(filters=5, kernel_size=1, strides=2),
        dict(filters=4, kernel_size=3, padding="valid", explicit_padding=((1, 1), (1, 1))),
    ]
    layers = [ApproxConvBlock(heads=heads, bits=b, return_activation=True) for b in (bits, None)]
    for layer in layers:
        layer.build(x.shape)
    layers[0].set_weights(
        [rng.uniform(0.5, 1.5, w.shape) if w.ndim == 1 else rng.normal(0, 0.2, w.shape)
         for w in layers[0].get_weights()]
    )
    layers[1].set_weights(layers[0].get_weights())
    g, g_ref = (flat(layer_grads(layer, x)) for layer in layers)
    assert len(g) == len(g_ref) == 5  # input, gamma, beta, two kernels
    for a, b in zip(g, g_ref):
        a, b = np.ravel(a), np.ravel(b)
        assert 1 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) <= (3 / 2**bits) ** 2


def test_mixed_bfloat16_gradients_match_float32():
    """Statistics and codes in float32; activation, kernel, dy rounded to bfloat16
    (relative error eps/2 each): every gradient within 4 eps of the float32 layer's."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 8, 8, 4)).astype(np.float32)
    ref, _ = matched_pair(rng, x.shape, 4, 1, 4)
    block = ApproxConvBlock(4, 3, bits=4, dtype="mixed_bfloat16")
    block.build(x.shape)
    block.set_weights(ref.get_weights())
    y = block(x, training=True)
    assert y.dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in block.weights)
    eps = 2.0**-7
    y_ref = ref(x, training=True)
    np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=2 * eps, atol=2 * eps * np.abs(y_ref).max())
    block.set_weights(ref.get_weights())  # undo the statistics update
    for a, b in zip(flat(layer_grads(block, x)), flat(layer_grads(ref, x))):
        assert np.linalg.norm(a - b) <= 4 * eps * np.linalg.norm(b)


@pytest.mark.parametrize("x_hw, s_hw, c_extra", [(8, 8, 0), (4, 8, 3), (3, 5, 2)])
def test_residual_buffer_matches_tf(x_hw, s_hw, c_extra):
    """Forward and shortcut gradient equal the TensorFlow layer's avg_pool / pad maths."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, x_hw, x_hw, 4 + c_extra)).astype(np.float32)
    s = rng.normal(size=(2, s_hw, s_hw, 4)).astype(np.float32)
    layer = ResidualBuffer()
    stride, padding, extra = keras_blpa.layers.shortcut_adapter(x.shape, s.shape)
    out = layer([x, s])

    def tf_ref(s):
        p = tf.nn.avg_pool2d(s, stride, stride, padding) if stride > 1 else s
        return x + tf.pad(p, [[0, 0], [0, 0], [0, 0], [0, extra]])

    st = tf.constant(s)
    with tf.GradientTape() as tape:
        tape.watch(st)
        ref = tf_ref(st)
        loss = tf.reduce_sum(tf.sin(ref))
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-6)
    ds = jax.grad(lambda s: jnp.sum(jnp.sin(layer([x, s]))))(jnp.asarray(s))
    np.testing.assert_allclose(ds, tape.gradient(loss, st).numpy(), rtol=1e-5, atol=1e-6)


def small_stack(bits=4, depth=4, channels=8):
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, channels))
    x = inp
    for i in range(depth):
        strides, filters = (2, 2 * channels) if i == depth // 2 else (1, x.shape[-1])
        y = ApproxConvBlock(filters, 3, strides=strides, bits=bits)(x)
        x = ResidualBuffer()([y, x])
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x))
    return keras.Model(inp, out)


def test_fit_reduces_loss():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 8)).astype(np.float32)
    y = x.mean(axis=(1, 2, 3))[:, None] * 10
    model = small_stack()
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=8, verbose=0)
    assert model.evaluate(x, y, verbose=0) < 0.5 * first


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_resnet_fits_on_jax(policy):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = keras_blpa.resnet(depth=11, num_classes=3, input_shape=(16, 16, 3), bits=4)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    blocks = [l for l in model.layers if isinstance(l, ApproxConvBlock)]
    assert blocks and all(b.compute_dtype == policy.split("_")[-1] for b in blocks)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 16, 16, 3)).astype(np.float32)
    labels = rng.integers(0, 3, 16)
    model.compile("adam", "sparse_categorical_crossentropy")
    history = model.fit(x, labels, batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(np.isfinite(np.asarray(w)).all() for w in model.weights)


def test_convert_on_jax_keeps_the_forward():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50V2(weights=None, input_shape=(32, 32, 3), classes=10)
    converted = keras_blpa.convert(model, bits=4)
    assert sum(isinstance(l, ApproxConvBlock) for l in converted.layers) > 40
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(converted(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-6)


def test_convert_on_jax_codes_the_tensor_convs_read_after_an_add():
    """Add -> 1x1 conv and Concatenate -> 3x3 conv become linear normalization="none"
    blocks: the forward is the original's, the gradients' cosines >= 0.98 at 4 bits,
    and the step's batch-sized residuals shrink by the two float tensors the convs
    kept, less their 4-bit codes."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(8, 3, padding="same", name="a")(inp)
    b = keras.layers.Conv2D(8, 3, padding="same", name="b")(a)
    add = keras.layers.Add()([a, b])
    c = keras.layers.Conv2D(8, 1, name="after_add")(add)
    cat = keras.layers.Concatenate()([c, add])
    d = keras.layers.Conv2D(4, 3, padding="same", name="after_cat")(cat)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(d))
    converted = keras_blpa.convert(model, bits=4)
    blocks = {l.name: l for l in converted.layers if isinstance(l, ApproxConvBlock)}
    assert sorted(blocks) == ["after_add", "after_cat"]
    assert all(b.normalization == "none" and b.activation.name == "linear" for b in blocks.values())
    x = np.random.default_rng(0).normal(size=(4, 8, 8, 4)).astype(np.float32)
    np.testing.assert_allclose(converted(x, training=True), model(x, training=True), rtol=1e-5, atol=1e-6)
    g, g_ref = model_grads(converted, x), model_grads(model, x)
    for key in g_ref:
        a_, b_ = np.ravel(g[key]), np.ravel(g_ref[key])
        assert a_ @ b_ / (np.linalg.norm(a_) * np.linalg.norm(b_)) >= 0.98, key
    floats = 4 * 8 * 8 * (8 + 16) * 4  # the Add's and the Concatenate's outputs, float32
    codes = 4 * 8 * 8 * (8 + 16) // 2
    assert residual_bytes(model, 4) - residual_bytes(converted, 4) >= floats - codes - 4 * 8 * 8 * 4


def test_converted_model_shares_no_array_with_the_original():
    """fit donates (and deletes) the converted model's buffers; the original must
    still predict, with its weights unchanged (convert copies them)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 3))
    x = keras.layers.BatchNormalization()(inp)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, padding="same")(x)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    before = [np.array(w) for w in model.get_weights()]
    converted = keras_blpa.convert(model, bits=4)
    assert sum(isinstance(l, ApproxConvBlock) for l in converted.layers) == 1
    data = np.random.default_rng(0).normal(size=(8, 8, 8, 3)).astype(np.float32)
    converted.compile("sgd", "mse")
    converted.fit(data, np.zeros((8, 4)), epochs=1, verbose=0)
    assert model.predict(data, verbose=0).shape == (8, 4)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------- exact recomputation


def plain_and_recomputed(depth=20, input_shape=(8, 8, 3)):
    """The stock ResNet and the same build with every unit under RecomputeGrad,
    sharing weights (copy_weights)."""
    keras.utils.set_random_seed(0)
    plain = keras_blpa.resnet(depth, 10, input_shape, bits=None, bn_momentum=0.9)
    wrapped = keras_blpa.resnet(
        depth, 10, input_shape, bits=None, bn_momentum=0.9,
        unit_wrapper=keras_blpa.models.RecomputeGrad,
    )
    keras_blpa.models.copy_weights(plain, wrapped)
    return plain, wrapped


def by_path(variables, values=None):
    values = variables if values is None else values
    return {v.path: np.asarray(x) for v, x in zip(variables, values)}


def model_grads(model, x):
    """{variable path: gradient} of a training-mode loss (jax.grad of stateless_call
    under jax.jit)."""
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(trainable):
        y, _ = model.stateless_call(trainable, fixed, x, training=True)
        return jnp.sum(jnp.sin(3.0 * y))

    return by_path(model.trainable_variables, jax.jit(jax.grad(loss))(trainable))


def test_recompute_grad_gradients_equal_plain_on_jax():
    """jax.checkpoint recomputes the same float32 forward: every gradient equals the
    unwrapped network's to float32 round-off."""
    plain, wrapped = plain_and_recomputed()
    x = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
    g_ref, g = model_grads(plain, x), model_grads(wrapped, x)
    assert sorted(g) == sorted(g_ref)
    for path, ref in g_ref.items():
        np.testing.assert_allclose(
            g[path], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=path
        )


def test_recompute_grad_moves_statistics_once_on_jax():
    """One training call moves every BN's statistics exactly as the unwrapped
    network does (once: the recomputation's update is discarded)."""
    plain, wrapped = plain_and_recomputed()
    before = by_path(plain.non_trainable_variables)
    x = np.random.default_rng(3).normal(1.0, 2.0, size=(4, 8, 8, 3)).astype(np.float32)
    for model in plain, wrapped:
        model(x, training=True)
    ref, got = by_path(plain.non_trainable_variables), by_path(wrapped.non_trainable_variables)
    assert sorted(got) == sorted(ref)
    assert all(not np.allclose(ref[p], before[p]) for p in ref)
    for path in ref:
        np.testing.assert_allclose(got[path], ref[path], rtol=1e-5, atol=1e-6, err_msg=path)


def test_recompute_grad_fit_steps_equal_plain_on_jax():
    """model.fit under jax.jit: each of four SGD steps of the recomputed network,
    from the plain network's state before it, gives the plain step's loss,
    update and moving statistics (compared as in tests/trajectories.py)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    batches = [(x[:8], labels[:8]), (x[8:], labels[8:])] * 2
    plain, wrapped = plain_and_recomputed(depth=11)
    holder = keras_blpa.resnet(11, 10, (8, 8, 3), bits=None, bn_momentum=0.9)
    for model in plain, wrapped:
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", jit_compile=True)

    def set_state(model, state):  # the plain build's weight list onto the wrapped one
        holder.set_weights(state)
        keras_blpa.models.copy_weights(holder, model)

    def get_state(model):
        keras_blpa.models.copy_weights(model, holder)
        return holder.get_weights()

    states, losses = reference_trajectory(plain, batches, fit_batch)
    steps = forced_steps(wrapped, states, batches, fit_batch, set_state, get_state)
    assert np.isfinite(losses).all()
    assert_same_steps(step_errors(states, losses, steps, [w.trainable for w in plain.weights]))


def residual_bytes(model, batch):
    """Bytes of the batch-sized arrays jax.vjp keeps for the backward of a training
    step (shapes only: jax.eval_shape)."""
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(trainable, data):
        y, _ = model.stateless_call(trainable, fixed, data, training=True)
        return jnp.mean(jnp.square(y))

    data = jax.ShapeDtypeStruct((batch,) + model.input_shape[1:], jnp.float32)
    vjp = jax.eval_shape(lambda *a: jax.vjp(loss, *a)[1], trainable, data)
    return sum(
        leaf.size * leaf.dtype.itemsize
        for leaf in jax.tree_util.tree_leaves(vjp)
        if leaf.ndim and leaf.shape[0] == batch
    )


@pytest.mark.slow
def test_recompute_grad_keeps_only_unit_inputs_on_jax():
    """ResNet-56, batch 32: under jax.checkpoint the backward keeps 6.2x fewer
    activation bytes (561.5 vs 90.9 MiB measured); asserted at 4x.

    This is what JAX asks XLA to keep. On XLA:CPU the compiled step's
    temp_size_in_bytes (step_temp_bytes) is the same with and without the
    wrapper (268 MiB both; the CPU pipeline drops jax.checkpoint's optimization
    barriers), so the compiled saving is not asserted here.
    """
    shape = (32, 32, 3)
    plain = residual_bytes(keras_blpa.resnet(56, 10, shape, bits=None), 32)
    wrapped = residual_bytes(
        keras_blpa.resnet(56, 10, shape, bits=None, unit_wrapper=keras_blpa.models.RecomputeGrad), 32
    )
    print(json.dumps({"plain_MiB": plain / 2**20, "recompute_MiB": wrapped / 2**20}))
    assert plain / wrapped >= 4.0


# ------------------------------------------------------- cross-backend files

MODEL = textwrap.dedent(
    """
    import keras, numpy as np
    from keras_blpa import ApproxConvBlock, ResidualBuffer

    def build():
        keras.utils.set_random_seed(1)
        inp = keras.Input((8, 8, 3))
        y, act = ApproxConvBlock(5, 3, bits=4, return_activation=True)(inp)
        z = ApproxConvBlock(5, 3, strides=2, bits=8, kernel_regularizer="l2", use_bias=True)(y)
        return keras.Model(inp, ResidualBuffer()([z, act]))

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
    """
)

SAVE = MODEL + textwrap.dedent(
    """
    import sys
    model = build()
    model(x, training=True)  # moves the statistics
    model.save(sys.argv[1])
    """
)

LOAD = MODEL + textwrap.dedent(
    """
    import sys
    model = keras.saving.load_model(sys.argv[1])
    np.save(sys.argv[2], np.stack([np.asarray(model(x, training=t)) for t in (False, True)]))
    """
)


def run_on(backend, script, *args):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, check=True, timeout=300)


@pytest.mark.parametrize("save_on, load_on", [("tensorflow", "jax"), ("jax", "tensorflow")])
def test_keras_file_loads_on_the_other_backend(tmp_path, save_on, load_on):
    """Inference and training-mode outputs agree to float32 conv round-off."""
    path = tmp_path / "m.keras"
    run_on(save_on, SAVE, path)
    outs = {}
    for backend in (save_on, load_on):
        run_on(backend, LOAD, path, tmp_path / f"{backend}.npy")
        outs[backend] = np.load(tmp_path / f"{backend}.npy")
    assert np.abs(outs[save_on]).max() > 0.1
    np.testing.assert_allclose(outs[load_on], outs[save_on], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------- data parallel

SYNCHRONIZED = textwrap.dedent(
    """
    import json, sys
    import jax, keras, numpy as np
    from keras_blpa import ApproxConvBlock, ResidualBuffer
    from trajectories import fit_batch, forced_steps, reference_trajectory, step_errors

    out, bits, mode = sys.argv[1], None if sys.argv[2] == "None" else int(sys.argv[2]), sys.argv[3]
    if mode == "data_parallel":
        assert len(jax.devices()) == 2
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices())
        )
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 4))
    x = inp
    for i in range(4):
        strides, filters = (2, 8) if i == 2 else (1, x.shape[-1])
        y = ApproxConvBlock(filters, 3, strides=strides, bits=bits, momentum=0.5, synchronized=True)(x)
        x = ResidualBuffer()([y, x])
    model = keras.Model(inp, keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(x)))
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(32, 8, 8, 4)).astype(np.float32)
    y = x.mean(axis=(1, 2, 3))[:, None]
    batches = [(x[:16], y[:16]), (x[16:], y[16:])] * 2
    model.compile(keras.optimizers.SGD(0.01), "mse")
    if mode == "one_device":
        states, losses = reference_trajectory(model, batches, fit_batch)
        np.savez(out + "/states.npz", *[w for state in states for w in state])
        json.dump(dict(losses=losses), open(out + "/losses.json", "w"))
    else:
        saved = np.load(out + "/states.npz")
        flat = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        n = len(model.weights)
        states = [flat[i:i + n] for i in range(0, len(flat), n)]
        losses = json.load(open(out + "/losses.json"))["losses"]
        steps = forced_steps(model, states, batches, fit_batch)
        rows = step_errors(states, losses, steps, [w.trainable for w in model.weights])
        devices = len(model.layers[1].kernel.value.sharding.device_set)
        json.dump(dict(devices=devices, rows=rows), open(out + "/errors.json", "w"))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 4])
def test_synchronized_data_parallel_steps_equal_one_device(tmp_path, bits):
    """synchronized=True on JAX: under keras.distribution.DataParallel over two
    (host) devices the layer sees the global batch as one sharded array, so each
    of four model.fit steps, from the one-device run's state before it, gives
    that run's loss, update and moving statistics (float32 round-off of the
    split reductions; compared as in tests/trajectories.py)."""
    xla_flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", XLA_FLAGS=xla_flags,
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    for mode in "one_device", "data_parallel":
        subprocess.run(
            [sys.executable, "-c", SYNCHRONIZED, str(tmp_path), str(bits), mode],
            env=env, check=True, timeout=300,
        )
    out = json.loads((tmp_path / "errors.json").read_text())
    print(json.dumps(out))
    assert out["devices"] == 2
    assert len(out["rows"]) == 4
    assert_same_steps(out["rows"])


# ------------------------------------------------------------------- memory


@pytest.mark.slow
def test_compiled_step_memory_at_least_4x_lower_than_stock():
    """30 blocks of 64 channels at 32x32, batch 64 (16 MiB per float32 activation):
    8-, 4- and 2-bit steps need at least 4x less working memory than stock Keras."""
    stock = step_temp_bytes(residual_stack("stock"), 64)
    for bits in (8, 4, 2):
        blpa = step_temp_bytes(residual_stack(str(bits)), 64)
        print(json.dumps({"bits": bits, "stock_MiB": stock / 2**20, "blpa_MiB": blpa / 2**20}))
        assert stock / blpa >= 4.0


@pytest.mark.slow
@pytest.mark.parametrize("stack,activation", [
    ("residual", "silu"), ("depthwise", "relu6"), ("squeeze_excite", "silu"),
    ("layer_norm", "linear"), ("layer_norm", "gelu"), ("pool", "relu"),
])
def test_each_chain_compiled_step_per_sample_at_least_4x_lower_than_stock(stack, activation):
    """The new chains' stacks (20 units, 64 channels at 32x32; the pooling's: 8
    4-bit blocks of 32 channels, each followed by an ArgmaxPooling2D, against
    MaxPooling2D): the compiled step's temp bytes per sample (batches 8 and 32,
    so fixed costs cancel) at 4 bits against stock Keras. Measured: silu 7.5x,
    relu6 depthwise 5.1x, squeeze-excite 11.0x, LayerNorm 13.8x (2.6x while each
    LN block's broadcast of gamma and rstd lived from its forward to its
    backward), pooling 7.5x (1.5x while XLA fused the argmax code into the
    backward, which then kept the float input and output)."""
    from keras_blpa.benchmark.stacks import STACKS

    def slope(mode):
        size = (8, 32, 32) if stack == "pool" else (20, 64, 32)
        model = STACKS[stack](mode, *size, activation=activation)
        small, large = (step_temp_bytes(model, batch) for batch in (8, 32))
        return (large - small) / 24

    stock, blpa = slope("stock"), slope("4")
    print(json.dumps({"stack": stack, "activation": activation, "stock_MiB_per_sample":
                      stock / 2**20, "blpa4_MiB_per_sample": blpa / 2**20}))
    assert stock / blpa >= 4.0


@pytest.mark.slow
def test_resnet164_compiled_step_memory_at_least_4x_lower_than_stock():
    """The paper's CIFAR ResNet-164, batch 64: 4-bit vs the same network from stock layers."""
    stock = step_temp_bytes(keras_blpa.resnet(164, 10, (32, 32, 3), bits=None), 64)
    blpa = step_temp_bytes(keras_blpa.resnet(164, 10, (32, 32, 3), bits=4), 64)
    print(json.dumps({"resnet164_stock_MiB": stock / 2**20, "resnet164_blpa4_MiB": blpa / 2**20}))
    assert stock / blpa >= 4.0


def warm_model(mode="blpa4", depth=11):
    """A benchmark model that ran one 2-sample training step (builds optimizer and metrics)."""
    from keras_blpa.benchmark import modes

    model = modes.compile_model(modes.build_model(mode, depth))
    modes.build_state(model, (32, 32, 3), 10)
    return model


def test_compiled_step_memory_counts_state_and_batch():
    """The step's arguments are exactly the state fit passes in plus the batch; the
    new state reuses (aliases) the donated buffers; the working memory grows with
    the batch."""
    from keras_blpa import memory
    from keras_blpa.benchmark import modes

    model = warm_model()
    variables = (model.trainable_variables + model.non_trainable_variables
                 + model.optimizer.variables + model.metrics_variables)
    state = sum(np.asarray(v.value).nbytes for v in variables)
    trainable = sum(np.asarray(v.value).nbytes for v in model.trainable_variables)
    steps = {}
    for batch in (8, 16, 32):
        x, y = modes.random_batch(batch, (32, 32, 3), 10)
        steps[batch] = step = memory.compiled_step_memory(model, x, y)
        assert step.argument_bytes == state + x.nbytes + y.nbytes
        assert step.alias_bytes >= trainable
        assert step.peak_bytes == step.argument_bytes + step.output_bytes - step.alias_bytes + step.temp_bytes
    growth = [steps[b].temp_bytes / steps[8].temp_bytes for b in (16, 32)]
    assert 1.6 < growth[0] < 2.4 and 3.2 < growth[1] < 4.8, growth


def test_compiled_step_memory_needs_a_built_model():
    from keras_blpa import memory
    from keras_blpa.benchmark import modes

    model = modes.compile_model(modes.build_model("exact", 11))
    with pytest.raises(ValueError, match="ran one training step"):
        memory.compiled_step_memory(model, np.zeros((2, 32, 32, 3), np.float32), np.zeros(2, np.int32))


class FakeDevice:
    """A device whose allocator keeps statistics, as a GPU's does."""

    def __init__(self):
        self.stats = {"bytes_in_use": 100, "peak_bytes_in_use": 500}

    def memory_stats(self):
        return dict(self.stats)

    def __str__(self):
        return "cuda:0"


def test_peak_memory_reads_the_device_statistics(monkeypatch):
    """JAX's CPU client keeps none (a clear error); a device that keeps them is read."""
    from keras_blpa import memory

    with pytest.raises(memory.MemoryStatsUnavailable, match="compiled_step_memory"):
        with memory.PeakMemory():
            pass
    device = FakeDevice()
    monkeypatch.setattr(jax, "local_devices", lambda: [device])
    with memory.PeakMemory() as peak:
        device.stats = {"bytes_in_use": 120, "peak_bytes_in_use": 900}
    assert (peak.device, peak.resident_bytes, peak.peak_bytes) == ("cuda:0", 100, 900)


# --------------------------------------------------- JAX without TensorFlow

NO_TENSORFLOW = textwrap.dedent(
    """
    import sys

    class NoTensorFlow:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "tensorflow":
                raise ImportError("tensorflow is blocked in this test")

    sys.meta_path.insert(0, NoTensorFlow())
    import keras, numpy as np
    import keras_blpa
    from keras_blpa import memory
    from keras_blpa.benchmark import __main__ as benchmark

    from keras_blpa import training

    model = keras_blpa.resnet(11, 10, (16, 16, 3), bits=4)
    optimizer = training.make_optimizer(0.1, total_steps=100, warmup_steps=10)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype("float32")
    assert np.isfinite(model.train_on_batch(x, np.arange(4)))
    assert memory.compiled_step_memory(model, x, np.arange(4)).peak_bytes > 0
    from keras_blpa import info
    assert info.collect()["memory_stats"].startswith("compiled step only")
    benchmark.main(["--parts", "memory", "--depths", "11", "--modes", "exact,recompute,blpa4",
                    "--batch", "8", "--memory-batches", "8", "--out", sys.argv[1]])
    assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"]
    """
)


def test_runs_without_tensorflow(tmp_path):
    """On JAX nothing imports TensorFlow: layers, factory, the paper's schedule,
    fit, memory, info and the benchmark work where it is not installed (e.g. a GPU
    machine with JAX only)."""
    subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(tmp_path)],
                   env=dict(os.environ, KERAS_BACKEND="jax"), check=True, timeout=600)
    rows = json.loads((tmp_path / "results.json").read_text())["memory"]
    assert {r["mode"] for r in rows} == {"exact", "recompute", "blpa4"}
    assert all(r["source"] == "xla-compiled" for r in rows)


# ---------------------------------------------------------------- benchmark


@pytest.mark.slow
def test_benchmark_jax_modes(tmp_path):
    """The benchmark's JAX modes: compiled-step memory per mode and the largest
    batch under a budget (trials judged on XLA's compiled step, then run)."""
    from keras_blpa.benchmark import __main__ as benchmark

    benchmark.main(["--quick", "--parts", "memory,max_batch", "--depths", "29",
                    "--max-batch-depths", "29", "--modes", "exact,recompute,blpa8,blpa4",
                    "--budget-mib", "160", "--max-batch-tol", "0.15", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["meta"]["backend"] == "jax" and "jax" in results["meta"]
    peak = {(r["mode"], r["batch"]): r["peak_mib"] for r in results["memory"]}
    print({f"{m}@{b}": v for (m, b), v in peak.items()})
    for batch in (8, 16):
        assert peak[("exact", batch)] / peak[("blpa4", batch)] >= 2.0
        assert peak[("blpa8", batch)] > peak[("blpa4", batch)]
    largest = {r["mode"]: r for r in results["max_batch"]}
    print(json.dumps({m: (r["max_batch"], r["trials"]) for m, r in largest.items()}))
    assert largest["blpa4"]["max_batch"] >= 2 * largest["exact"]["max_batch"] > 0
    for r in largest.values():
        fits = [t for t in r["trials"] if t["ok"]]
        assert all(t["peak_mib"] <= 160 and t["ms_per_sample"] > 0 for t in fits)
        assert any(not t["ok"] and t["oom"] for t in r["trials"])


# ------------------------------------------------ faults and edge cases


def copy_to_stock(block, stock):
    """The block's BN vectors and kernel into stock BatchNormalization -> ReLU -> Conv2D."""
    stock.layers[0].set_weights(
        [np.asarray(v) for v in (block.gamma, block.beta, block.moving_mean, block.moving_variance)]
    )
    stock.layers[2].set_weights([np.asarray(block.kernel)])


@pytest.mark.parametrize("bits", [None, 4])
def test_channels_first_equals_stock_on_jax(bits):
    """NCHW: forward equals stock BatchNormalization(axis=1) -> ReLU ->
    Conv2D(channels_first); gradients equal the channels_last block's on the
    transposed input (the same codes)."""
    rng = np.random.default_rng(30)
    x = rng.normal(0.5, 1.5, (3, 5, 9, 7)).astype(np.float32)
    last, _ = matched_pair(rng, np.transpose(x, (0, 2, 3, 1)).shape, 6, 2, bits)
    block = ApproxConvBlock(6, 3, strides=2, bits=bits, data_format="channels_first")
    block.build(x.shape)
    block.set_weights(last.get_weights())
    stock = keras.Sequential([
        keras.layers.BatchNormalization(axis=1),
        keras.layers.ReLU(),
        keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False, data_format="channels_first"),
    ])
    stock.build(x.shape)
    copy_to_stock(block, stock)
    g, g_last = flat(layer_grads(block, x)), flat(layer_grads(last, np.transpose(x, (0, 2, 3, 1))))
    g_last[0] = np.transpose(g_last[0], (0, 3, 1, 2))
    for a, b in zip(g, g_last):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for training in (True, False):
        np.testing.assert_allclose(block(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["float16", "bfloat16"])
@pytest.mark.parametrize("bits", [None, 4])
def test_non_mixed_dtype_policy_matches_stock_on_jax(policy, bits):
    """Variables and outputs in the policy's dtype, statistics in float32: the forward
    equals the stock layers' to the dtype's rounding; a fit step gives their loss.
    (float64 needs jax_enable_x64, which these tests leave off: Keras gives float32.)"""
    rng = np.random.default_rng(33)
    x = rng.normal(0.5, 1.5, (4, 6, 6, 3)).astype(np.float32)
    block = ApproxConvBlock(5, 3, bits=bits, dtype=policy)
    stock = keras.Sequential([
        keras.layers.BatchNormalization(dtype=policy),
        keras.layers.ReLU(dtype=policy),
        keras.layers.Conv2D(5, 3, padding="same", use_bias=False, dtype=policy),
    ])
    block.build(x.shape)
    stock.build(x.shape)
    copy_to_stock(block, stock)
    assert all(v.dtype == policy for v in block.weights)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}[policy]
    for training in (True, False):
        y, y_ref = block(x, training=training), stock(x, training=training)
        assert y.dtype == policy
        y, y_ref = np.asarray(y, np.float32), np.asarray(y_ref, np.float32)
        np.testing.assert_allclose(y, y_ref, rtol=4 * eps, atol=4 * eps * np.abs(y_ref).max())
    target = rng.normal(size=(4, 1)).astype(np.float32)
    losses = []
    for layers in ([block], stock.layers):
        inp = keras.Input(x.shape[1:])
        h = inp
        for layer in layers:
            h = layer(h)
        h = keras.layers.GlobalAveragePooling2D(dtype=policy)(h)
        model = keras.Model(inp, keras.layers.Dense(1, kernel_initializer="ones", dtype=policy)(h))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        losses.append(model.train_on_batch(x, target))
    assert np.isfinite(losses[0])
    np.testing.assert_allclose(losses[0], losses[1], rtol=16 * eps)


def test_second_order_gradient_is_refused_on_jax():
    """JAX would differentiate the compressed backward (which reads codes) without a
    word; it refuses with the TensorFlow block's message. bits=None: stock's value."""
    rng = np.random.default_rng(34)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)).astype(np.float32))

    def penalty_grad(layer):
        trainable = [v.value for v in layer.trainable_variables]
        fixed = [v.value for v in layer.non_trainable_variables]

        def loss(x, trainable):
            y, _ = layer.stateless_call(trainable, fixed, x, training=True)
            return jnp.sum(jnp.sin(y))

        return jax.grad(lambda t: jnp.sum(jax.grad(loss)(x, t) ** 2))(trainable)

    block, stock = matched_pair(rng, x.shape, 4, 1, 4)
    with pytest.raises(ValueError, match="no second derivative.*bits=None. Received: bits=4"):
        penalty_grad(block)
    with pytest.raises(ValueError, match="no second derivative"):
        jax.jit(lambda: penalty_grad(block))()
    assert all(np.isfinite(g).all() for g in flat(layer_grads(block, x)))  # first order: unaffected
    exact = ApproxConvBlock(4, 3, bits=None)
    exact.build(x.shape)
    exact.set_weights(block.get_weights())
    for a, b in zip(penalty_grad(exact), penalty_grad(stock)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ------------------------------------------------ heads other than Conv2D


def head_cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


HEAD_LAYERS = {
    "depthwise": lambda: keras.layers.DepthwiseConv2D(
        3, strides=2, padding="valid", depth_multiplier=2, name="head"
    ),
    "dense": lambda: keras.layers.Dense(7, name="head"),
    "separable": lambda: keras.layers.SeparableConv2D(5, 3, padding="same", name="head"),
}


@pytest.mark.parametrize("kind", sorted(HEAD_LAYERS))
def test_head_kind_matches_stock_chain_on_jax(kind):
    """BN -> ReLU6 -> DepthwiseConv2D / Dense / SeparableConv2D, converted at 4 bits:
    a depthwise or dense head (the separable's pointwise part a stock 1x1 Conv2D);
    forward equal to the stock chain, every gradient's cosine >= 0.99."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    inp = keras.Input((10, 10, 6))
    bn = keras.layers.BatchNormalization()
    stock = keras.Model(inp, HEAD_LAYERS[kind]()(keras.layers.ReLU(6.0)(bn(inp))))
    gamma = rng.uniform(0.3, 1.5, 6) * rng.choice([-1.0, 1.0], 6)
    bn.set_weights([gamma, rng.normal(0, 0.5, 6), rng.normal(0, 0.3, 6), rng.uniform(0.5, 2, 6)])
    head = stock.get_layer("head")
    head.set_weights([rng.normal(0, 0.5, w.shape) for w in head.get_weights()])
    converted = keras_blpa.convert(stock, bits=4)
    (block,) = [l for l in converted.layers if isinstance(l, ApproxConvBlock)]
    assert block.heads[0].kind == ("dense" if kind == "dense" else "depthwise")
    x = (rng.normal(size=(4, 10, 10, 6)) + rng.normal(0, 1, 6)).astype(np.float32)
    for training in (False, True):
        np.testing.assert_allclose(
            converted(x, training=training), stock(x, training=training), rtol=1e-5, atol=1e-5
        )

    def grads(model):
        trainable = [v.value for v in model.trainable_variables]
        fixed = [v.value for v in model.non_trainable_variables]

        def loss(trainable):
            y, _ = model.stateless_call(trainable, fixed, x, training=True)
            return jnp.sum(jnp.sin(y) * y)

        return [np.asarray(g) for g in jax.jit(jax.grad(loss))(trainable)]

    g, g_ref = grads(converted), grads(stock)
    assert [a.shape for a in g] == [b.shape for b in g_ref]
    for a, b in zip(g, g_ref):
        assert head_cosine(a, b) >= 0.99
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-4)  # d_beta: exact mask


def test_depthwise_head_equals_keras_depthwise_conv_on_jax():
    """The JAX head's channel order is Keras' (c * multiplier + m), explicit padding too."""
    rng = np.random.default_rng(1)
    a = rng.normal(size=(2, 7, 7, 3)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 3, 2)).astype(np.float32)
    head = Head.from_dict(dict(kind="depthwise", kernel_size=3, strides=2, padding="valid",
                               depth_multiplier=2, explicit_padding=((1, 1), (0, 1))))
    padded = np.pad(a, ((0, 0), (1, 1), (0, 1), (0, 0)))
    ref = keras.ops.depthwise_conv(padded, kernel, strides=2, padding="valid")
    np.testing.assert_allclose(jax_ops.conv(a, kernel, head), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------- normalization="layer"


def layer_norm_pair(rng, name, bits, kind, c=32, filters=12):
    """A normalization="layer" block and the stock LayerNormalization(epsilon=1e-6) ->
    activation -> Dense / 3x3 Conv2D chain, same weights (gamma of both signs, one
    near 0)."""
    head = dict(kind="dense") if kind == "dense" else dict(kernel_size=3)
    block = ApproxConvBlock(filters, bits=bits, use_bias=True, activation=name,
                            normalization="layer", epsilon=1e-6, **head)
    block.build((4, 8, 8, c))
    gamma = rng.uniform(0.5, 1.5, c) * np.where(np.arange(c) % 2, 1.0, -1.0)
    gamma[3] = 1e-3
    values = [gamma, rng.normal(0, 0.5, c), rng.normal(0, 0.3, block.kernel.shape),
              rng.normal(0, 0.1, filters)]
    values = [np.asarray(v, np.float32) for v in values]
    for variable, value in zip(block.weights, values):
        variable.assign(value)
    ln = keras.layers.LayerNormalization(epsilon=1e-6)
    out = keras.layers.Dense(filters) if kind == "dense" else keras.layers.Conv2D(filters, 3, padding="same")
    stock = keras.Sequential([ln, Activation.get(name).stock_layer(), out])
    stock.build((4, 8, 8, c))
    ln.set_weights(values[:2])
    out.set_weights(values[2:])
    return block, stock


def layer_norm_data(rng, shape=(4, 8, 8, 32)):
    c = shape[-1]
    return (rng.normal(0.3, 1.5, shape) * rng.uniform(0.5, 2.0, c)
            + rng.normal(0.0, 1.0, c)).astype(np.float32)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", ["linear", "relu", "gelu"])
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_layer_norm_block_matches_stock_on_jax(kind, name, bits):
    """Forward equal to stock LayerNormalization -> activation -> head in training and
    inference; input, gamma, beta, kernel and bias gradients at the TensorFlow tests'
    goals (d_gamma behind a conv head at 4 bits: 0.98, as there); d_beta exact for
    piecewise-linear activations."""
    from chains import GOALS
    from chains import assert_gradients_meet_goal

    rng = np.random.default_rng(31)
    x = layer_norm_data(rng)
    block, stock = layer_norm_pair(rng, name, bits, kind)
    for training in (True, False):
        np.testing.assert_allclose(block(x, training=training), stock(x, training=training),
                                   rtol=1e-5, atol=1e-5)
    g, g_ref = flat(layer_grads(block, x)), flat(layer_grads(stock, x))
    assert len(g) == len(g_ref) == 5  # input, gamma, beta, kernel, bias
    piecewise = Activation.get(name).piecewise_linear
    goal = GOALS["piecewise_linear" if piecewise else "smooth"][bits]
    others = range(5)
    if kind == "conv" and bits == 4:
        assert_gradients_meet_goal(g[1:2], g_ref[1:2], min(goal, 0.98))
        others = [0, 2, 3, 4]
    assert_gradients_meet_goal([g[i] for i in others], [g_ref[i] for i in others], goal)
    if piecewise:
        np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-4, atol=1e-4)


def test_layer_norm_residuals_are_codes_vectors_and_rstd():
    """The LN block keeps the packed code, [C] vectors, the kernel and one float per
    position (rsqrt(var + eps)); no float array of the activation's size."""
    rng = np.random.default_rng(32)
    x = jnp.asarray(layer_norm_data(rng, (4, 8, 8, 6)))
    gamma, beta = jnp.ones(6), jnp.zeros(6)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 6, 1)), jnp.float32)
    config = dataclasses_replace(block_config(4), normalization="layer", epsilon=1e-6)
    block = jax_ops.compressed_block(config)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    _, residuals = block.fwd(x.shape, x, gamma, beta, mean, var, kernel)
    leaves = jax.tree_util.tree_leaves(residuals)
    assert [r.shape for r in leaves if r.dtype == jnp.uint8] == [(x.size // 2,)]
    others = sorted(r.shape for r in leaves if r.dtype != jnp.uint8)
    assert others == sorted([(6,)] * 7 + [kernel.shape, (4, 8, 8, 1)])


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)



def test_step_breakdown_reads_the_compiled_step():
    """keras_blpa.memory.step_breakdown on JAX: XLA's live set at the compiled step's
    peak. Its parts add up to compiled_step_memory's peak; stock Keras has no uint8 code
    and mostly floats; at 4 bits the live floats are a fraction of stock's and the codes
    are there, no more than the blocks' code bytes by count (elements x bits / 8)."""
    from keras_blpa import memory
    from keras_blpa.benchmark import modes

    found = {}
    for mode in ("exact", "blpa4"):
        model = warm_model(mode, depth=20)
        x, y = modes.random_batch(32, (32, 32, 3), 10)
        b = memory.step_breakdown(model, x, y)
        parts = [b.resident_bytes, b.codes_bytes, b.float_bytes, b.fragmentation_bytes]
        assert min(parts) >= 0 and sum(parts) == b.peak_bytes
        assert b.peak_bytes == memory.compiled_step_memory(model, x, y).peak_bytes
        found[mode] = (model, b)
    exact, (model, four) = found["exact"][1], found["blpa4"]
    assert exact.codes_bytes == 0 and exact.float_bytes > 0.5 * (exact.peak_bytes - exact.resident_bytes)
    blocks = [l for l in model.layers if isinstance(l, ApproxConvBlock)]
    by_count = sum(packed_size(int(np.prod((32,) + tuple(l.input.shape[1:]))), 4) for l in blocks)
    assert 0 < four.codes_bytes <= by_count
    assert four.float_bytes < 0.35 * exact.float_bytes


# ------------------------------------------- chunked backward, peak breakdown


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("with_activation", [False, True])
def test_chunked_heads_backward_equals_whole_batch(monkeypatch, bits, act, with_activation):
    """The heads' backward over batch chunks (two heads, a strided 3x3 and a 1x1) gives
    today's whole-batch gradients within float rounding; the chunk counts are as stated."""
    shape = (8, 6, 6, 6)
    heads = (Head(filters=1, kernel_size=(3, 3), strides=(2, 2)),
             Head(filters=1, kernel_size=(1, 1), strides=(1, 1)))
    config = BlockConfig(bits=bits, epsilon=1e-3, heads=heads, compute_dtype="float32",
                         activation=Activation.get(act), with_activation=with_activation)
    block = jax_ops.compressed_block(config)
    rng = np.random.default_rng(bits)
    x, gamma, beta, k1 = block_inputs(rng, shape, filters=5)
    k2 = rng.normal(0, 0.2, (1, 1, 6, 4)).astype(np.float32)

    def loss(x, gamma, beta, k1, k2):
        mean, var = jnp.mean(x, (0, 1, 2)), jnp.var(x, (0, 1, 2))
        return sum(jnp.sum(jnp.sin(t)) for t in block(shape, x, gamma, beta, mean, var, k1, k2))

    sample_bytes = 6 * 6 * 6 * 4
    outs = [jnp.zeros((8, 3, 3, 5)), jnp.zeros((8, 6, 6, 4))]
    grads = {}
    for chunk_bytes, chunks in ((None, 1), (2 * sample_bytes, 4), (sample_bytes, 8)):
        monkeypatch.setattr(jax_ops, "CHUNK_BYTES", chunk_bytes)
        assert jax_ops.batch_chunks(shape, outs, bits) == chunks
        grads[chunks] = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, gamma, beta, k1, k2)
    for chunks in (4, 8):
        for whole, chunked in zip(grads[1], grads[chunks]):
            np.testing.assert_allclose(chunked, whole, rtol=2e-5, atol=2e-6 * np.abs(whole).max())


def test_batch_chunks_divide_the_batch_and_respect_the_bound(monkeypatch):
    outs = [jnp.zeros((256, 32, 32, 16))]
    assert jax_ops.batch_chunks((256, 32, 32, 64), outs, 4, chunk_bytes=4 * 2**20) == 16
    assert jax_ops.batch_chunks((256, 32, 32, 64), outs, 4) == 8  # CHUNK_BYTES, 8 MiB
    monkeypatch.setattr(jax_ops, "CHUNK_BYTES", None)
    assert jax_ops.batch_chunks((256, 32, 32, 64), outs, 4) == 1
    assert jax_ops.batch_chunks((6, 4, 4, 8), [jnp.zeros((6, 4, 4, 8))], 4, chunk_bytes=2 * 512) == 3
    # Whole when it fits; a prime batch larger than the bound goes sample by sample.
    assert jax_ops.batch_chunks((7, 4, 4, 8), [jnp.zeros((7, 4, 4, 8))], 4, chunk_bytes=7 * 512) == 1
    assert jax_ops.batch_chunks((7, 4, 4, 8), [jnp.zeros((7, 4, 4, 8))], 4, chunk_bytes=3 * 512) == 7
    # 8 bits, or a sample's codes that do not fill whole bytes: no chunks.
    assert jax_ops.batch_chunks((256, 32, 32, 64), outs, 8, chunk_bytes=4 * 2**20) == 1
    assert jax_ops.batch_chunks((8, 1, 1, 3), [jnp.zeros((8, 1, 1, 3))], 2, chunk_bytes=8) == 1


def test_peak_buffers_accounts_for_the_codes_and_the_temp_buffer():
    """peak_buffers on a small model (ResNet-11, batch 8): its categories sum to the
    live temporaries, which cover the temp buffer but for a little fragmentation; every
    live code buffer is one block's K bits per element of its input (counted here from
    the layers' input shapes), and some are live; the largest buffers are the model's."""
    from keras_blpa.backends.jax.memory import peak_buffers
    from keras_blpa import memory
    from keras_blpa.benchmark import modes

    model = warm_model("blpa4", 11)
    batch = 8
    x, y = modes.random_batch(batch, (32, 32, 3), 10)
    peak = peak_buffers(model, x, y, top=5)
    assert peak["temp_bytes"] == memory.compiled_step_memory(model, x, y).temp_bytes
    assert sum(peak["categories"].values()) == peak["temp_live_bytes"]
    assert 0.97 * peak["temp_bytes"] <= peak["temp_live_bytes"] <= peak["temp_bytes"]
    code_sizes = sorted(
        batch * int(np.prod(layer.input.shape[1:])) * 4 // 8
        for layer in model.layers if isinstance(layer, ApproxConvBlock)
    )
    assert len(code_sizes) == 10  # 9 BN-ReLU-conv blocks and the final BN-ReLU
    everything = peak_buffers(model, x, y, top=10**6)["largest"]
    live_codes = sorted(v["bytes"] for v in everything if v["category"] == "codes")
    assert live_codes and set(live_codes) <= set(code_sizes), (live_codes, code_sizes)
    assert sum(live_codes) == peak["categories"]["codes"] <= sum(code_sizes)
    floats = sum(b for _, b in peak["float_temps_by_shape"].values())
    assert floats == sum(peak["categories"].get(c, 0) for c in (
        "per-channel vectors", "weight-shaped floats", "activation-sized floats"))
    assert len(peak["largest"]) == 5 and peak["largest"][0]["bytes"] >= peak["largest"][-1]["bytes"]
