"""JAX's device statistics, XLA's compiled-step memory, and the facts of ``keras_blpa.info``."""

import jax

__all__ = [
    "accelerator",
    "compiled_step_memory",
    "facts",
    "memory_device",
    "memory_stats",
    "reset_peak_memory",
    "versions",
]


def _device():
    return jax.local_devices()[0]


def memory_device():
    """The first local device, e.g. "cuda:0" or "TFRT_CPU_0"."""
    return str(_device())


def memory_stats(device):
    """``{"current", "peak"}`` bytes of the first local device (the peak since the process started)."""
    from keras_blpa.memory import MemoryStatsUnavailable

    stats = _device().memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        raise MemoryStatsUnavailable(
            f"JAX keeps no memory statistics on {device}; "
            "use keras_blpa.memory.compiled_step_memory(model, x, y)"
        )
    return {"current": stats["bytes_in_use"], "peak": stats["peak_bytes_in_use"]}


def reset_peak_memory(device):
    """JAX cannot reset a device's peak: False (the peak is the one since the process started)."""
    memory_stats(device)  # raises where there are no statistics
    return False


def compiled_step_memory(model, x, y):
    """XLA's buffer assignment of ``model.fit``'s training step on batch (x, y), compiled, not run.

    The step is the model's own ``train_step``, jitted with the state donated as
    ``fit`` does; x and y may be arrays or anything with ``shape`` and ``dtype``.

    Raises:
        ValueError: if the model has not been compiled and run one training step
            (which builds optimizer and metric state).
    """
    from keras_blpa.memory import CompiledMemory

    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or not optimizer.built:
        raise ValueError(
            "compiled_step_memory needs a compiled model that ran one training step "
            "(e.g. model.train_on_batch(x[:2], y[:2])), which builds the optimizer "
            f"and metric state. Received: model={model.name!r} with optimizer={optimizer!r}"
        )
    state = tuple(
        [v.value for v in variables]
        for variables in (model.trainable_variables, model.non_trainable_variables,
                          optimizer.variables, model.metrics_variables)
    )
    data = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype)),
        (x,) if y is None else (x, y),
    )
    step = jax.jit(model.train_step, donate_argnums=0)
    stats = step.lower(state, data).compile().memory_analysis()
    return CompiledMemory(
        argument_bytes=stats.argument_size_in_bytes,
        output_bytes=stats.output_size_in_bytes,
        alias_bytes=stats.alias_size_in_bytes,
        temp_bytes=stats.temp_size_in_bytes,
    )


def accelerator():
    """The first device's kind, or "CPU only"."""
    device = jax.devices()[0]
    return "CPU only" if device.platform == "cpu" else device.device_kind


def versions():
    return {"jax": jax.__version__}


def facts():
    """jax's version, the kernels, the device, and how memory is measured."""
    from keras_blpa import memory

    try:
        with memory.PeakMemory() as peak:
            pass
        stats = f"available on {peak.device} (peak since the process started)"
    except memory.MemoryStatsUnavailable:
        stats = "compiled step only (keras_blpa.memory.compiled_step_memory)"
    return {
        "jax": jax.__version__,
        "kernels": "jnp (keras_blpa.backends.jax, compiled by XLA)",
        "device": f"{jax.devices()[0]} ({jax.devices()[0].device_kind})",
        "memory_stats": stats,
    }
