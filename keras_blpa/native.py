"""Lazy loader of the compiled quantisation ops (placeholder until the native build lands).

`load()` returns an object exposing the fused kernels of `keras_blpa.reference`
with the same signatures, or None when the pure-TF path must be used.
"""


def load():
    return None
