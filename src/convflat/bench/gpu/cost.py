"""``bench gpu``'s check ``cost``: ``bench curvature``'s ratios on random images.

The timing is :func:`convflat.bench.curvature.time_exact` (the protocol of ``bench
curvature``: (a), (b), (b32) in turn within each repeat, medians of per-repeat ratios) and
the alternatives are :mod:`convflat.bench.oracles`; this module turns them into rows with
targets. The peak-memory row is :mod:`convflat.bench.gpu.memory`.
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import torch
from torch import nn

from convflat.bench.gpu import memory
from convflat.bench.gpu.common import Ctx, NotRun, Row, guarded, not_run, rel, target_row

# name -> (model spec without in_channels/num_classes, image side, classes)
COST_MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "resnet18-cifar": ({"family": "resnet", "depth": 18}, 32, 10),
    "resnet50-tv": ({"family": "torchvision", "arch": "resnet50"}, 224, 1000),
    "gapcnn-w8": ({"family": "gapcnn", "width": 8, "depth": 3}, 16, 10),
}


def planned(name: str) -> list[tuple[str, str]]:
    """The (id, name) pairs of one model's rows."""
    return [(f"cost/{name}/b_over_a", f"cost {name}: (b)/(a) float64"),
            (f"cost/{name}/b32_over_a", f"cost {name}: (b32)/(a) float32 products"),
            (f"cost/{name}/c_over_b", f"cost {name}: (c)/(b) Hutchinson to 1%"),
            (f"cost/{name}/d_over_b", f"cost {name}: (d)/(b) BackPACK"),
            memory.planned(name)]


@dataclasses.dataclass
class Measured:
    """One model on its data, with what :func:`~convflat.bench.curvature.time_exact` found."""

    model: nn.Module
    head: Any
    batches: list
    classes: int
    cost: Any  # convflat.bench.curvature.ExactCost


def _cost_model(ctx: Ctx, name: str) -> tuple[nn.Module, int, int]:
    from convflat.models import build_model

    spec, size, classes = COST_MODELS[name]
    if name == "resnet50-tv":
        classes = ctx.args.r50_classes
    spec = {**spec, "in_channels": 3, "num_classes": classes}
    if spec["family"] in ("gapcnn", "resnet"):
        spec["image_size"] = [size, size]
    torch.manual_seed(0)
    return build_model(spec).to(ctx.device).eval(), size, classes


def _measure(ctx: Ctx, name: str) -> Measured:
    """Build ``name`` and its random data on the device and run ``bench curvature``'s
    timing of (a), (b), (b32)."""
    from convflat.bench.curvature import time_exact
    from convflat.curvature import find_head

    a = ctx.args
    model, size, classes = _cost_model(ctx, name)
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    x = torch.randn(a.cost_n, 3, size, size, generator=gen, device=ctx.device)
    y = torch.randint(0, classes, (a.cost_n,), generator=gen, device=ctx.device)
    batches = list(zip(x.split(a.cost_batch), y.split(a.cost_batch), strict=True))
    head = find_head(model)
    return Measured(model, head, batches, classes, time_exact(model, batches, ctx.device,
                                                              a.repeats))


def _ratio_rows(ctx: Ctx, name: str, m: Measured) -> list[Row]:
    """Rows (b)/(a) (target) and (b32)/(a) (reported)."""
    a, (p_b, p_b32) = ctx.args, planned(name)[:2]
    cost, r64, r32 = m.cost, m.cost.result, m.cost.result32
    med = {"a": cost.median("forward"), "b": cost.median("exact"),
           "b32": cost.median("exact32")}
    common = {"model": name, "n": a.cost_n, "batch": a.cost_batch,
              "image": int(m.batches[0][0].shape[-1]), "classes": m.classes,
              "layer": m.head.conv_name, "route": r64.route, "seconds": med}
    ba, b32a = cost.ratio("exact"), cost.ratio("exact32")
    return [
        target_row(ctx, *p_b, f"{ba:.2f}", ba <= 1.5, "<= 1.5",
                   f"(a) {med['a']:.3f} s, (b) {med['b']:.3f} s; {m.head.conv_name}, "
                   f"route {r64.route}, N={a.cost_n}", {**common, "ratio": ba}),
        Row(*p_b32, "info", f"{b32a:.2f}", "report",
            f"(b32) {med['b32']:.3f} s; trace rel diff to float64 "
            f"{rel(r32.trace, r64.trace):.1e}",
            {**common, "ratio": b32a, "trace_rel_diff": rel(r32.trace, r64.trace)}),
    ]


