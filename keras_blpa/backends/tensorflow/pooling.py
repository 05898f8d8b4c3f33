"""Max pooling whose backward keeps only the argmax code (`ArgmaxPooling2D` on TensorFlow).

The forward is ``tf.nn.max_pool2d``, the op stock Keras runs. The index of
each output's max within its window (`keras_blpa.windows`) is the first window
position equal to the max, found from strided slices of the (-inf padded)
input; the backward adds each position's masked gradient at its offset with
``StridedSliceGrad``. Each slice, mask and partial sum waits for the one
before it (control dependencies), so that one window position's full-size
temporaries exist at a time, not all of them at once, and the output waits
for the code (as the block's forward conv waits for its code, `block`'s
ordering (b)), so that the float input is freed as the forward goes on.
"""

import tensorflow as tf

from keras_blpa.windows import Window

__all__ = ["max_pool_argmax"]


def _after(tensor):
    """A control-dependency scope on `tensor` (none in eager mode, where ops run in order)."""
    return tf.control_dependencies(None if tf.executing_eagerly() else [tensor])


def _lowest(dtype):
    return float("-inf") if dtype.is_floating else dtype.min


def _argmax(x, y, window):
    """The window index of each output's max (the first position equal to it)."""
    (top, bottom), (left, right) = window.pads
    if top or bottom or left or right:
        x = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]],
                   constant_values=_lowest(x.dtype))
    index = None
    dtype = tf.as_dtype(window.index_dtype)
    for k, i, j in window.offsets():
        with _after(y if index is None else index):
            end_i, end_j = window.slice_end(i, j)
            values = x[:, i:end_i:window.strides[0], j:end_j:window.strides[1], :]
            hit = tf.equal(values, y)
            code = tf.constant(k, dtype)
            index = tf.where(hit, code, tf.zeros_like(code) if index is None else index)
    return index


def _scatter(dy, index, window, input_shape):
    """dL/dx: each output's gradient added at its argmax."""
    channels = dy.shape[-1]
    padded = tf.concat([tf.shape(dy)[:1], [*window.padded_size, channels]], 0)
    dtype = tf.as_dtype(window.index_dtype)
    total = None
    for k, i, j in window.offsets():
        with _after(dy if total is None else total):
            part = tf.where(tf.equal(index, tf.constant(k, dtype)), dy, tf.zeros([], dy.dtype))
            end_i, end_j = window.slice_end(i, j)
            placed = tf.raw_ops.StridedSliceGrad(
                shape=padded, begin=[0, i, j, 0], end=[0, end_i, end_j, 0],
                strides=[1, *window.strides, 1], dy=part, begin_mask=0, end_mask=0b1001,
            )
            # Added to zeros first, as MaxPoolGrad does (a -0.0 gradient becomes +0.0).
            total = (tf.zeros_like(placed) if total is None else total) + placed
    (top, _), (left, _) = window.pads
    if total.shape[1:3] != tuple(input_shape[1:3]):
        total = total[:, top:top + input_shape[1], left:left + input_shape[2], :]
    return total


def max_pool_argmax(x, pool_size, strides, padding):
    """NHWC max pooling whose backward keeps only the argmax code and shapes.

    Falls back to ``tf.nn.max_pool2d`` and its stock gradient (which keeps the
    float input and output) where the spatial size is unknown when traced.
    """
    ksize, window_strides = (1, *pool_size, 1), (1, *strides, 1)
    if None in x.shape[1:3]:
        return tf.nn.max_pool2d(x, ksize, window_strides, padding.upper())
    window = Window(tuple(x.shape[1:3]), tuple(pool_size), tuple(strides), padding)

    @tf.custom_gradient
    def pool(x):
        y = tf.nn.max_pool2d(x, ksize, window_strides, padding.upper())
        index = _argmax(x, y, window)
        with tf.control_dependencies([index]):
            # The output waits for the code: else the executor may defer the
            # code's ops (needed only by the backward) while the float input
            # stays alive (measured: ~5 MiB kept per 4 MiB input without it).
            y = tf.identity(y)
        input_shape = x.shape

        def grad(dy):
            return _scatter(dy, index, window, input_shape)

        return y, grad

    return pool(x)
