"""keras_blpa.memory.step_breakdown on TensorFlow: what is alive at a step's peak, from the
allocator's events, against the allocator's own peak statistic and the model's codes."""

import keras
import numpy as np
import pytest

import keras_blpa
from keras_blpa import memory
from keras_blpa.benchmark import modes


def _breakdown(mode, batch=32, depth=20):
    model = modes.compile_model(modes.build_model(mode, depth, 10, (32, 32, 3)))
    x, y = modes.random_batch(batch, (32, 32, 3), 10)
    modes.train_step(model, x, y)
    with memory.PeakMemory() as peak:  # the allocator's own peak over the same step
        b = memory.step_breakdown(model, x, y)
    return model, peak, b


@pytest.fixture(scope="module")
def measured():
    return {mode: _breakdown(mode) for mode in ("exact", "blpa4")}


@pytest.mark.parametrize("mode", ["exact", "blpa4"])
def test_breakdown_peak_is_the_allocator_peak(measured, mode):
    """The replayed events reach the peak the allocator reports over the same step (the
    profiler's own buffers included), and the parts add up to it."""
    _, peak, b = measured[mode]
    assert abs(b.peak_bytes - peak.peak_bytes) <= 0.03 * peak.peak_bytes + 2**20, (b, peak.peak_mib)
    parts = [b.resident_bytes, b.codes_bytes, b.float_bytes, b.fragmentation_bytes]
    assert min(parts) >= 0 and sum(parts) == b.peak_bytes
    assert b.largest and all(t["bytes"] > 0 for t in b.largest)


