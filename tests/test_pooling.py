"""ArgmaxPooling2D against stock keras.layers.MaxPooling2D and numpy, on any Keras backend.

Written with keras.ops and numpy: CI runs it under TensorFlow (tests/run.sh) and
under JAX (tests/run_jax.sh). The references are independent of the layer:
stock MaxPooling2D with the backend's autodiff gradient, and a numpy loop.
"""

import json

import keras
import numpy as np
import pytest

from keras_blpa import ArgmaxPooling2D

BACKEND = keras.backend.backend()
# pool_size, strides, padding: 2x2 and 3x3 windows, strides 1 and 2, overlapping
# (3x3 stride 2, the ResNet stem) and not, rectangular.
CASES = [
    ((2, 2), (2, 2), "valid"),
    ((2, 2), (1, 1), "same"),
    ((3, 3), (2, 2), "same"),
    ((3, 3), (2, 2), "valid"),
    ((3, 3), (1, 1), "same"),
    ((3, 2), (1, 2), "valid"),
    ((1, 1), (2, 2), "valid"),  # a strided subsample (ResNet v2's shortcut)
    ((1, 1), (2, 3), "same"),
]
ODD = (2, 9, 7, 3)  # odd spatial sizes: "same" pads unevenly, "valid" drops a border


def input_gradient(fn, x, upstream):
    """d sum(float32(fn(x)) * upstream) / dx, with the backend's autodiff, as float32 numpy."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(fn(x), "float32") * upstream)
        grad = tape.gradient(loss, x)
    else:
        import jax

        grad = jax.grad(lambda a: (fn(a).astype("float32") * upstream).sum())(x)
    return np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(grad, "float32")))


def numpy_pool(x, pool_size, strides, padding, upstream):
    """(output, input gradient) of NHWC max pooling by loops: ties to the first
    window position in row-major order, gradients added in the outputs' order."""
    def axis(n, k, s):
        if padding == "valid":
            return (n - k) // s + 1, 0
        out = -(-n // s)
        return out, max((out - 1) * s + k - n, 0) // 2

    (kh, kw), (sh, sw) = pool_size, strides
    (ho, top), (wo, left) = axis(x.shape[1], kh, sh), axis(x.shape[2], kw, sw)
    y = np.zeros((x.shape[0], ho, wo, x.shape[3]), x.dtype)
    dx = np.zeros(x.shape, np.float32)
    for b, i, j, c in np.ndindex(y.shape):
        best = None
        for di, dj in np.ndindex(kh, kw):
            r, q = i * sh + di - top, j * sw + dj - left
            if 0 <= r < x.shape[1] and 0 <= q < x.shape[2] and (best is None or x[b, r, q, c] > x[best]):
                best = (b, r, q, c)
        y[b, i, j, c] = x[best]
        dx[best] += upstream[b, i, j, c]
    return y, dx


def pair(pool_size, strides, padding, **kwargs):
    """(ArgmaxPooling2D, keras.layers.MaxPooling2D) with the same arguments."""
    args = dict(pool_size=pool_size, strides=strides, padding=padding, **kwargs)
    return ArgmaxPooling2D(**args), keras.layers.MaxPooling2D(**args)


def random(shape, seed, relu=False, integers=False):
    rng = np.random.default_rng(seed)
    if integers:  # sums exact in any order: equality independent of the summation order
        return rng.integers(-8, 9, size=shape).astype("float32")
    x = rng.normal(size=shape).astype("float32")
    return np.maximum(x, 0.0) if relu else x


def out_shape(layer, shape):
    return tuple(layer.compute_output_shape(shape))


@pytest.mark.parametrize("pool_size,strides,padding", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_forward_is_bit_identical_to_max_pooling(pool_size, strides, padding, training):
    argmax, stock = pair(pool_size, strides, padding)
    for x in (random(ODD, 0), random((2, 8, 8, 4), 1, relu=True)):
        got = keras.ops.convert_to_numpy(argmax(x, training=training))
        want = keras.ops.convert_to_numpy(stock(x, training=training))
        assert got.shape == out_shape(argmax, x.shape)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pool_size,strides,padding", CASES)
def test_gradient_equals_stock_and_numpy_without_ties(pool_size, strides, padding):
    """Random normal input: no ties; the gradient equals stock autodiff's exactly,
    also where overlapping windows add several gradients into one input."""
    argmax, stock = pair(pool_size, strides, padding)
    x = random(ODD, 2)
    upstream = random(out_shape(argmax, ODD), 3)
    got = input_gradient(lambda a: argmax(a, training=True), x, upstream)
    np.testing.assert_array_equal(got, input_gradient(lambda a: stock(a, training=True), x, upstream))
    np.testing.assert_array_equal(got, numpy_pool(x, pool_size, strides, padding, upstream)[1])


@pytest.mark.parametrize("pool_size,strides,padding", CASES)
@pytest.mark.parametrize("upstream_kind", ["integers", "normal"])
def test_ties_after_relu_go_where_stock_sends_them(pool_size, strides, padding, upstream_kind):
    """ReLU -> pool: all-zero windows tie; the whole chain's input gradient equals
    stock's (ties to the first window position, row-major) and numpy's."""
    argmax, stock = pair(pool_size, strides, padding)
    relu = keras.layers.ReLU()
    x = random(ODD, 4)
    upstream = random(out_shape(argmax, ODD), 5, integers=upstream_kind == "integers")
    got = input_gradient(lambda a: argmax(relu(a), training=True), x, upstream)
    want = input_gradient(lambda a: stock(relu(a), training=True), x, upstream)
    np.testing.assert_array_equal(got, want)
    relu_x = np.maximum(x, 0.0)
    assert (relu_x == 0).mean() > 0.4  # the ties exist
    reference = numpy_pool(relu_x, pool_size, strides, padding, upstream)[1] * (x > 0)
    np.testing.assert_array_equal(got, reference)


@pytest.mark.parametrize("pool_size,strides,padding", [CASES[2], CASES[5]])
def test_channels_first_equals_stock(pool_size, strides, padding):
    argmax, stock = pair(pool_size, strides, padding, data_format="channels_first")
    x = random((2, 3, 9, 7), 6, relu=True)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(argmax(x, training=True)),
        keras.ops.convert_to_numpy(stock(x, training=True)),
    )
    upstream = random(out_shape(argmax, x.shape), 7, integers=True)
    np.testing.assert_array_equal(
        input_gradient(lambda a: argmax(a, training=True), x, upstream),
        input_gradient(lambda a: stock(a, training=True), x, upstream),
    )


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_pools_in_the_compute_dtype_as_stock(policy):
    """The 3x3 stride-2 stem pooling under a mixed policy: the compute dtype's output,
    equal to stock's; the gradient equal (integer upstream: exact in any summation
    order) and within a half-precision step of stock's for a normal upstream."""
    argmax, stock = pair((3, 3), (2, 2), "same", dtype=policy)
    x = random(ODD, 8, relu=True)
    y = argmax(x, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == policy.split("_")[1]
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")),
                                  keras.ops.convert_to_numpy(keras.ops.cast(stock(x), "float32")))
    shape = out_shape(argmax, ODD)
    for integers, tolerance in ((True, 0.0), (False, 2.0**-7)):
        upstream = random(shape, 9, integers=integers)
        got = input_gradient(lambda a: argmax(a, training=True), x, upstream)
        want = input_gradient(lambda a: stock(a, training=True), x, upstream)
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * 3)


