"""Benchmarks that time competing computations side by side in one process and print ratios.

``python -m convflat.bench NAME [options]``: every module in this package with a
``main(argv) -> int`` is a benchmark NAME. They print medians and ratios, never assert on time.

The pieces they share are not benchmarks: :mod:`convflat.bench.timing` (the side-by-side
timing protocol: interleaved repeats, medians, per-repeat ratios, peak memory) and
:mod:`convflat.bench.oracles` (Hutchinson's estimate and BackPACK's GGN diagonal). ``bench
gpu`` (:mod:`convflat.bench.gpu`, one module per check) composes ``bench curvature``'s
:func:`~convflat.bench.curvature.time_exact` and ``bench train``'s
:func:`~convflat.bench.train.time_training` rather than timing on its own.
"""
