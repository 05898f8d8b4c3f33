"""What a Keras backend of keras_blpa implements: `Backend`.

A backend is a package under `keras_blpa.backends` (as Keras keeps one folder
per backend in keras/src/backend/) whose ``__init__`` defines every member of
`Backend`; `keras_blpa.backends.get()` imports it on first use and checks that
it does. Code above the backends calls only these members.
"""

from typing import Any
from typing import Protocol


class Backend(Protocol):
    """The members a backend package defines (module-level names)."""

    NAME: str
    """Keras' name of the backend ("tensorflow", "jax")."""

    EXPLICIT_CROSS_REPLICA: bool
    """Whether `synchronized` statistics need an all-reduce inside the layer
    (TensorFlow's replicas each see a slice of the batch). False where a
    distributed batch is one global array (JAX under keras.distribution)."""

    COMPILED_STEP_MEMORY: bool
    """Whether `compiled_step_memory` sizes a training step from XLA's buffer
    assignment (deterministic, no run); else steps are measured by the allocator."""

    def read(self, variable) -> Any:
        """A variable's current value as a tensor of the backend."""

    def conv(self, a, kernel, head) -> Any:
        """The NHWC x HWIO convolution of one head (a `keras_blpa.blocks.Head`)."""

    def compressed(
        self, x, gamma, beta, mean, variance, kernels, config, gate_weights=()
    ) -> tuple:
        """The block's training forward whose backward reads only the K-bit code.

        `config` is a `keras_blpa.blocks.BlockConfig`; `gate_weights` are its
        squeeze-excite's weights (``config.squeeze_excite``). mean and variance
        are per channel, except for ``config.normalization == "layer"``: the
        per-position LayerNormalization statistics, shape (N, H, W, 1).
        Returns (list of head outputs, the activation or None).
        """

    def residual_call(self, x, shortcut, stride, padding, extra) -> Any:
        """ResidualBuffer's ``x + adapt(shortcut)``, a backward that keeps only shapes."""

    def max_pool_argmax(self, x, pool_size, strides, padding) -> Any:
        """NHWC max pooling (the stock op: the same output, bit for bit) whose
        backward keeps only each output's argmax code (`keras_blpa.windows`)
        and shapes, and adds the gradient at that position.

        `pool_size` and `strides` are pairs of ints, `padding` "valid" or "same"
        (-inf semantics: a padded position is never the max).
        """

    def recompute_call(self, block, inputs, training) -> Any:
        """`block(inputs)` under activation checkpointing (models.RecomputeGrad)."""

    def jit_compatible(self) -> bool:
        """Whether the compressed step can be XLA-compiled (loads nothing)."""

    def working_set_factor(self) -> int:
        """Full-size float tensors alive at once in one block's backward."""

    def memory_device(self) -> str:
        """The device whose allocator `keras_blpa.memory.PeakMemory` reads."""

    def memory_stats(self, device) -> dict:
        """``{"current": bytes, "peak": bytes}`` of `device`'s allocator.

        Raises `keras_blpa.memory.MemoryStatsUnavailable` (with the reason) when
        the allocator keeps none.
        """

    def reset_peak_memory(self, device) -> bool:
        """Resets `device`'s peak to its current allocation; False where the
        backend cannot (the peak is then the one since the process started)."""

    def compiled_step_memory(self, model, x, y) -> Any:
        """XLA's buffer assignment of ``model.fit``'s compiled step, a
        `keras_blpa.memory.CompiledMemory`; ValueError where there is none."""

    def step_breakdown(self, model, x, y) -> Any:
        """What is alive at the peak of the model's training step on (x, y), a
        `keras_blpa.memory.StepBreakdown` (TensorFlow: the allocator's events
        of one step run under the profiler; JAX: XLA's buffer assignment)."""

    def facts(self) -> dict:
        """``python -m keras_blpa.info``'s lines for this backend (ordered)."""

    def versions(self) -> dict:
        """The backend's package versions (and kernel facts) for benchmark metadata."""

    def accelerator(self) -> str:
        """The first accelerator's name, or "CPU only"."""
