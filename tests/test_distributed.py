"""Distributed training: MirroredStrategy on 2 logical CPU devices, synchronized
BN, MultiWorkerMirroredStrategy with 2 processes, resume after a kill.

Every test runs its TensorFlow work in subprocesses, so the logical-device
configuration and the strategies never leak into the test process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from keras_blpa import datasets
from trajectories import assert_same_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

PRELUDE = textwrap.dedent(
    f"""
    import json, os, sys
    sys.path.insert(0, {ROOT!r})
    sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
    import numpy as np
    import tensorflow as tf
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from keras_blpa import models, training
    """
)


def python(code, env=None, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {})),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_mirrored_fit_two_replicas():
    out = python(
        """
        strategy = training.make_strategy("mirrored")
        training.check_batch_size(8, strategy)
        with strategy.scope():
            model = models.resnet(11, 10, (8, 8, 3), bits=4, weight_decay=2e-4)
            model.compile(training.make_optimizer(0.1, total_steps=4, warmup_steps=1),
                          "sparse_categorical_crossentropy", metrics=["accuracy"])
        x = np.random.default_rng(0).normal(size=(32, 8, 8, 3)).astype("float32")
        y = np.arange(32) % 10
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
        print(json.dumps(dict(replicas=strategy.num_replicas_in_sync,
                              loss=history.history["loss"],
                              steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)))))
        """
    )
    assert out["replicas"] == 2 and out["steps"] == 4
    assert np.isfinite(out["loss"]).all()


SYNC_STEPS = """
from trajectories import fit_batch, forced_steps, reference_trajectory, step_errors

bits = {bits}
x = np.random.default_rng(0).normal(size=(96, 8, 8, 3)).astype("float32")
y = np.random.default_rng(1).integers(0, 10, 96)
batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]


def build(strategy, synchronized):
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = models.resnet(11, 10, (8, 8, 3), bits=bits, synchronized=synchronized)
        model.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    return model


one = build(tf.distribute.OneDeviceStrategy("/cpu:0"), False)
states, losses = reference_trajectory(one, batches, fit_batch)
trainable = [w.trainable for w in one.weights]
mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
out = dict()
for name, synchronized in (("two", True), ("unsync", False)):
    steps = forced_steps(build(mirrored, synchronized), states, batches, fit_batch)
    out[name] = step_errors(states, losses, steps, trainable)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, None])
def test_synchronized_bn_two_replicas_match_one(bits):
    """model.fit with 2 replicas x B/2 and synchronized BN takes the steps of 1 device x B.

    Six SGD steps, each started from the one-device run's state before it
    (tests/trajectories.py says why a free-running trajectory cannot be bounded
    on every CPU): the loss and the new moving statistics agree to float32
    rounding, and the weight update within the bound of an element flipping at
    a ReLU kink or bin edge. Per-replica statistics change the loss by 20
    times its tolerance (CONTINUOUS_RTOL) or more and the update by O(1) at every step
    (measured: loss 1e-3..4e-2, the 4-bit net's sixth step the least since its
    final BN is a block too; update 1.0..1.7).
    """
    out = python(SYNC_STEPS.format(bits=bits))
    assert len(out["two"]) == len(out["unsync"]) == 6
    assert_same_steps(out["two"])
    for row in out["unsync"]:
        assert row["loss"] > 2e-4 and row["update"] > 0.5, out["unsync"]


