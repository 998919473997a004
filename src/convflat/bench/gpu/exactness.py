"""``bench gpu``'s check ``exactness``: the closed form on the device against a reference,
on the networks of the exactness suite (:func:`convflat.reference.architecture_suite`)."""

from __future__ import annotations

import copy
import math

import torch

from convflat import reference
from convflat.bench.gpu.common import Ctx, Row, block_rel, guarded, rel

EXACT_TOL = 1e-10
PLANNED = [("exactness/float64", "exactness: float64 on the device vs reference"),
           ("exactness/float32", "exactness: float32 products vs float64")]
_WHAT = {"autograd": "dense float64 autograd Hessian (cpu)", "cpu": "float64 closed form on cpu"}


def _errors(res, ref_tr: float, ref_bl: torch.Tensor, ref_k: float) -> dict[str, float]:
    """Relative differences of a result's trace, block traces and kappa."""
    return {"trace": rel(res.trace, ref_tr), "blocks": block_rel(res.block_traces, ref_bl),
            "kappa": rel(res.relative_flatness, ref_k)}


def _case_errors(ctx: Ctx, case, ref_kind: str) -> dict[str, float]:
    """One suite network in float64 on the device against ``ref_kind``'s reference."""
    from convflat.curvature import exact_curvature

    model, x, y = reference.build_case(case)
    res = exact_curvature(model, (x, y), layer="last", device=ctx.device, batch_size=3)
    if ref_kind == "autograd":
        H = reference.autograd_kernel_hessian(model, "last", x, y)
        ref = reference.dense_measures(H, model.last.weight.detach())
        return _errors(res, ref["trace"], ref["block_traces"], ref["relative_flatness"])
    cpu = exact_curvature(model, (x, y), layer="last", device="cpu", batch_size=3)
    return _errors(res, cpu.trace, cpu.block_traces, cpu.relative_flatness)


def _float64(ctx: Ctx, cases: list, ref_kind: str) -> list[Row]:
    worst = {"trace": 0.0, "blocks": 0.0, "kappa": 0.0}
    per_case = []
    for case in cases:
        e = _case_errors(ctx, case, ref_kind)  # a NaN must not hide in max(): inf
        e = {k: v if math.isfinite(v) else math.inf for k, v in e.items()}
        per_case.append({"case": case.name, **e})
        worst = {k: max(worst[k], e[k]) for k in worst}
    ok = all(v <= EXACT_TOL for v in worst.values())
    worst_case = max(per_case, key=lambda c: max(c["trace"], c["blocks"], c["kappa"]))
    return [Row(
        PLANNED[0][0], f"exactness: float64 on {ctx.device} vs {_WHAT[ref_kind]}",
        "pass" if ok else "fail",
        f"max rel diff: trace {worst['trace']:.1e}, blocks {worst['blocks']:.1e}, "
        f"kappa {worst['kappa']:.1e}", f"<= {EXACT_TOL:g}",
        f"{len(cases)} networks; worst: {worst_case['case']}",
        {"reference": ref_kind, "max_rel_diff": worst, "cases": per_case})]


def _float32(ctx: Ctx, cases: list) -> list[Row]:
    from convflat.curvature import exact_curvature

    worst = {"trace": 0.0, "blocks": 0.0, "kappa": 0.0}
    for case in cases:
        model, x, y = reference.build_case(case)
        m32 = copy.deepcopy(model).float()
        kw = {"layer": "last", "device": ctx.device, "batch_size": 3}
        r64 = exact_curvature(m32, (x.float(), y), **kw)
        r32 = exact_curvature(m32, (x.float(), y), dtype=torch.float32, **kw)
        e = _errors(r32, r64.trace, r64.block_traces, r64.relative_flatness)
        worst = {k: max(worst[k], e[k]) for k in worst}
    return [Row(PLANNED[1][0], PLANNED[1][1], "info",
                f"max rel diff: trace {worst['trace']:.1e}, blocks {worst['blocks']:.1e}, "
                f"kappa {worst['kappa']:.1e}", "report",
                f"{len(cases)} networks in float32, products float32 vs float64",
                {"max_rel_diff": worst})]


def check_exactness(ctx: Ctx) -> list[Row]:
    """Rows ``exactness/float64`` and ``exactness/float32`` (see :mod:`convflat.bench.gpu`)."""
    cases = reference.architecture_suite()
    if ctx.args.cases:
        cases = cases[: ctx.args.cases]
    ref_kind = ctx.args.reference
    if ref_kind == "auto":
        ref_kind = "cpu" if ctx.cuda else "autograd"
    rows: list[Row] = []
    guarded(rows, PLANNED[:1], lambda: _float64(ctx, cases, ref_kind))
    guarded(rows, PLANNED[1:], lambda: _float32(ctx, cases))
    return rows
