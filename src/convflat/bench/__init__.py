"""Benchmarks that time competing computations side by side in one process and print ratios.

``python -m convflat.bench NAME [options]``: every module in this package with a
``main(argv) -> int`` is a benchmark NAME. They print medians and ratios, never assert on time.
"""
