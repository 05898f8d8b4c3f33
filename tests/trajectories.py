"""Compare two training setups step by step, each step from the same state.

Two setups that compute the same training step in another float32 order (one
device vs two replicas, a plain vs a rematerialised network) drift apart when
each follows its own trajectory: training amplifies any rounding difference,
by a factor that depends on the CPU, the learning rate and the step count. A
bound on such a drift holds only where it was measured. So each step here
starts both setups from the reference's state before that step (its weights,
moving statistics included), and compares what one step makes of it:

* the loss and the new moving statistics come from the forward pass, a
  continuous function of the state: they agree to float32 rounding
  (`CONTINUOUS_RTOL`), at any weights, on any CPU;
* the weight update also passes kinks: an element whose pre-activation lies
  within rounding of a ReLU kink (or, at K bits, of a bin edge) may take the
  other side in one setup. That changes the gradient by that one element's
  share of each sum it enters, about 1% at most for the 64-element channels of
  ResNet-11's last stage (measured), so the update is bounded by
  `UPDATE_FLIP_BOUND`. A real difference in the computation (per-replica
  statistics, a gradient counted once per replica) changes it by O(1).

The setups run in separate processes where needed (TensorFlow and JAX device
configurations are per process), so states travel as lists of numpy arrays.
"""

import numpy as np

CONTINUOUS_RTOL = 1e-5
UPDATE_FLIP_BOUND = 0.1
STATISTICS_FLOOR = 1e-3  # moving statistics are compared relative to max(|v|, this)


def fit_batch(model, batch):
    """One `model.fit` step on the batch ``(x, y)``; its loss.

    `fit` distributes the batch over the replicas or devices of a strategy or
    distribution (`train_on_batch` on TensorFlow would give each replica all of it).
    """
    x, y = batch
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return history.history["loss"][0]


def reference_trajectory(model, batches, fit_batch):
    """Runs `model` over `batches`: (states before each step and after the last, losses)."""
    states, losses = [model.get_weights()], []
    for batch in batches:
        losses.append(fit_batch(model, batch))
        states.append(model.get_weights())
    return states, losses


def forced_steps(model, states, batches, fit_batch, set_state=None, get_state=None):
    """For each step t: the loss and the weights after one step of `model` from states[t].

    `set_state(model, state)` and `get_state(model)` map between the reference's
    weight list and `model` (default: `set_weights` / `get_weights`, for two
    builds with the same weight order).
    """
    set_state = set_state or (lambda m, state: m.set_weights(state))
    get_state = get_state or (lambda m: m.get_weights())
    out = []
    for state, batch in zip(states[: len(batches)], batches):
        set_state(model, state)
        loss = fit_batch(model, batch)
        out.append((loss, get_state(model)))
    return out


def step_errors(states, losses, steps, trainable):
    """Per step, the errors of `steps` (from `forced_steps`) against the reference.

    Args:
        states, losses: the reference's (from `reference_trajectory`).
        steps: [(loss, weights after the step)] of the setup under test.
        trainable: one bool per weight (model.weights order).

    Returns:
        A list of dicts: ``loss`` (relative), ``statistics`` (largest relative
        difference of a non-trainable weight after the step), ``update`` (the
        largest, over trainable weights, of ||delta - delta_ref|| / ||delta_ref||).
    """
    rows = []
    for t, (loss, after) in enumerate(steps):
        before, ref_after = states[t], states[t + 1]
        update, statistics = 0.0, 0.0
        for w, r, b, is_trainable in zip(after, ref_after, before, trainable):
            if is_trainable:
                ref_delta = r - b
                err = np.linalg.norm((w - b) - ref_delta) / max(np.linalg.norm(ref_delta), 1e-30)
                update = max(update, float(err))
            else:
                err = np.max(np.abs(w - r) / np.maximum(np.abs(r), STATISTICS_FLOOR))
                statistics = max(statistics, float(err))
        rows.append(dict(loss=abs(loss - losses[t]) / abs(losses[t]), statistics=statistics,
                         update=update))
    return rows


def assert_same_steps(rows):
    """Every step agrees: continuous quantities to rounding, the update within the flip bound."""
    for t, row in enumerate(rows):
        assert row["loss"] < CONTINUOUS_RTOL, (t, rows)
        assert row["statistics"] < 10 * CONTINUOUS_RTOL, (t, rows)
        assert row["update"] < UPDATE_FLIP_BOUND, (t, rows)
