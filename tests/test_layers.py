"""ApproxConvBlock and ResidualBuffer against stock Keras layers."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_blpa
from chains import assert_forward_and_statistics_match
from chains import channels_first
from keras_blpa import ApproxConvBlock, ResidualBuffer


def stock_block(filters, kernel_size, strides=1, padding="same", epsilon=1e-3, use_bias=False):
    return keras.Sequential(
        [
            keras.layers.BatchNormalization(epsilon=epsilon),
            keras.layers.ReLU(),
            keras.layers.Conv2D(filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias),
        ]
    )


def random_weights(block, rng):
    """Random gamma (both signs, |gamma| in [0.3, 1.5]), beta, statistics and kernel.

    The first weight of a block is gamma; every other 1-D weight (beta, moving
    mean and variance, bias) is positive in [0.3, 1.5].
    """
    weights = []
    for i, w in enumerate(block.get_weights()):
        if w.ndim == 1:
            v = rng.uniform(0.3, 1.5, w.shape)
            if i == 0:
                v *= np.where(np.arange(w.size) % 2 == 0, 1.0, -1.0)
            weights.append(v.astype(np.float32))
        else:
            weights.append(rng.normal(0, 0.2, w.shape).astype(np.float32))
    block.set_weights(weights)


def copy_to_stock(block, stock):
    """Copies ApproxConvBlock weights into the equivalent stock Sequential."""
    bn, conv = (next(l for l in stock.layers if type(l) is kind)
                for kind in (keras.layers.BatchNormalization, keras.layers.Conv2D))
    bn.set_weights([w.numpy() for w in (block.gamma, block.beta, block.moving_mean, block.moving_variance)])
    conv.set_weights([block.kernel.numpy()] + ([block.bias.numpy()] if block.use_bias else []))

def grads(layer, x, training=True):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=training)
        loss = tf.reduce_sum(tf.sin(y) * y)
    return y, tape.gradient(loss, [x] + layer.trainable_weights)


def cosine(a, b):
    a, b = np.ravel(a), np.ravel(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


FORWARD_CASES = [
    # shape, filters, kernel, strides, padding, use_bias
    ((2, 8, 8, 3), 4, 3, 1, "same", False),
    ((3, 9, 7, 5), 6, 3, 2, "same", True),
    ((1, 10, 10, 4), 2, 1, 1, "valid", False),
    ((2, 11, 11, 6), 8, 3, 2, "valid", False),
    ((4, 5, 5, 2), 3, 1, 2, "same", False),
]


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("bits", [None, 8, 4, 2])
def test_forward_equals_stock(ops_path, case, bits):
    shape, filters, k, s, padding, use_bias = case
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, shape).astype(np.float32)
    block = ApproxConvBlock(filters, k, strides=s, padding=padding, bits=bits, use_bias=use_bias)
    block.build(shape)
    random_weights(block, rng)
    stock = stock_block(filters, k, s, padding, use_bias=use_bias)
    stock.build(shape)
    copy_to_stock(block, stock)
    assert_forward_and_statistics_match(block, stock, x)


def test_exact_gradients_equal_stock():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 8, 8, 5)).astype(np.float32)
    block = ApproxConvBlock(6, 3, strides=2, bits=None, use_bias=True)
    block.build(x.shape)
    random_weights(block, rng)
    stock = stock_block(6, 3, 2, use_bias=True)
    stock.build(x.shape)
    copy_to_stock(block, stock)
    _, g = grads(block, x)
    _, g_ref = grads(stock, x)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_single_block_kernel_gradient_within_bin_bound(ops_path, bits):
    """|dK - dK_exact| <= (half bin) * sum|dy| per tap: the decoded ReLU output is within
    3|gamma|/2^K of the exact one, and dK is linear in it (dy is the same: the forward is exact)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 6, 6, 3)).astype(np.float32)
    block = ApproxConvBlock(4, 1, bits=bits)
    block.build(x.shape)
    random_weights(block, rng)
    exact = ApproxConvBlock(4, 1, bits=None)
    exact.build(x.shape)
    exact.set_weights(block.get_weights())
    dy = rng.normal(size=(4, 6, 6, 4)).astype(np.float32)

    def kernel_grad(layer):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(layer(x, training=True) * dy)
        return tape.gradient(loss, layer.kernel).numpy()

    half_bin = 3.0 * np.abs(block.gamma.numpy()) / 2**bits  # per input channel
    bound = half_bin[None, None, :, None] * np.abs(dy).sum(axis=(0, 1, 2))[None, None, None, :]
    err = np.abs(kernel_grad(block) - kernel_grad(exact))
    assert np.all(err <= bound * 1.001 + 1e-5)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_relu_mask_exact_for_negative_and_near_zero_gamma(ops_path, bits):
    """The mask comes from the code, exactly: d_beta = sum(dA * mask) then equals
    stock Keras' at any bit width (dA = conv input gradient, exact since the forward
    is). Channels: gamma of both signs, tiny, and zero; beta positive, negative, zero."""
    rng = np.random.default_rng(12)
    gamma = np.array([1.2, -0.7, 1e-4, -1e-4, 0.0, -1.3, 0.5, -2e-6], np.float32)
    beta = np.array([0.0, 0.3, -0.2, 1e-5, 0.4, -0.5, 0.0, 0.0], np.float32)
    x = rng.normal(size=(3, 6, 6, 8)).astype(np.float32)
    block = ApproxConvBlock(5, 3, bits=bits)
    block.build(x.shape)
    random_weights(block, rng)
    block.gamma.assign(gamma)
    block.beta.assign(beta)
    stock = stock_block(5, 3)
    stock.build(x.shape)
    copy_to_stock(block, stock)
    y, g = grads(block, x)
    y_ref, g_ref = grads(stock, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[2], g_ref[2], rtol=1e-5, atol=1e-5)  # d_beta
    # Where the stock ReLU is inactive everywhere in a channel, no gradient may
    # leak through the approximate backward either.
    a_ref = keras.layers.ReLU()(stock.layers[0](x, training=True)).numpy()
    dead = np.all(a_ref == 0, axis=(0, 1, 2))
    assert dead.any() and not dead.all()
    np.testing.assert_array_equal(g[1][dead], 0.0)