def _hutchinson_row(ctx: Ctx, name: str, m: Measured) -> list[Row]:
    from convflat.bench.oracles import hutchinson_to_1pct

    try:
        h = hutchinson_to_1pct(m.model, m.head.conv.weight, m.batches, m.cost.result.trace,
                               ctx.device, max_probes=ctx.args.max_probes,
                               max_seconds=ctx.args.hutchinson_seconds, min_probes=2)
    except ImportError as exc:
        raise NotRun(f"curvlinops is not installed ({exc})") from None
    cb = h["seconds"] / m.cost.median("exact")
    return [target_row(
        ctx, *planned(name)[2], f"{cb:.0f}x", cb >= 1000, ">= 1000",
        f"{h['probes_1pct']} probes x {h['per_probe_s']:.2f} s for 1% (sd from "
        f"{h['probes_run']} run); mean vs exact {h['mean_rel_diff']:.1e}",
        {**h, "ratio": cb})]


def _backpack_row(ctx: Ctx, name: str, m: Measured) -> list[Row]:
    from convflat.bench.oracles import backpack_bytes_per_sample, backpack_ggn_trace

    per_sample, cap = backpack_bytes_per_sample(m.head, m.classes), ctx.args.backpack_max_gib
    if per_sample > cap * 2**30:
        raise NotRun(f"BackPACK's conv diagonal needs {per_sample / 2**30:.1f} GiB per sample "
                     f"(K x C x d), over --backpack-max-gib {cap:g}")
    try:
        d = backpack_ggn_trace(m.model, m.head, m.batches, ctx.device, max_bytes=cap * 2**30,
                               max_seconds=ctx.args.backpack_seconds)
    except ImportError as exc:
        raise NotRun(f"BackPACK is not installed ({exc})") from None
    db = d["seconds"] / m.cost.median("exact")
    note = f"{d['seconds']:.2f} s, sub-batches of {d['sub_batch']}"
    if d["trace"] is None:
        note += f"; extrapolated from {d['samples_run']} of {d['n']} samples"
    else:
        d["rel_diff_gauss_newton"] = rel(d["trace"], m.cost.result.gauss_newton_trace)
        note += f"; vs exact Gauss-Newton trace {d['rel_diff_gauss_newton']:.1e}"
    return [target_row(ctx, *planned(name)[3], f"{db:.0f}x", db >= 10, ">= 10", note,
                       {**d, "ratio": db})]


def _one_model(ctx: Ctx, name: str, rows: list[Row]) -> None:
    plan = planned(name)
    box: list[Measured] = []

    def ratios() -> list[Row]:
        box.append(_measure(ctx, name))
        return _ratio_rows(ctx, name, box[0])

    if not guarded(rows, plan[:2], ratios) or not box:
        not_run(rows, plan[2:], "the model's (b) did not run")
        return
    m = box[0]
    guarded(rows, plan[2:3], lambda: _hutchinson_row(ctx, name, m))
    guarded(rows, plan[3:4], lambda: _backpack_row(ctx, name, m))
    guarded(rows, plan[4:5], lambda: memory.peak_rows(ctx, name, m.model, m.batches))


def check_cost(ctx: Ctx) -> list[Row]:
    """Rows ``cost/<model>/...`` (see :mod:`convflat.bench.gpu`)."""
    rows: list[Row] = []
    for name in ctx.args.cost_models.split(","):
        _one_model(ctx, name, rows)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows
