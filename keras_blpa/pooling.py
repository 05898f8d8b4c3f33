"""ArgmaxPooling2D: MaxPooling2D whose backward keeps the argmax, not the float input.

Stock max pooling keeps its float input and output for the backward pass (the
gradient goes to each window's max). ArgmaxPooling2D computes the same
forward, bit for bit, and keeps only the index of each output's max within its
window: one uint8 per output element (windows of up to 256 positions; int32
beyond), i.e. 1/4 of the float32 output and 1/(4 * pool area / stride area)
of the input it no longer keeps. The backward adds each output's gradient at
that position (`keras_blpa.backends`: ``max_pool_argmax``). A 1x1 window (the
strided shortcut of ResNet v2) is a strided subsample and keeps nothing.
"""

import keras

from keras_blpa import backends
from keras_blpa.blocks import PADDINGS
from keras_blpa.layers import _FROM_NHWC
from keras_blpa.layers import _TO_NHWC
from keras_blpa.layers import _data_format
from keras_blpa.layers import _permute
from keras_blpa.validation import check_int_pair
from keras_blpa.validation import check_rank4
from keras_blpa.windows import Window

__all__ = ["ArgmaxPooling2D"]


@keras.saving.register_keras_serializable(package="keras_blpa")
class ArgmaxPooling2D(keras.layers.Layer):
    """`keras.layers.MaxPooling2D` whose backward keeps only the argmax code.

    A drop-in for MaxPooling2D: the same arguments and config keys (a
    MaxPooling2D's ``get_config()`` makes one) and the same output, bit for
    bit, in training and inference. In training, the backward pass keeps, per
    output element, the index of the max within its window (uint8; int32 for
    windows of more than 256 positions) instead of the float input and output,
    and adds the gradient at that position.

    Ties (e.g. an all-zero window after a ReLU) go to the first position in
    row-major window order, as the gradients of stock Keras' max pooling do on
    TensorFlow (MaxPoolGrad, with or without oneDNN) and on JAX
    (select_and_scatter); an input element that is the max of several
    overlapping windows gets their gradients summed in the outputs' row-major
    order (TensorFlow's oneDNN graph kernel may sum them in another order, so
    that stock float gradients may differ from it in the last bit). "same" padding
    never selects a padded position. A 1x1 window takes every stride-th
    position (what max pooling over one element gives, with either padding),
    so the backward keeps nothing but shapes.

    On TensorFlow, an input whose spatial size is unknown when the training
    step is traced is pooled by the stock op with its stock gradient.

    Args:
        pool_size: int or pair of ints, the window. Defaults to 2.
        strides: int, pair of ints or None (the pool size).
        padding: "valid" or "same" (case-insensitive).
        data_format: "channels_last" or "channels_first"; None:
            ``keras.config.image_data_format()``.
        **kwargs: keras.layers.Layer arguments (name, dtype, ...).

    Call arguments:
        inputs: a 4D tensor.
        training: whether the compressed backward is used (the stock op, and
            its gradient, otherwise).

    Returns:
        The max-pooled tensor, as MaxPooling2D's.

    Raises:
        ValueError: for a bad argument (naming it), or a "valid" window larger
            than the input.

    Example:
    >>> pool = ArgmaxPooling2D.from_config(keras.layers.MaxPooling2D(3, 2).get_config())
    >>> y = pool(x, training=True)  # what MaxPooling2D(3, 2)(x) gives
    """

    def __init__(self, pool_size=(2, 2), strides=None, padding="valid", data_format=None,
                 name=None, **kwargs):
        self._backend = backends.get()
        super().__init__(name=name, **kwargs)
        self.pool_size = check_int_pair(pool_size, "pool_size")
        self.strides = self.pool_size if strides is None else check_int_pair(strides, "strides")
        standard = padding.lower() if isinstance(padding, str) else None
        if standard not in PADDINGS:
            raise ValueError(f"Expected padding in {PADDINGS}. Received: padding={padding!r}")
        self.padding = standard
        self.data_format = _data_format(data_format)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def _window(self, input_shape):
        """The NHWC `Window` of `input_shape` (spatial sizes may be None)."""
        check_rank4(input_shape, "ArgmaxPooling2D")
        size = _permute(tuple(input_shape), _TO_NHWC[self.data_format])[1:3]
        window = Window(size, self.pool_size, self.strides, self.padding)
        if self.padding == "valid" and any(
            n is not None and n < k for n, k in zip(size, self.pool_size)
        ):
            raise ValueError(
                f"ArgmaxPooling2D's {self.pool_size} window (padding='valid') does not fit "
                f"the input's spatial size {size}: the output would be empty. "
                f"Received: input_shape={tuple(input_shape)}, pool_size={self.pool_size}"
            )
        return window

    def compute_output_shape(self, input_shape):
        window = self._window(input_shape)
        nhwc = _permute(tuple(input_shape), _TO_NHWC[self.data_format])
        spatial = [
            None if n is None else window._axis(axis)[0] for axis, n in enumerate(window.size)
        ]
        return _permute((nhwc[0], *spatial, nhwc[3]), _FROM_NHWC[self.data_format])

    def build(self, input_shape):
        self._window(input_shape)

    def call(self, inputs, training=None):
        if self.pool_size == (1, 1):
            rows, cols = (slice(None, None, s) for s in self.strides)
            every = slice(None)
            nhwc = self.data_format == "channels_last"
            return inputs[(every, rows, cols, every) if nhwc else (every, every, rows, cols)]
        if not training:
            return keras.ops.max_pool(inputs, self.pool_size, self.strides, self.padding,
                                      self.data_format)
        x = _permute(inputs, _TO_NHWC[self.data_format])
        y = self._backend.max_pool_argmax(x, self.pool_size, self.strides, self.padding)
        return _permute(y, _FROM_NHWC[self.data_format])

    def get_config(self):
        return {
            **super().get_config(),
            "pool_size": self.pool_size,
            "padding": self.padding,
            "strides": self.strides,
            "data_format": self.data_format,
        }