@pytest.mark.parametrize("bits", [8, 4])
def test_compressed_gradients_close_to_stock_with_mixed_sign_gamma(ops_path, bits):
    """All gradients against stock BN+ReLU+Conv2D with gamma of both signs.

    The decoded activation is within half a bin (3|gamma| / 2^K, i.e. 3 / 2^K
    standard units) of the exact one, so the relative error of each gradient is
    of the order of the bin half-width over the activation scale (~1): 1 - cos <=
    (3 / 2^K)^2 with margin.
    """
    rng = np.random.default_rng(13)
    x = rng.normal(0.5, 1.5, size=(8, 8, 8, 6)).astype(np.float32)
    block = ApproxConvBlock(7, 3, strides=2, bits=bits, use_bias=True)
    block.build(x.shape)
    random_weights(block, rng)
    stock = stock_block(7, 3, 2, use_bias=True)
    stock.build(x.shape)
    copy_to_stock(block, stock)
    _, g = grads(block, x)
    _, g_ref = grads(stock, x)
    for a, b in zip(g, g_ref):
        assert 1 - cosine(a, b) <= (3 / 2**bits) ** 2


def deep_stack(bits, depth=20, channels=8, quantization="blpa", stock=False, seed=3):
    """`depth` blocks with residual merges (a stride-2, channel-doubling one in the middle)."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16, 16, channels))
    x = inp
    for i in range(depth):
        filters, strides = (2 * channels, 2) if i == depth // 2 else (x.shape[-1], 1)
        if stock:
            y = keras.layers.BatchNormalization()(x)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(y)
            if strides == 1:
                x = keras.layers.Add()([y, x])
            else:
                x = y
        else:
            y = ApproxConvBlock(filters, 3, strides=strides, bits=bits, quantization=quantization)(x)
            x = ResidualBuffer()([y, x]) if strides == 1 else y
    out = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, out)


def stack_gradients(model, x):
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(tf.sin(3.0 * model(x, training=True)))
    return [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


def set_gamma_beta(model, rng):
    for layer in model.layers:
        if isinstance(layer, (ApproxConvBlock, keras.layers.BatchNormalization)):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 0.5, layer.beta.shape))


@pytest.mark.slow
def test_deep_stack_gradients(ops_path):
    x = np.random.default_rng(4).normal(size=(8, 16, 16, 8)).astype(np.float32)

    def grads_for(**kw):
        model = deep_stack(**kw)
        set_gamma_beta(model, np.random.default_rng(5))
        return stack_gradients(model, x)

    g_exact = grads_for(bits=None)
    exact, stock = deep_stack(bits=None), deep_stack(bits=None, stock=True)
    set_gamma_beta(exact, np.random.default_rng(5))
    blocks = [l for l in exact.layers if isinstance(l, ApproxConvBlock)]
    bns = [l for l in stock.layers if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in stock.layers if isinstance(l, keras.layers.Conv2D)]
    for block, bn, conv in zip(blocks, bns, convs):
        bn.set_weights([w.numpy() for w in (block.gamma, block.beta, block.moving_mean, block.moving_variance)])
        conv.set_weights([block.kernel.numpy()])
    g_stock = stack_gradients(stock, x)
    np.testing.assert_allclose(stack_gradients(exact, x)[-1], g_exact[-1], rtol=1e-5)
    order = [w.path.split("/")[-1] for w in exact.trainable_weights]
    stock_by_kind = {k: [g for g, w in zip(g_stock, stock.trainable_weights) if w.path.endswith(k)] for k in ("gamma", "beta", "kernel")}
    for name, a in zip(order, g_exact):
        kind = "bias" if name == "bias" else name
        if kind in stock_by_kind:
            np.testing.assert_allclose(a, stock_by_kind[kind].pop(0), rtol=2e-3, atol=2e-4)
    cos = {}
    for name, kw in {"8": dict(bits=8), "4": dict(bits=4), "naive4": dict(bits=4, quantization="naive")}.items():
        cos[name] = np.array([cosine(a, b) for a, b in zip(grads_for(**kw), g_exact)])
        print(name, "min cosine", cos[name].min(), "mean", cos[name].mean())
    # Bin width w = 6/2^K std units: the decoded activation's error has variance at most
    # w^2/12 of a unit-variance activation (uniform within a bin), and each block's error
    # adds to the gradients below it, so on average 1 - cos <= depth * w^2 / 12; a single
    # variable (small, cancelling gradients) gets the looser 1 - cos <= depth * w^2.
    for bits in (8, 4):
        w2 = (6 / 2**bits) ** 2
        assert 1 - cos[str(bits)].mean() <= 20 * w2 / 12
        assert 1 - cos[str(bits)].min() <= 20 * w2
    assert cos["8"].mean() > cos["4"].mean()
    # The naive baseline's forward error compounds: measurably worse than blpa.
    assert cos["naive4"].mean() < cos["4"].mean() - 0.01


def test_return_activation_gives_shortcut_after_bn_relu(ops_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    results = {}
    for bits in (None, 8):
        keras.utils.set_random_seed(0)
        inp = keras.Input((8, 8, 4))
        y, act = ApproxConvBlock(4, 3, bits=bits, return_activation=True)(inp)
        model = keras.Model(inp, ResidualBuffer()([y, act]))
        stock_act = keras.layers.ReLU()(keras.layers.BatchNormalization()(x, training=True))
        with tf.GradientTape() as tape:
            out = model(x, training=True)
            loss = tf.reduce_sum(out * out)
        results[bits] = [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]
        block = model.layers[1]
        np.testing.assert_allclose(
            out, stock_act + keras.ops.conv(stock_act, block.kernel, padding="same"),
            rtol=1e-5, atol=1e-5
        )
    for a, b in zip(results[8], results[None]):
        assert cosine(a, b) > 0.999


def test_residual_buffer_matches_numpy():
    # What it keeps for the backward is measured where it counts, in a compiled
    # step: tests/test_memory.py's residual stack (allocator peak vs stock).
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
    s = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    pooled = s.reshape(2, 4, 2, 4, 2, 4).mean(axis=(2, 4))
    expected = x + np.concatenate([pooled, np.zeros((2, 4, 4, 2), np.float32)], axis=-1)
    xt, st = tf.constant(x), tf.constant(s)
    with tf.GradientTape() as tape:
        tape.watch([xt, st])
        out = ResidualBuffer()([xt, st])
        loss = tf.reduce_sum(out * tf.range(1.0, 7.0))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    dx, ds = tape.gradient(loss, [xt, st])
    with tf.GradientTape() as tape:
        tape.watch(st)
        ref = xt + tf.pad(tf.nn.avg_pool2d(st, 2, 2, "SAME"), [[0, 0], [0, 0], [0, 0], [0, 2]])
        loss = tf.reduce_sum(ref * tf.range(1.0, 7.0))
    np.testing.assert_allclose(ds, tape.gradient(loss, st), rtol=1e-6)
    np.testing.assert_allclose(dx, np.broadcast_to(np.arange(1.0, 7.0), x.shape))
    with pytest.raises(ValueError, match="shortcut shape"):
        ResidualBuffer()([tf.zeros([1, 4, 4, 2]), tf.zeros([1, 4, 4, 3])])


@pytest.mark.parametrize(
    "x_hw, s_hw",
    [((4, 4), (8, 8)), ((4, 3), (7, 5)), ((2, 2), (5, 5)), ((3, 3), (9, 8)), ((2, 3), (5, 9))],
)
def test_residual_buffer_gradient_matches_avg_pool_autodiff(x_hw, s_hw):
    """Odd sizes too (SAME padding, partial windows; VALID dropping a tail)."""
    rng = np.random.default_rng(11)
    x = tf.constant(rng.normal(size=(2, *x_hw, 5)).astype(np.float32))
    s = tf.constant(rng.normal(size=(2, *s_hw, 3)).astype(np.float32))
    stride, padding, extra = keras_blpa.layers.shortcut_adapter(x.shape, s.shape)
    weights = tf.constant(rng.normal(size=(2, *x_hw, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        tape.watch(s)
        loss = tf.reduce_sum(ResidualBuffer()([x, s]) * weights)
    with tf.GradientTape() as ref_tape:
        ref_tape.watch(s)
        pooled = tf.nn.avg_pool2d(s, stride, stride, padding)
        ref = x + tf.pad(pooled, [[0, 0], [0, 0], [0, 0], [0, extra]])
        ref_loss = tf.reduce_sum(ref * weights)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, s), ref_tape.gradient(ref_loss, s), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(ops_path, policy):
    """Every gradient (input, gamma, beta, kernel) matches the float32 layer's.

    Both layers decode the same float32 codes; the mixed one rounds the
    activation, kernel and incoming gradient to the compute dtype (relative
    error eps / 2 each), so products and sums differ by about eps relative.
    """
    rng = np.random.default_rng(8)
    x = rng.normal(size=(4, 8, 8, 4)).astype(np.float16).astype(np.float32)
    ref = ApproxConvBlock(4, 3, bits=4)
    ref.build(x.shape)
    random_weights(ref, rng)
    y_ref, g_ref = grads(ref, x)
    block = ApproxConvBlock(4, 3, bits=4, dtype=policy)
    block.build(x.shape)
    block.set_weights(ref.get_weights())
    y, g = grads(block, x)
    compute = policy.split("_")[1]
    assert y.dtype == compute
    assert all(v.dtype == "float32" for v in block.weights)
    eps = float(np.finfo(np.float16).eps) if compute == "float16" else 2.0**-7
    np.testing.assert_allclose(y, y_ref, rtol=2 * eps, atol=2 * eps * np.abs(y_ref).max())
    assert len(g) == len(g_ref) == 4  # input, gamma, beta, kernel
    for a, b in zip(g, g_ref):
        a, b = np.asarray(a, np.float32), np.asarray(b)
        assert np.linalg.norm(a - b) <= 4 * eps * np.linalg.norm(b)


def test_xla_compiled_training_step():
    rng = np.random.default_rng(9)
    x = tf.constant(rng.normal(size=(2, 6, 6, 3)).astype(np.float32))
    block = ApproxConvBlock(3, 3, bits=4)
    block.build(x.shape)
    random_weights(block, rng)
    from keras_blpa.backends.tensorflow import native

    original = native.load
    native.load = lambda: None
    try:
        step = tf.function(lambda x: grads(block, x), jit_compile=True)
        y_jit, g_jit = step(x)
        y, g = grads(block, x)
    finally:
        native.load = original
    np.testing.assert_allclose(y_jit, y, rtol=1e-4, atol=1e-4)
    for a, b in zip(g_jit, g):
        assert cosine(a, b) > 0.9999


def test_fit_reduces_loss(ops_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(10)
    x = rng.normal(size=(64, 8, 8, 3)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int32)
    inp = keras.Input((8, 8, 3))
    h = ApproxConvBlock(8, 3, bits=4)(inp)
    h = ResidualBuffer()([ApproxConvBlock(8, 3, bits=4)(h), h])
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inp, out)
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(filters=4, kernel_size=3, bits=3), "bits=3"),
        (dict(filters=0, kernel_size=3), "filters=0"),
        (dict(filters=4, kernel_size=3, padding="full"), "padding='full'"),
        (dict(filters=4, kernel_size=3, quantization="fp8"), "quantization='fp8'"),
        (dict(filters=4, kernel_size=0), "kernel_size"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApproxConvBlock(**kwargs)


def test_non_4d_input():
    with pytest.raises(ValueError, match=r"input_shape=\(2, 8, 3\)"):
        ApproxConvBlock(4, 3)(tf.zeros([2, 8, 3]))


def test_unsupported_backend(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ValueError, match="KERAS_BACKEND='torch'"):
        ApproxConvBlock(4, 3)
    with pytest.raises(ValueError, match="KERAS_BACKEND='torch'"):
        ResidualBuffer()


CONSTRUCT_THEN_STEP = """
import json, sys
import numpy as np
import keras, keras_blpa
from keras_blpa.backends.tensorflow import native
out = {}
block = keras_blpa.ApproxConvBlock(8, 3, bits=4)
model = keras_blpa.resnet(11, 10, (8, 8, 3), bits=4)
model.compile("sgd", "sparse_categorical_crossentropy")
out["loaded_at_construction"] = native._attempted
model.train_on_batch(np.zeros((2, 8, 8, 3), "float32"), np.zeros(2))
out["loaded_at_first_step"] = native._attempted
print(json.dumps(out))
"""


def test_making_layers_and_models_loads_no_library(tmp_path):
    """Constructing a block or a model, and compiling it, loads (and builds) nothing:
    the op library is loaded, or built into the (here empty) cache, at the first
    training step."""
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BLPA_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("KERAS_BLPA_PURE_TF", None)
    proc = subprocess.run([sys.executable, "-c", CONSTRUCT_THEN_STEP], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded_at_construction"] is False, out
    assert out["loaded_at_first_step"] is True, out


def test_native_ops_available_reflects_the_kernels_in_use(ops_path, monkeypatch):
    from keras_blpa.backends.tensorflow import fused, native, reference

    expected = ops_path == "native"
    assert keras_blpa.native_ops_available() is expected
    assert (fused.ops() is reference) is not expected
    monkeypatch.setenv(native.PURE_TF_ENV, "1")
    assert keras_blpa.native_ops_available() is False
    assert fused.ops() is reference


# Layer contract, in the spirit of Keras' own `run_layer_test`.


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _assert_same_outputs(a, b):
    a, b = _as_list(a), _as_list(b)
    assert len(a) == len(b)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def check_layer_contract(make_layer, input_shapes, tmp_path, expect_weights):
    """Build, shapes, config round trip, .keras save/load, one fit step, mixed precision.

    Args:
        make_layer: ``make_layer(**extra)`` returns a fresh layer.
        input_shapes: list of full input shapes (batch included); one input if a
            single shape, else the layer is called on the list.
        expect_weights: names the layer must create.
    """
    rng = np.random.default_rng(20)
    single = len(input_shapes) == 1
    data = [rng.normal(0.3, 1.0, s).astype(np.float32) for s in input_shapes]
    args = data[0] if single else data

    # Build and eager outputs.
    layer = make_layer()
    eager = _as_list(layer(args, training=True))
    assert sorted(w.path.split("/")[-1] for w in layer.weights) == sorted(expect_weights)
    # Symbolic outputs and compute_output_shape agree with the eager ones.
    inputs = [keras.Input(batch_shape=(None,) + tuple(s[1:])) for s in input_shapes]
    sym_layer = make_layer()
    symbolic = _as_list(sym_layer(inputs[0] if single else inputs))
    assert len(symbolic) == len(eager)
    for s, e in zip(symbolic, eager):
        assert tuple(s.shape[1:]) == tuple(e.shape[1:])
    declared = sym_layer.compute_output_shape(
        input_shapes[0] if single else input_shapes
    )
    declared = declared if isinstance(declared, list) else [declared]
    assert [tuple(d) for d in declared] == [tuple(e.shape) for e in eager]

    # Config round trip: same config, same outputs with the same weights.
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    clone(args)
    clone.set_weights(layer.get_weights())
    _assert_same_outputs(clone(args, training=False), layer(args, training=False))

    # .keras save and load of a model around the layer: same outputs.
    model_inputs = inputs[0] if single else inputs
    model = keras.Model(model_inputs, sym_layer(model_inputs))
    model(args, training=True)  # moves any statistics
    path = tmp_path / "contract.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    for training in (False, True):
        _assert_same_outputs(loaded(args, training=training), model(args, training=training))

    # One fit step trains every trainable variable (and the layer's input).
    keras.utils.set_random_seed(0)
    fit_inputs = [keras.Input(tuple(s[1:])) for s in input_shapes]
    stem = [keras.layers.Conv2D(s[-1], 1, name=f"stem{i}")(t) for i, (s, t) in enumerate(zip(input_shapes, fit_inputs))]
    fit_layer = make_layer()
    outs = _as_list(fit_layer(stem[0] if single else stem))
    pooled = [keras.layers.GlobalAveragePooling2D()(o) for o in outs]
    head = keras.layers.Dense(1)(pooled[0] if len(pooled) == 1 else keras.layers.Concatenate()(pooled))
    fit_model = keras.Model(fit_inputs[0] if single else fit_inputs, head)
    fit_model.compile(keras.optimizers.SGD(0.1), "mse")
    before = [v.numpy().copy() for v in fit_model.trainable_variables]
    history = fit_model.fit(data if not single else data[0], rng.normal(size=(input_shapes[0][0], 1)), batch_size=input_shapes[0][0], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for v, b in zip(fit_model.trainable_variables, before):
        assert not np.array_equal(v.numpy(), b), v.path

    # Mixed precision: compute in float16, variables in float32.
    mixed = make_layer(dtype="mixed_float16")
    for out in _as_list(mixed(args, training=True)):
        assert out.dtype == "float16"
    assert all(v.dtype == "float32" for v in mixed.weights)
    sym_mixed = _as_list(make_layer(dtype="mixed_float16")(inputs[0] if single else inputs))
    assert all(t.dtype == "float16" for t in sym_mixed)


@pytest.mark.parametrize(
    "bits, kwargs",
    [
        (None, dict(return_activation=True)),
        (2, dict(strides=2, padding="valid", use_bias=True)),
        (4, dict(return_activation=True, strides=2)),
        (8, dict(kernel_size=1, use_bias=True, kernel_regularizer="l2")),
    ],
)
def test_approx_conv_block_contract(ops_path, tmp_path, bits, kwargs):
    kwargs = dict(dict(filters=5, kernel_size=3), **kwargs)
    names = ["gamma", "beta", "moving_mean", "moving_variance", "kernel"]
    names += ["bias"] if kwargs.get("use_bias") else []
    check_layer_contract(
        lambda **extra: ApproxConvBlock(bits=bits, **kwargs, **extra),
        [(4, 9, 9, 3)],
        tmp_path,
        names,
    )


@pytest.mark.parametrize(
    "shapes", [[(2, 6, 6, 4), (2, 6, 6, 4)], [(2, 3, 3, 6), (2, 6, 6, 4)]]
)
def test_residual_buffer_contract(tmp_path, shapes):
    check_layer_contract(lambda **extra: ResidualBuffer(**extra), shapes, tmp_path, [])


def test_models_saved_by_version_0_1_still_load():
    """tests/data/blocks_v0_1.keras was saved by keras_blpa 0.1.0 (single-conv
    ApproxConvBlock before conv heads, center/scale), with its inference outputs."""
    import os

    data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    saved = np.load(os.path.join(data, "blocks_v0_1.npz"))
    model = keras.saving.load_model(os.path.join(data, "blocks_v0_1.keras"))
    out = model(saved["x"], training=False)
    np.testing.assert_array_equal(out[0], saved["out0"])
    np.testing.assert_array_equal(out[1], saved["out1"])
    b2 = model.get_layer("b2")
    assert (b2.bits, b2.strides, b2.padding, b2.use_bias, len(b2.heads)) == (8, (2, 2), "valid", True, 1)
    assert model.get_layer("b1").return_activation and model.get_layer("b1").center


# Faults and edge cases: no silent wrong result, and every bad setting a clear error.


def stock_channels_first(filters, kernel_size, **conv_kwargs):
    """BatchNormalization -> ReLU -> Conv2D on NCHW tensors (`chains.channels_first`)."""
    return channels_first(
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(filters, kernel_size, **conv_kwargs),
    )


@pytest.mark.parametrize("bits", [None, 4])
def test_channels_first_equals_stock(ops_path, bits):
    """NCHW in and out: the forward (both modes) and the moving statistics equal stock
    BatchNormalization -> ReLU -> Conv2D on the transposed tensor; the gradients equal
    the channels_last block's on the transposed input (the same codes), and, exact,
    stock Keras'."""
    rng = np.random.default_rng(30)
    x = rng.normal(0.5, 1.5, (3, 5, 9, 7)).astype(np.float32)  # NCHW: 5 channels
    kwargs = dict(strides=2, padding="valid", use_bias=True)
    block = ApproxConvBlock(6, 3, bits=bits, data_format="channels_first", **kwargs)
    block.build(x.shape)
    assert block.gamma.shape == (5,)
    random_weights(block, rng)
    stock = stock_channels_first(6, 3, **kwargs)
    stock.build(x.shape)
    copy_to_stock(block, stock)
    last = ApproxConvBlock(6, 3, bits=bits, **kwargs)
    x_last = np.transpose(x, (0, 2, 3, 1))
    last.build(x_last.shape)
    last.set_weights(block.get_weights())
    assert_forward_and_statistics_match(block, stock, x)
    y, g = grads(block, x)
    _, g_last = grads(last, x_last)
    g_last[0] = np.transpose(g_last[0], (0, 3, 1, 2))
    for a, b in zip(g, g_last):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    if bits is None:
        _, g_ref = grads(stock, x)
        for a, b in zip(g, g_ref):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    symbolic = ApproxConvBlock(6, 3, bits=bits, data_format="channels_first", **kwargs)
    out = symbolic(keras.Input(x.shape[1:]))
    assert tuple(out.shape[1:]) == tuple(y.shape[1:]) == stock.compute_output_shape(x.shape)[1:]