ONE_STEP_GRADIENTS = """
from keras_blpa.backends.tensorflow import fused, reference

BITS = {bits}
real = fused.ops()
stock_relu = keras.layers.ReLU.call


def replica():
    return tf.distribute.get_replica_context().replica_id_in_sync_group


class Recorder:
    # Records, per replica and call, what a kink decision was made from, or
    # substitutes given decisions, so that two runs can be compared given the
    # same ones: the K-bit codes of the blocks and the masks of the stock ReLUs.
    def __init__(self, substitute=None):
        self.calls, self.substitute = [], substitute

    def record(self, value):
        # Returns the substitute for this call (or None) after recording `value`.
        index = sum(1 for call in self.calls if call[0] == replica())
        self.calls.append((replica(), index, value))
        return None if self.substitute is None else self.substitute[index]

    def blocks(self):
        # Each call's values over the whole batch (replica 0's samples first).
        count = 1 + max(call[1] for call in self.calls) if self.calls else 0
        return [np.concatenate([c[2] for c in sorted(self.calls, key=lambda c: c[0])
                                if c[1] == i]) for i in range(count)]


class Codes(Recorder):
    def __getattr__(self, name):
        return getattr(real, name)

    def bn_act_encode(self, x, scale, offset, inv_step, shift, bits, act):
        activation, packed = real.bn_act_encode(x, scale, offset, inv_step, shift, bits, act)
        codes = reference.unpack(packed, tf.size(x), bits).numpy().reshape(x.shape)
        substitute = self.record(codes)
        if substitute is not None:
            packed = reference.pack(tf.constant(substitute), bits)
        return activation, packed


class Masks(Recorder):
    def relu(self, layer, inputs):
        substitute = self.record(inputs.numpy())
        if substitute is None:
            return stock_relu(layer, inputs)
        return inputs * tf.cast(substitute > 0, inputs.dtype)


x = np.random.default_rng(0).normal(size=(16, 8, 8, 3)).astype("float32")
y = np.random.default_rng(1).integers(0, 10, 16)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction="sum")
keras.utils.set_random_seed(1)
with strategy.scope():
    model = models.resnet(11, 10, (8, 8, 3), bits=BITS, synchronized=True)


def use(codes, masks):
    if BITS is not None:
        fused.ops = lambda: codes
    keras.layers.ReLU.call = lambda layer, inputs: masks.relu(layer, inputs)


def one_device(codes, masks):
    # The whole batch on one device (cross-replica context: local statistics).
    use(codes, masks)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True)) / 16
    return [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]


def two_replicas(codes, masks):
    # Eager strategy.run, so that the recorders see each replica's values.
    use(codes, masks)
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = loss_fn(yb, model(xb, training=True)) / 16
        return tape.gradient(loss, model.trainable_variables)
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16))
    xb, yb = next(iter(data))
    return [strategy.reduce("SUM", g, axis=None).numpy() for g in strategy.run(step, (xb, yb))]


def error(a, b):
    return max(float(np.max(np.abs(p - q)) / np.max(np.abs(p))) for p, q in zip(a, b))


codes_one, codes_two, masks_one, masks_two = Codes(), Codes(), Masks(), Masks()
reference_grads = one_device(codes_one, masks_one)
summed = two_replicas(codes_two, masks_two)
codes = list(zip(codes_one.blocks(), codes_two.blocks()))
relu_inputs = list(zip(masks_one.blocks(), masks_two.blocks()))
flips = [(a > 0) != (b > 0) for a, b in relu_inputs]
out = dict(
    error=error(reference_grads, summed),
    code_elements=sum(a.size for a, _ in codes),
    codes_differing=sum(int(np.sum(a != b)) for a, b in codes),
    max_code_change=max([int(np.max(np.abs(a.astype(int) - b.astype(int)))) for a, b in codes],
                        default=0),
    relu_elements=sum(a.size for a, _ in relu_inputs),
    relu_flips=sum(int(np.sum(f)) for f in flips),
    # How far from the kink (relative to the channel's spread) a flipped element lay.
    max_flip_distance=max([float(np.max(np.abs(a[f]) / np.std(a, axis=(0, 1, 2))[
        np.nonzero(f)[-1]])) for (a, _), f in zip(relu_inputs, flips) if f.any()], default=0.0),
)
# The one-device step again, given the codes and ReLU masks the two replicas used.
same = one_device(Codes([b for _, b in codes]), Masks([b for _, b in relu_inputs]))
out["error_same_decisions"] = error(same, summed)
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("pure_tf", ["0", "1"], ids=["native-if-built", "reference"])
def test_synchronized_bn_one_step_gradients_match_one_device(bits, pure_tf):
    """Summed replica gradients (B/2 each, synchronized BN) == one-device gradient (B).

    Catches per-replica BN statistics and gamma/beta gradients counted once per
    replica. The cross-replica statistics equal the one-device ones only up to
    float32 summation order (relative 1e-7..1e-6), so an element lying that
    close to a kink takes the other side of it: a neighbouring K-bit code (about
    N * 2e-6 / (6/2^K) of the N codes), or the other side of a stock ReLU (the
    stem's and the final BN's, and every ReLU at bits=None). One such flip moves
    a gradient built from few elements by a lot (a 2x2 stage-3 kernel: 6% at 4
    bits), so the test counts the flips, checks that each is rare and lay within
    rounding of its kink, and compares the gradients given the same codes and
    masks: float32 reordering only (measured ~2e-6).
    """
    out = python(ONE_STEP_GRADIENTS.format(bits=bits), env={"KERAS_BLPA_PURE_TF": pure_tf})
    assert out["error_same_decisions"] < 1e-4, out
    assert out["relu_flips"] <= 1e-4 * out["relu_elements"], out
    assert out["max_flip_distance"] < 1e-4, out
    if bits is not None:
        assert out["code_elements"] > 0, out
        assert out["max_code_change"] <= 1, out
        assert out["codes_differing"] <= 1e-4 * out["code_elements"], out


WORKER = """
import json, os, sys
sys.path.insert(0, {root!r})
from keras_blpa import training
strategy = training.make_strategy("multiworker")
import numpy as np, keras, tensorflow as tf
from keras_blpa import models
keras.utils.set_random_seed(7)
task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
x = np.random.default_rng(task).normal(size=(32, 8, 8, 3)).astype("float32")
y = np.random.default_rng(10 + task).integers(0, 10, 32)
options = tf.data.Options()
options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat().with_options(options)
with strategy.scope():
    model = models.resnet(11, 10, (8, 8, 3), bits=4, synchronized=True)
    model.compile(training.make_optimizer(0.1, total_steps=3, warmup_steps=0),
                  "sparse_categorical_crossentropy")
