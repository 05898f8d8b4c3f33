"""Max pooling whose backward keeps only the argmax code (`ArgmaxPooling2D` on JAX).

A ``jax.custom_vjp`` whose residual is only the argmax code
(`keras_blpa.windows`): the forward is ``lax.reduce_window`` with -inf and
``lax.max``, the computation stock Keras runs; the index of each output's max is
the first window position equal to it, from strided slices of the -inf padded
input; the backward adds each position's masked gradient at its offset
(slices of the gradient and code placed on the padded input's grid). XLA fuses
the slices and the sums.
The code goes through `block.pack`'s unfusable reduction (`_materialised`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.backends.jax.block import _after
from keras_blpa.backends.jax.block import pack
from keras_blpa.windows import Window

__all__ = ["max_pool_argmax"]


def _lowest(dtype):
    return -np.inf if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).min


def _materialised(index):
    """`index`, the same bytes, through the 8-bit codes' reduction (`block.pack`).

    XLA fuses an element-wise code into its backward consumers, which then
    recompute it from the padded float input and the output, and keep both
    (measured: 8 poolings of 32 channels at 32x32 kept 18.8 MiB per sample
    instead of 0.25 MiB of codes).
    """
    octets = jax.lax.bitcast_convert_type(index, jnp.uint8)
    return jax.lax.bitcast_convert_type(pack(octets, 8).reshape(octets.shape), index.dtype)


def _forward(x, window):
    ksize, strides = (1, *window.pool_size, 1), (1, *window.strides, 1)
    y = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, ksize, strides, window.padding.upper())
    (top, bottom), (left, right) = window.pads
    padded = jax.lax.pad(x, jnp.asarray(_lowest(x.dtype), x.dtype),
                         [(0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)])
    index = jnp.zeros(y.shape, window.index_dtype)
    for k, i, j in window.offsets():
        end_i, end_j = window.slice_end(i, j)
        values = jax.lax.slice(padded, (0, i, j, 0), (x.shape[0], end_i, end_j, x.shape[3]),
                               (1, *window.strides, 1))
        index = jnp.where(values == y, jnp.asarray(k, window.index_dtype), index)
    return y, _materialised(index)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool(x, window):
    return _forward(x, window)[0]


def _pool_fwd(x, window):
    y, index = _forward(x, window)
    return y, index


def _pool_bwd(window, index, dy):
    # dy and its code placed on the padded input's grid (interior padding by the
    # stride), padded before by the window's extent: offset (i, j)'s contribution
    # is then a plain slice of both, so XLA fuses the whole sum into one loop
    # (padding each offset's masked dy to the grid made all of them first: 9
    # float tensors alive at once for a 3x3 window). The sum runs over the
    # offsets in `Window.offsets` order; padded positions have dy = 0.
    height, width = window.padded_size
    (kh, kw), (sh, sw) = window.pool_size, window.strides

    def on_grid(t):
        ends = window.slice_end(0, 0)
        return jax.lax.pad(t, jnp.zeros([], t.dtype), [
            (0, 0, 0), (kh - 1, height - ends[0], sh - 1),
            (kw - 1, width - ends[1], sw - 1), (0, 0, 0)])

    # (The code is placed once dy has arrived, else XLA does it in the forward pass
    # and keeps the larger, placed copy.)
    grid_dy, grid_index = on_grid(dy), on_grid(_after(dy, index))
    shape = (dy.shape[0], height, width, dy.shape[3])
    total = jnp.zeros(shape, dy.dtype)
    for k, i, j in window.offsets():
        start = (0, kh - 1 - i, kw - 1 - j, 0)
        limit = tuple(a + b for a, b in zip(start, shape))
        part_index = jax.lax.slice(grid_index, start, limit)
        part_dy = jax.lax.slice(grid_dy, start, limit)
        total = total + jnp.where(part_index == k, part_dy, jnp.zeros([], dy.dtype))
    (top, _), (left, _) = window.pads
    h, w = window.size
    return (jax.lax.slice(total, (0, top, left, 0), (dy.shape[0], top + h, left + w, dy.shape[3])),)


_pool.defvjp(_pool_fwd, _pool_bwd)


def max_pool_argmax(x, pool_size, strides, padding):
    """NHWC max pooling whose backward keeps only the argmax code and shapes."""
    return _pool(x, Window(tuple(x.shape[1:3]), tuple(pool_size), tuple(strides), padding))
