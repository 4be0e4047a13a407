"""Benchmarks (not shipped in the package): ``python -m bench.run``."""