model.fit(data, epochs=1, steps_per_epoch=3, verbose=0)
np.savez({out!r} + f"/worker{{task}}.npz", *model.get_weights())
print(json.dumps(dict(replicas=strategy.num_replicas_in_sync,
                      steps=int(keras.ops.convert_to_numpy(model.optimizer.iterations)))))
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multiworker_two_processes_identical_weights(tmp_path):
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    code = WORKER.format(root=ROOT, out=str(tmp_path))
    procs = []
    for index in range(2):
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="2",
            TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
        )
        procs.append(subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env, cwd=ROOT))
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-4000:]
            outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(o == {"replicas": 2, "steps": 3} for o in outputs)
    w0, w1 = (np.load(tmp_path / f"worker{i}.npz") for i in range(2))
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key])
    # The workers had different data, yet identical weights: gradients were all-reduced.


needs_data = pytest.mark.skipif(
    datasets.find_idx_dir() is None,
    reason="no local Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)",
)


@pytest.mark.slow
@needs_data
def test_backup_and_restore_resumes_after_kill(tmp_path):
    checkpoint = tmp_path / "ckpt"
    args = [
        sys.executable, os.path.join(EXAMPLES, "fashion_mnist.py"),
        "--depth", "11", "--bits", "4", "--batch_size", "16", "--epochs", "4",
        "--steps_per_epoch", "12", "--train_take", "512", "--eval_take", "64",
        "--verbose", "0", "--data_dir", str(tmp_path / "tfds"),
        "--checkpoint_dir", str(checkpoint),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, env=env, cwd=ROOT)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.startswith("EPOCH_DONE 2"):
                proc.send_signal(signal.SIGKILL)  # a real kill, mid-training
                break
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, seen
    assert not any(line.startswith("RESULT") for line in seen)
    assert checkpoint.exists() and any(checkpoint.iterdir())

    resumed = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    lines = resumed.stdout.splitlines()
    begins = [line for line in lines if line.startswith("EPOCH_BEGIN")]
    assert begins[0] == "EPOCH_BEGIN 3", begins  # epochs 1-2 are not redone
    assert begins[-1] == "EPOCH_BEGIN 4"
    result = [line for line in lines if line.startswith("RESULT")][-1]
    # Nothing lost: the optimizer state (step count) came back with the weights.
    assert "optimizer_steps=48" in result, result
    assert not checkpoint.exists() or not any(checkpoint.iterdir())  # backup removed at the end
