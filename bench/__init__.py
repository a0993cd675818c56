"""Benchmarks of the training pipeline: `python -m bench.cpu` (make bench) and `python -m bench.gpu`.

Results and method: docs/benchmarks.md.
"""
