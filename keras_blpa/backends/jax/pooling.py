"""Max pooling whose backward keeps only the argmax code (`ArgmaxPooling2D` on JAX).

A ``jax.custom_vjp`` whose residual is only the argmax code
(`keras_blpa.windows`): the forward is ``lax.reduce_window`` with -inf and
``lax.max``, the computation stock Keras runs; the index of each output's max is
the first window position equal to it, from strided slices of the -inf padded
input; the backward adds each position's masked gradient at its offset
(``lax.pad`` with interior padding). XLA fuses the slices and the sums.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from keras_blpa.windows import Window

__all__ = ["max_pool_argmax"]


def _lowest(dtype):
    return -np.inf if jnp.issubdtype(dtype, jnp.inexact) else jnp.iinfo(dtype).min


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
    return y, index


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _pool(x, window):
    return _forward(x, window)[0]


def _pool_fwd(x, window):
    y, index = _forward(x, window)
    return y, index


def _pool_bwd(window, index, dy):
    height, width = window.padded_size
    total = jnp.zeros((dy.shape[0], height, width, dy.shape[3]), dy.dtype)
    for k, i, j in window.offsets():
        end_i, end_j = window.slice_end(i, j)
        part = jnp.where(index == k, dy, jnp.zeros([], dy.dtype))
        total = total + jax.lax.pad(
            part, jnp.zeros([], dy.dtype),
            [(0, 0, 0), (i, height - end_i, window.strides[0] - 1),
             (j, width - end_j, window.strides[1] - 1), (0, 0, 0)],
        )
    (top, _), (left, _) = window.pads
    h, w = window.size
    return (jax.lax.slice(total, (0, top, left, 0), (dy.shape[0], top + h, left + w, dy.shape[3])),)


_pool.defvjp(_pool_fwd, _pool_bwd)


def max_pool_argmax(x, pool_size, strides, padding):
    """NHWC max pooling whose backward keeps only the argmax code and shapes."""
    return _pool(x, Window(tuple(x.shape[1:3]), tuple(pool_size), tuple(strides), padding))