def test_channels_first_heads_and_activation(ops_path):
    """Several heads and the returned activation come back NCHW, as the stock layers give them."""
    rng = np.random.default_rng(31)
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    heads = [dict(filters=3, kernel_size=1, strides=2), dict(filters=5, kernel_size=3)]
    block = ApproxConvBlock(heads=heads, bits=8, return_activation=True, data_format="channels_first")
    outs = block(x, training=True)
    activation = keras.layers.ReLU()(keras.layers.BatchNormalization(axis=1)(x, training=True))
    np.testing.assert_allclose(outs[2], activation, rtol=1e-5, atol=1e-5)
    for out, head, kernel in zip(outs, heads, block.kernels):
        conv = keras.layers.Conv2D(head["filters"], head["kernel_size"], strides=head.get("strides", 1),
                                   padding="same", use_bias=False)
        stock = channels_first(conv)
        stock.build(x.shape)
        conv.kernel.assign(kernel)
        np.testing.assert_allclose(out, stock(activation), rtol=1e-5, atol=1e-5)
    declared = block.compute_output_shape(x.shape)
    assert [tuple(d) for d in declared] == [tuple(o.shape) for o in outs]


@pytest.fixture
def channels_first_config():
    """keras.config.image_data_format() is "channels_first" during the test (then restored)."""
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    yield
    keras.config.set_image_data_format(previous)