def test_config_of_a_max_pooling_makes_one():
    stock = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool1_pool")
    layer = ArgmaxPooling2D.from_config(stock.get_config())
    assert layer.get_config() == stock.get_config()
    assert (layer.pool_size, layer.strides, layer.padding) == ((3, 3), (2, 2), "same")
    default = ArgmaxPooling2D.from_config(keras.layers.MaxPooling2D().get_config())
    assert default.strides == default.pool_size == (2, 2)
    again = ArgmaxPooling2D.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()


def test_keras_file_round_trip(tmp_path):
    inp = keras.Input((9, 7, 3))
    out = ArgmaxPooling2D(3, 2, "same", name="pool")(keras.layers.Conv2D(4, 3)(inp))
    model = keras.Model(inp, out)
    path = str(tmp_path / "pool.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.get_layer("pool")) is ArgmaxPooling2D
    assert loaded.get_layer("pool").get_config() == model.get_layer("pool").get_config()
    x = random(ODD, 10)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x, training=True)),
                                  keras.ops.convert_to_numpy(model(x, training=True)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(pool_size=0), "pool_size=0"),
    (dict(pool_size=(2, 2, 2)), r"pool_size=\(2, 2, 2\)"),
    (dict(pool_size=2.5), "pool_size=2.5"),
    (dict(strides=(1, 0)), r"strides=\(1, 0\)"),
    (dict(padding="full"), "padding='full'"),
    (dict(data_format="nchw"), "data_format='nchw'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArgmaxPooling2D(**kwargs)


def test_window_larger_than_a_valid_input_says_so():
    with pytest.raises(ValueError, match=r"does not fit.*input_shape=\(None, 2, 5, 3\)"):
        ArgmaxPooling2D(3)(keras.Input((2, 5, 3)))
    with pytest.raises(ValueError, match="expected ndim=4, found ndim=3"):
        ArgmaxPooling2D(2)(keras.Input((5, 3)))


# ------------------------------------------------------------------- memory


def test_training_step_keeps_the_codes_not_the_float_input():
    """8 x (4-bit block -> 3x3 stride-1 "same" pooling), 32x32x32, batch 32: 4 MiB
    per float activation. A stock pooling's backward keeps its float input and
    output (the block keeps only its input's 4-bit code), 8 MiB per pooling (4 on
    JAX, whose select_and_scatter reads the input only); ArgmaxPooling2D keeps 1
    MiB of uint8 codes. The peak (TensorFlow: allocator, each in its own process;
    JAX: XLA's compiled step) must drop by at least 5 MiB per pooling (3 on JAX).
    """
    depth, batch, activation = 8, 32, 4 * 32 * 32 * 32 * 32
    if BACKEND == "tensorflow":
        from stacks import peak_bytes

        size = dict(depth=depth, channels=32, size=32, batch=batch)
        stock = peak_bytes("pool", "stock", False, **size)["peak"]
        argmax = peak_bytes("pool", "argmax", False, **size)["peak"]
        per_pool = 5 * 2**20
    else:
        from keras_blpa.benchmark.stacks import pool_stack
        from stacks import step_temp_bytes

        stock = step_temp_bytes(pool_stack("stock", depth), batch)
        argmax = step_temp_bytes(pool_stack("argmax", depth), batch)
        per_pool = 3 * 2**20
    saved = stock - argmax
    print(json.dumps({"backend": BACKEND, "stock_MiB": stock / 2**20, "argmax_MiB": argmax / 2**20,
                      "saved_per_pool_per_sample_bytes": saved / depth / batch,
                      "float_activation_per_sample_bytes": activation / batch}))
    assert saved >= depth * per_pool, (stock, argmax)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_one_by_one_window_is_a_subsample_that_keeps_nothing(padding):
    """ResNet v2's strided shortcut, MaxPooling2D(1, strides=2): the training forward
    is a strided slice (TensorFlow: no pooling or argmax op in the traced call; JAX:
    the backward keeps no batch-sized array)."""
    pool = ArgmaxPooling2D(1, strides=2, padding=padding)
    shape = (4, 9, 8, 3)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec(shape, tf.float32)
        graph = tf.function(lambda x: pool(x, training=True)).get_concrete_function(spec).graph
        types = {op.type for op in graph.get_operations()}
        assert "StridedSlice" in types
        assert not [t for t in types if "Pool" in t or "Blpa" in t or "Argmax" in t], types
    else:
        import jax
        import jax.numpy as jnp

        vjp = jax.eval_shape(lambda x: jax.vjp(lambda a: jnp.sum(pool(a, training=True)), x)[1],
                             jax.ShapeDtypeStruct(shape, jnp.float32))
        assert not [leaf for leaf in jax.tree_util.tree_leaves(vjp) if leaf.ndim], vjp
