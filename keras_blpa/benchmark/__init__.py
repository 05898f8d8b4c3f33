"""Benchmarks of keras_blpa: `python -m keras_blpa.benchmark --help` (see __main__.py)."""