def test_data_format_none_follows_keras_config(channels_first_config):
    block, merge = ApproxConvBlock(4, 3), ResidualBuffer()
    assert block.data_format == merge.data_format == "channels_first"
    for layer in (block, merge):
        config = layer.get_config()
        assert config["data_format"] == "channels_first"
        assert type(layer).from_config(config).data_format == "channels_first"
        # A config saved before data_format existed (0.1.0) is channels_last.
        del config["data_format"]
        assert type(layer).from_config(config).data_format == "channels_last"
    y = block(np.ones((2, 3, 5, 5), np.float32))
    assert block.gamma.shape == (3,) and y.shape == (2, 4, 5, 5)
    assert ApproxConvBlock(4, 3, data_format="Channels_Last").data_format == "channels_last"
    with pytest.raises(ValueError, match="Received: data_format='NCHW'"):
        ApproxConvBlock(4, 3, data_format="NCHW")


def test_residual_buffer_channels_first_matches_stock():
    rng = np.random.default_rng(32)
    x = tf.constant(rng.normal(size=(2, 6, 3, 3)).astype(np.float32))  # NCHW
    s = tf.constant(rng.normal(size=(2, 4, 5, 6)).astype(np.float32))
    weights = tf.constant(rng.normal(size=x.shape).astype(np.float32))
    merge = ResidualBuffer(data_format="channels_first")
    with tf.GradientTape() as tape:
        tape.watch(s)
        out = merge([x, s])
        loss = tf.reduce_sum(out * weights)
    pool = keras.layers.AveragePooling2D(2, 2, padding="same", data_format="channels_first")
    with tf.GradientTape() as ref_tape:
        ref_tape.watch(s)
        ref = x + tf.pad(pool(s), [[0, 0], [0, 2], [0, 0], [0, 0]])
        ref_loss = tf.reduce_sum(ref * weights)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tape.gradient(loss, s), ref_tape.gradient(ref_loss, s), rtol=1e-6, atol=1e-7)
    assert merge.compute_output_shape([x.shape, s.shape]) == tuple(x.shape)


