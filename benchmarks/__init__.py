"""Reproducible benchmarks: capture overhead, the seed's naive method, scaling with tokens.

Run ``python -m benchmarks.run [--quick] [--json FILE]``; see benchmarks/README.md.
"""