def test_breakdown_finds_the_codes_and_the_floats(measured):
    """Stock Keras keeps float activations and no uint8 code; at 4 bits the step's floats
    at the peak are a fraction of stock's and the codes are there, no more than the blocks'
    code bytes by count (elements x bits / 8). Measured 0.18x with oneDNN; 0.32-0.36x
    with TF_ENABLE_ONEDNN_OPTS=0, where Eigen's backprop-filter workspace (20.7 MB, the
    same in both modes) is at the 4-bit peak and stock's peak moves with op scheduling.
    Keeping the floats (the bug this guards against) gives about 1x."""
    model, _, b = measured["blpa4"]
    _, _, exact = measured["exact"]
    assert exact.codes_bytes == 0 and exact.float_bytes > 0.5 * exact.peak_bytes
    blocks = [l for l in model.layers if isinstance(l, keras_blpa.ApproxConvBlock)]
    by_count = sum(int(np.prod((32,) + tuple(l.input.shape[1:]))) * 4 // 8 for l in blocks)
    assert 0 < b.codes_bytes <= by_count
    assert b.float_bytes < 0.5 * exact.float_bytes, (b.float_bytes, exact.float_bytes)
    assert b.as_dict()["codes"] == round(b.codes_bytes / memory.MIB, 2)


def test_breakdown_benchmark_writes_its_table(tmp_path):
    from keras_blpa.benchmark import breakdown

    rows = breakdown.main(["--depth", "11", "--batches", "8", "--modes", "blpa4", "--out", str(tmp_path)])
    assert [r["mode"] for r in rows] == ["blpa4"] and rows[0]["codes"] > 0
    for name in ("breakdown.json", "breakdown.md", "breakdown.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_step_keeps_no_batch_sized_constant_between_steps():
    """What a 4-bit ResNet holds between steps is its state and the batch: the shortcuts'
    zero channels are not a tf.zeros of the batch's shape (Grappler folded those into
    graph constants, 25 MiB at batch 64 here, 0.3 MiB per sample at depth 164). Measured
    in a new process: models built earlier in this one leave a few MiB in the allocator."""
    from keras_blpa.benchmark import breakdown

    resident = breakdown._measure_in_process("blpa4", 20, 64, 1)["resident"] * memory.MIB
    model = modes.compile_model(modes.build_model("blpa4", 20, 10, (32, 32, 3)))
    modes.train_step(model, *modes.random_batch(2, (32, 32, 3), 10))
    state = sum(int(np.prod(v.shape)) * 4 for v in model.weights + model.optimizer.variables)
    data = 64 * (32 * 32 * 3 * 4 + 4)
    assert resident <= state + data + 2**20, (resident, state, data)


@pytest.mark.parametrize("ops_path", ["native"], indirect=True)
def test_native_input_gradient_is_written_in_place(ops_path):
    """The native BN input gradient reuses its incoming gradient's buffer when nothing else
    reads it: a step that makes one 16 MiB gradient and its input gradient peaks at one
    16 MiB tensor above what it holds, not two."""
    import tensorflow as tf

    from keras_blpa.backends.tensorflow import fused
    from keras_blpa.blocks import RELU

    ops = fused.ops()
    rng = np.random.default_rng(0)
    shape, channels = (64, 32, 32, 64), 64
    x = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    gamma = tf.constant(rng.uniform(0.5, 1.5, channels).astype(np.float32))
    beta = tf.constant(rng.uniform(-0.5, 0.5, channels).astype(np.float32))
    p = fused.channel_params(gamma, beta, 4, RELU)
    _, packed = ops.bn_act_encode(x, gamma, beta, p["inv_step"], p["shift"], 4, RELU)
    zeros = tf.zeros([channels])

    @tf.function
    def step(g):
        d_a = g * 2.0  # read only by bn_grad_input
        d_x = ops.bn_grad_input(packed, d_a, p["step"], p["shift"], p["gamma"], beta, gamma, zeros, zeros, 4, RELU)
        return tf.reduce_sum(d_x)

    g = tf.constant(rng.standard_normal(shape, dtype=np.float32))
    step(g)
    with memory.PeakMemory() as peak:
        step(g).numpy()
    size = 4 * int(np.prod(shape))
    assert peak.peak_bytes - peak.resident_bytes < 1.5 * size, (peak.peak_mib, size / memory.MIB)


def _chunk_model(activation, bits):
    """Input (10, 8, 8, 8) -> a block with a Conv2D, a depthwise and a Dense head (their
    outputs summed) -> a block with a 3x3 stride-2 Conv2D head (seed 0)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 8))
    outs = keras_blpa.ApproxConvBlock(heads=[
        dict(filters=8, kernel_size=3),
        dict(kind="depthwise", kernel_size=3, use_bias=True),
        dict(kind="dense", filters=8),
    ], bits=bits, activation=activation)(inp)
    x = keras_blpa.ApproxConvBlock(filters=5, kernel_size=3, strides=2, bits=bits,
                                   activation=activation)(outs[0] + outs[1] + outs[2])
    return keras.Model(inp, x)


def _gradients(model, x):
    import tensorflow as tf

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(model(x, training=True)))
        return tape.gradient(loss, [x] + model.trainable_variables)

    return [g.numpy() for g in step(x)]


@pytest.mark.parametrize("ops_path", ["native", "pure_tf"], indirect=True)
@pytest.mark.parametrize("activation,bits", [("relu", 4), ("silu", 2), ("leaky_relu", 8)])
def test_chunked_filter_gradients_equal_the_whole_batch(ops_path, monkeypatch, activation, bits):
    """Over the batch in uneven chunks (3, 3, 3, 1 samples), the filter gradients of
    Conv2D, depthwise and Dense heads equal the whole batch's to float rounding, and
    the input and BN gradients are unchanged."""
    import tensorflow as tf

    from keras_blpa.backends.tensorflow import block

    x = tf.constant(np.random.default_rng(1).standard_normal((10, 8, 8, 8)).astype(np.float32))
    model = _chunk_model(activation, bits)
    monkeypatch.setattr(block, "CHUNK_BYTES", None)
    whole = _gradients(model, x)
    chunk_bytes = 3 * 4 * 8 * 8 * 8  # three samples of the largest float32 tensor
    assert block.batch_chunks((10, 8, 8, 8), [x], bits, chunk_bytes) == [3, 3, 3, 1]
    monkeypatch.setattr(block, "CHUNK_BYTES", chunk_bytes)
    chunked = _gradients(_chunk_model(activation, bits), x)
    names = ["x"] + [v.path for v in model.trainable_variables]
    for name, w, c in zip(names, whole, chunked):
        if "kernel" in name:
            np.testing.assert_allclose(c, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(), err_msg=name)
        else:
            np.testing.assert_array_equal(c, w, err_msg=name)


def test_batch_chunks_bound_each_chunk(monkeypatch):
    """The most samples per chunk within the bound, the rest in a last chunk; none
    where everything fits, shapes are not static or codes do not fill whole bytes."""
    import tensorflow as tf

    from keras_blpa.backends.tensorflow import block

    outs = [tf.zeros((256, 32, 32, 64))]
    assert block.batch_chunks((256, 32, 32, 64), outs, 4, chunk_bytes=8 * 2**20) == [32] * 8
    assert block.batch_chunks((256, 32, 32, 64), outs, 4) == [32] * 8  # CHUNK_BYTES, 8 MiB
    monkeypatch.setattr(block, "CHUNK_BYTES", None)
    assert block.batch_chunks((256, 32, 32, 64), outs, 4) is None
    assert block.batch_chunks((32, 32, 32, 64), outs[:0], 4, chunk_bytes=8 * 2**20) is None
    assert block.batch_chunks((7, 4, 4, 8), [], 4, chunk_bytes=3 * 512) == [3, 3, 1]
    assert block.batch_chunks((7, 4, 4, 8), [], 4, chunk_bytes=100) == [1] * 7
    assert block.batch_chunks((None, 4, 4, 8), [], 4, chunk_bytes=100) is None
    assert block.batch_chunks((8, 1, 1, 3), [], 2, chunk_bytes=8) is None  # 3 codes, not whole bytes


@pytest.mark.parametrize("ops_path", ["native"], indirect=True)
def test_chunked_backward_decodes_one_chunk_at_a_time(ops_path, monkeypatch):
    """In the traced step, every decode of a chunked block makes at most one chunk of
    samples, and the decodes of a block run in order (each waits for the filter
    gradients of the chunk before); unchunked, a decode makes the whole batch."""
    import tensorflow as tf

    from keras_blpa.backends.tensorflow import block

    x = tf.constant(np.zeros((10, 8, 8, 8), np.float32))

    def decodes(chunk_bytes):
        monkeypatch.setattr(block, "CHUNK_BYTES", chunk_bytes)
        model = _chunk_model("relu", 4)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(model(x, training=True))
            return tape.gradient(loss, model.trainable_variables)

        graph = step.get_concrete_function(x).graph
        return [op for op in graph.get_operations() if op.type == "Blpa>DecodeActivation"]

    assert sorted(op.outputs[0].shape[0] for op in decodes(None)) == [10, 10]
    chunked = decodes(3 * 4 * 8 * 8 * 8)
    assert sorted(op.outputs[0].shape[0] for op in chunked) == [1, 1, 3, 3, 3, 3, 3, 3]
    for op in chunked:  # each decode reads its code through an identity ordered after ...
        (order,) = [i.op for i in op.inputs if i.op.type == "Identity"]
        waits_for = {c.type for c in order.control_inputs}
        assert waits_for, op.name  # ... the incoming gradients or the last chunk's filter gradients