def test_residual_buffer_unknown_sizes_are_named():
    with pytest.raises(ValueError, match=r"known spatial sizes.*\(None, None, None, 8\)"):
        ResidualBuffer()([keras.Input((None, None, 8)), keras.Input((None, None, 8))])


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(filters=4, kernel_size=3, padding="valid"), (1, 2, 2, 3)),
        (dict(filters=4, kernel_size=(1, 5), padding="valid", strides=2), (1, 6, 4, 3)),
    ],
)
def test_valid_kernel_larger_than_input_raises_like_conv2d(ops_path, kwargs, shape):
    """Stock Conv2D raises for an empty output; so does the block, at build, in
    compute_output_shape, and in an eager call of a block built for unknown sizes."""
    with pytest.raises(ValueError, match="zero or negative"):
        keras.layers.Conv2D(**kwargs).compute_output_shape(shape)
    match = rf"input_shape=\(.*{shape[1]}, {shape[2]}, 3\), kernel_size="
    with pytest.raises(ValueError, match=match):
        ApproxConvBlock(**kwargs).compute_output_shape(shape)
    with pytest.raises(ValueError, match=match):
        ApproxConvBlock(**kwargs)(keras.Input(shape[1:]))
    with pytest.raises(ValueError, match=match):
        ApproxConvBlock(**kwargs)(np.zeros(shape, np.float32), training=True)
    flexible = ApproxConvBlock(**kwargs)
    flexible(keras.Input((None, None, 3)))
    with pytest.raises(ValueError, match=match):
        flexible(np.zeros(shape, np.float32))
    # Explicit padding that makes the kernel fit: no error.
    padded = ApproxConvBlock(heads=[dict(filters=4, kernel_size=3, padding="valid",
                                         explicit_padding=((1, 1), (1, 1)))])
    assert padded(np.zeros((1, 2, 2, 3), np.float32)).shape == (1, 2, 2, 4)


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("bits", [None, 4])
def test_non_mixed_dtype_policy_matches_stock(ops_path, policy, bits):
    """Variables and outputs in the policy's dtype, the statistics in float32 (float64 for
    float64) as BatchNormalization does: the forward equals the stock layers' under the
    same policy to the dtype's rounding (the outputs' last bit, from the BN output's
    rounding into the compute dtype). Under float64 the compressed training step codes
    and rectifies in float32: its forward is float32-exact. A fit step trains."""
    rng = np.random.default_rng(33)
    x = rng.normal(0.5, 1.5, (4, 6, 6, 3)).astype(np.float32)
    block = ApproxConvBlock(5, 3, bits=bits, use_bias=True, dtype=policy)
    block.build(x.shape)
    random_weights(block, rng)
    assert all(v.dtype == policy for v in block.weights)
    stock = keras.Sequential([
        keras.layers.BatchNormalization(dtype=policy),
        keras.layers.ReLU(dtype=policy),
        keras.layers.Conv2D(5, 3, padding="same", dtype=policy),
    ])
    stock.build(x.shape)
    copy_to_stock(block, stock)
    eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7, "float64": 2.0**-52}[policy]
    for training in (True, False):
        y, y_ref = block(x, training=training), stock(x, training=training)
        assert y.dtype == policy
        y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
        step = 2.0**-23 if policy == "float64" and training and bits else eps
        np.testing.assert_allclose(y, y_ref, rtol=4 * step, atol=4 * step * np.abs(y_ref).max())
    np.testing.assert_allclose(
        np.asarray(block.moving_mean, np.float64), np.asarray(stock.layers[0].moving_mean, np.float64),
        rtol=2 * eps, atol=2 * eps,
    )
    # One fit step of each, from the same weights: the same loss; the block trains.
    target = rng.normal(size=(4, 1)).astype(np.float32)
    losses = []
    for layers in ([block], stock.layers):
        inp = keras.Input(x.shape[1:], dtype=policy)
        h = inp
        for layer in layers:
            h = layer(h)
        h = keras.layers.GlobalAveragePooling2D(dtype=policy)(h)
        model = keras.Model(inp, keras.layers.Dense(1, kernel_initializer="ones", dtype=policy)(h))
        model.compile(keras.optimizers.SGD(0.1), "mse")
        kernel = layers[-1].kernel.numpy().copy()
        losses.append(model.train_on_batch(x, target))
        assert not np.array_equal(layers[-1].kernel.numpy(), kernel)
    assert np.isfinite(losses[0])
    np.testing.assert_allclose(losses[0], losses[1], rtol=16 * eps)


