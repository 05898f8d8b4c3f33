"""Benchmarks of keras_blpa.

``python -m keras_blpa.benchmark --help``: memory, largest batch, time and
accuracy of each training mode (see __main__.py; results in results.json,
results.md and plots); ``--parts families`` (or ``python -m
keras_blpa.benchmark.families``) the accuracy of small MobileNetV2-,
EfficientNet- and ConvNeXt-like nets, stock vs ``keras_blpa.convert`` of them
(families.py). ``python -m keras_blpa.benchmark.kernels --help``:
throughput of the encode/decode ops (native and pure-TF) against a memory copy,
and an ApproxConvBlock stack's step time against stock Keras.
"""
