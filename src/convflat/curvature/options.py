"""Tuning switches of :func:`~convflat.curvature.exact_curvature`, none of which changes what
is computed: they choose how the patch Gram is formed (docs/math.md Eq. (14) or
``U_n U_n^T``, both Eq. (4)) and how the Gauss-Newton sum of Eq. (8) is cut into pieces.
Tests and ``python -m convflat.bench curvature`` pass them to force each way."""

from __future__ import annotations

from dataclasses import dataclass

_GRAM_SOURCES = ("auto", "phases", "patches")


@dataclass(frozen=True)
class CurvatureOptions:
    """How :func:`~convflat.curvature.exact_curvature` forms its products (not what).

    Attributes:
        gram_from: where the Gram route's patch Gram comes from: ``"phases"`` (the Grams of
            the input's stride phases, docs/math.md Eq. (14)), ``"patches"`` (``U U^T`` of
            gathered patches) or ``"auto"``, the one with fewer operations (Eq. (15)).
        tile_bytes: on CPU, the largest tile of rows of the per-sample C x C products (in
            bytes, over a chunk of samples), so that a tile is still in cache when the class
            sum consumes it; None: only the ``min_tiles`` tiles, as always on CUDA, where more
            tiles would only add kernel launches. Default 4 MiB: a tile stays within the cache
            of one core while it is consumed, and its GEMMs are still large.
        min_tiles: the fewest tiles the upper triangle of the C x C products is cut into
            (when C allows); T tiles form (T + 1) / 2T of the square, 5/8 for the default 4.
        class_sum_max_bytes: the largest accumulator of per-class sums (K entries per
            upper-triangle entry) kept over the whole measurement; above it (ImageNet heads:
            1000 classes x 512^2 filter pairs) each chunk's class sum is scaled at once.
            Default 256 MiB.
        outer_by_gemm: on the Gram route, form ``sum_n (m_n m_n^T) o JJ_n`` as one GEMM over
            samples and positions (True) or in place on each tile (False); None: whichever
            the layer's shape makes cheaper.
    """

    gram_from: str = "auto"
    tile_bytes: int | None = 4 * 2**20
    min_tiles: int = 4
    class_sum_max_bytes: int = 256 * 2**20
    outer_by_gemm: bool | None = None

    def __post_init__(self) -> None:
        if self.gram_from not in _GRAM_SOURCES:
            raise ValueError(
                f"gram_from must be one of {', '.join(map(repr, _GRAM_SOURCES))}, "
                f"got {self.gram_from!r}"
            )
        if self.tile_bytes is not None and self.tile_bytes < 1:
            raise ValueError(f"tile_bytes must be None or at least 1, got {self.tile_bytes}")
        if self.min_tiles < 1:
            raise ValueError(f"min_tiles must be at least 1, got {self.min_tiles}")
        if self.class_sum_max_bytes < 0:
            raise ValueError(
                f"class_sum_max_bytes must be at least 0, got {self.class_sum_max_bytes}"
            )
        if self.outer_by_gemm not in (None, True, False):
            raise ValueError(f"outer_by_gemm must be None, True or False, got "
                             f"{self.outer_by_gemm!r}")
