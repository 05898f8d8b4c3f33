"""Max pooling whose backward keeps only the argmax code (`ArgmaxPooling2D` on TensorFlow).

The forward is TensorFlow's ``MaxPoolWithArgmax`` (the maximum of each window,
so the output is ``tf.nn.max_pool2d``'s bit for bit, and the per-sample flat
index of the first maximum in row-major window order, as MaxPoolGrad routes
the gradient). The index becomes the window code of `keras_blpa.windows` (one
byte per output) at once, and the output waits for the code, so that neither
the float input nor the int32 index outlives the forward. The backward
rebuilds each output's flat input index from its code and position, once its
incoming gradient exists (else the executor builds every pooling's index at
the start of the backward pass), and adds the gradients there with
``unsorted_segment_sum``, in the outputs' row-major order (MaxPoolGrad's), so
overlapping windows sum as stock does.

On a CPU-only TensorFlow with the native library loaded, a float32 pooling
runs the library's two ops instead (ops/blpa_pool_ops.cc: the max and its code
in one pass, and the gradient added from the code), with the same values,
codes and summation order. The TensorFlow ops above stay the path on a GPU, for
other dtypes, and without the library. The README's pooling row
(`python -m keras_blpa.benchmark.kernels --stacks pool`) measures both against
stock MaxPooling2D.
"""

import tensorflow as tf

from keras_blpa.backends.tensorflow import native
from keras_blpa.windows import Window

__all__ = ["max_pool_argmax"]


def _window_starts(height, width, channels, window):
    """The per-sample flat input index ``(h * W + w) * C + c`` of each output's
    window corner (int32, [1, Ho, Wo, C]; negative rows and columns in a "same" pad)."""
    (ho, wo), (sh, sw) = window.output_size, window.strides
    (top, _), (left, _) = window.pads
    row = tf.reshape(tf.range(ho) * sh - top, [1, -1, 1, 1])
    col = tf.reshape(tf.range(wo) * sw - left, [1, 1, -1, 1])
    c = tf.reshape(tf.range(channels), [1, 1, 1, -1])
    return (row * width + col) * channels + c


def _native_pool(library, x, window):
    """`max_pool_argmax` by the native ops: the backward keeps only the code."""

    @tf.custom_gradient
    def pool(x):
        y, code = library.argmax_pool(tf.stop_gradient(x), window)
        return y, lambda dy: library.argmax_pool_grad(dy, code, window)

    return pool(x)


def max_pool_argmax(x, pool_size, strides, padding):
    """NHWC max pooling whose backward keeps only the argmax code and shapes.

    Falls back to ``tf.nn.max_pool2d`` and its stock gradient (which keeps the
    float input and output) where the spatial size is unknown when traced. On
    the TensorFlow-ops path (not the native one) the gradient's int32 index
    needs fewer than 2^31 input elements per batch.
    """
    ksize, window_strides = (1, *pool_size, 1), (1, *strides, 1)
    if None in x.shape[1:3] or x.shape[3] is None:
        return tf.nn.max_pool2d(x, ksize, window_strides, padding.upper())
    height, width, channels = x.shape[1:]
    window = Window((height, width), tuple(pool_size), tuple(strides), padding)
    library = native.load()
    if library is not None and x.dtype == tf.float32 and not tf.config.list_logical_devices("GPU"):
        return _native_pool(library, x, window)
    return _tf_pool(x, window)


def _tf_pool(x, window):
    """`max_pool_argmax` by TensorFlow ops (MaxPoolWithArgmax and a segment sum)."""
    if x.shape[0] is not None and x.shape.num_elements() >= 2**31:
        raise ValueError(
            "ArgmaxPooling2D indexes its input with int32: it takes fewer than 2^31 "
            f"elements per batch. Received: input shape {tuple(x.shape)}"
        )
    height, width, channels = x.shape[1:]
    ksize, window_strides = (1, *window.pool_size, 1), (1, *window.strides, 1)
    kw = tf.constant(window.pool_size[1], tf.int32)
    code_dtype = tf.as_dtype(window.index_dtype)

    @tf.custom_gradient
    def pool(x):
        # Per-sample int32 indices ((h * W + w) * C + c): 4 bytes per output, not 8.
        y, flat = tf.nn.max_pool_with_argmax(
            tf.stop_gradient(x), ksize, window_strides, window.padding.upper(), output_dtype=tf.int32
        )
        first = _window_starts(height, width, channels, window)
        offset = flat - first  # (i * W + j) * C for window row i, column j
        line = width * channels
        code = tf.cast((offset // line) * kw + (offset % line) // channels, code_dtype)
        with tf.control_dependencies([code]):
            # The output waits for the code: else the executor may defer the
            # code's ops (needed only by the backward) while the float input
            # and the int32 index stay alive.
            y = tf.identity(y)

        def grad(dy):
            n = tf.shape(dy)[0]
            # The input index of each output's max, per sample (int32), then the
            # sum into the input with the batch as the outer segment axis.
            # The index waits for the incoming gradient: else the executor would
            # build every pooling's index at the start of the backward pass.
            with tf.control_dependencies([dy]):
                k = tf.cast(code, tf.int32)
            per_sample = first + (k // kw) * (width * channels) + (k % kw) * channels
            sample = tf.reshape(tf.range(n) * (height * width * channels), [-1, 1, 1, 1])
            size = n * (height * width * channels)
            dx = tf.math.unsorted_segment_sum(
                tf.reshape(dy, [-1]), tf.reshape(per_sample + sample, [-1]), size
            )
            return tf.reshape(dx, tf.stack([n, height, width, channels]))

        return y, grad

    return pool(x)