def gradient_penalty(layer, x):
    """d/d(weights) of |d loss / dx|^2 (a gradient of a gradient, as in WGAN-GP)."""
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True)))
        penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
    return outer.gradient(penalty, layer.trainable_weights)


def test_second_order_gradient_is_refused_with_one_message(ops_path):
    """Both fused-op paths refuse (eager and in a tf.function) with the same ValueError;
    bits=None gives the stock layers' second-order gradients."""
    rng = np.random.default_rng(34)
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    block = ApproxConvBlock(4, 3, bits=4)
    block.build(x.shape)
    random_weights(block, rng)
    message = "no second derivative.*bits=None. Received: bits=4"
    with pytest.raises(ValueError, match=message):
        gradient_penalty(block, x)
    with pytest.raises(ValueError, match=message):
        tf.function(lambda x: gradient_penalty(block, x))(x)
    # First-order gradients under a recording outer tape are unaffected.
    with tf.GradientTape(persistent=True) as tape:
        y = tf.reduce_sum(block(x, training=True))
    assert all(g is not None for g in tape.gradient(y, block.trainable_weights))
    exact = ApproxConvBlock(4, 3, bits=None)
    exact.build(x.shape)
    exact.set_weights(block.get_weights())
    stock = stock_block(4, 3)
    stock.build(x.shape)
    copy_to_stock(exact, stock)
    for a, b in zip(gradient_penalty(exact, x), gradient_penalty(stock, x)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
