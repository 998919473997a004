"""``bench gpu``'s memory row of the cost check: the peak memory of ``exact_curvature`` on
the first half of the batches and on all of them (it must not grow with N). Measured on CUDA
only: torch's CPU allocator keeps no peak and tracemalloc does not see tensors."""

from __future__ import annotations

from torch import nn

from convflat.bench.gpu.common import Ctx, NotRun, Row, target_row
from convflat.bench.timing import Peak


def planned(name: str) -> tuple[str, str]:
    """The (id, name) of the memory row of cost model ``name``."""
    return (f"cost/{name}/peak_memory", f"cost {name}: peak memory of (b) vs N")


def _peak_bytes(ctx: Ctx, model: nn.Module, batches: list) -> int:
    from convflat.curvature import exact_curvature

    with Peak(ctx.device) as peak:
        exact_curvature(model, batches, device=ctx.device)
    return peak.bytes


def peak_rows(ctx: Ctx, name: str, model: nn.Module, batches: list) -> list[Row]:
    """The row ``cost/<name>/peak_memory``: target at most 5% + 8 MiB growth."""
    if not ctx.cuda:
        raise NotRun("peak memory not measured on cpu (torch's CPU allocator keeps "
                     "no peak; tracemalloc does not see tensors)")
    if len(batches) < 2:
        raise NotRun("needs at least two batches (--cost-n / --cost-batch)")
    half = batches[: len(batches) // 2]
    n_half, n = (sum(int(y.shape[0]) for _, y in b) for b in (half, batches))
    p1, p2 = _peak_bytes(ctx, model, half), _peak_bytes(ctx, model, batches)
    ok = p2 <= 1.05 * p1 + 8 * 2**20
    return [target_row(ctx, *planned(name), f"{p1 / 2**20:.0f} / {p2 / 2**20:.0f} MiB", ok,
                       "no growth (<= +5% + 8 MiB)", f"N={n_half} / N={n}",
                       {"peak_bytes": {str(n_half): p1, str(n): p2}})]
