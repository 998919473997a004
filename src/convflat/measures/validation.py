"""Validation helpers for the workflow: invariance, estimator convergence, and cost tables.

* :func:`invariance_table`: every measure before and after a function-preserving rescaling
  (:func:`rescale_filters` without BatchNorm, :func:`rescale_batchnorm` with it), next to what
  theory predicts (Dinh et al. 2017 for the reparameterisation argument; docs/math.md
  Eq. (11)).
* :func:`hutchinson_convergence`: Hutchinson and Hutch++ estimates of the last conv's Hessian
  trace against its exact value, over a range of probe counts.
* :func:`cost_table`: stand-alone seconds of each measure, and their ratio to one forward pass
  over the data and to :func:`convflat.curvature.exact_curvature`.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from convflat.measures.base import MEASURES
from convflat.measures.context import Context
from convflat.measures.registry import DEFAULT_MEASURES, compute_measures, resolve_names

__all__ = ["cost_table", "hutchinson_convergence", "invariance_table", "rescale_batchnorm",
           "rescale_filters"]


def rescale_filters(
    model: nn.Module,
    alphas: torch.Tensor | Sequence[float],
    example_input: torch.Tensor,
    *,
    layer: str | None = None,
    rtol: float | None = None,
) -> nn.Module:
    r"""A copy of ``model`` with filter c of the last conv (and its bias) times
    :math:`\alpha_c > 0` and column c of the classifier divided by :math:`\alpha_c`.

    For a positively homogeneous activation between the conv and global average pooling (ReLU,
    leaky ReLU) and no BatchNorm or residual add there, the network computes the same function
    (Dinh et al. 2017). This is checked on ``example_input``: the logits must agree to ``rtol``
    (default 1e-10 in float64, 1e-4 otherwise), else a ValueError explains why.
    """
    from convflat.curvature import find_head

    out = copy.deepcopy(model).eval()
    head = find_head(out, example_input, layer=layer)
    C = head.conv.out_channels
    a = torch.as_tensor(alphas, dtype=torch.float64).flatten()
    if a.numel() != C:
        raise ValueError(
            f"need {C} alphas for the {C} filters of '{head.conv_name}', got {a.numel()}")
    if not bool((a > 0).all()):
        raise ValueError("alphas must be positive (a negative scale flips ReLU's sign pattern)")
    w = head.conv.weight
    with torch.no_grad():
        ref = out(example_input)
        w.mul_(a.to(w).view(-1, *([1] * (w.ndim - 1))))
        if head.conv.bias is not None:
            head.conv.bias.mul_(a.to(w))
        head.linear.weight.div_(a.to(w).view(1, -1))
        new = out(example_input)
    tol = rtol if rtol is not None else (1e-10 if ref.dtype == torch.float64 else 1e-4)
    err = float((new - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if err > tol:
        raise ValueError(
            f"rescaling the filters of '{head.conv_name}' changed the logits (relative error "
            f"{err:.2e} > {tol:.0e}): the ops between it and the pooling ({', '.join(head.ops)}) "
            "are not positively homogeneous per channel (BatchNorm, residual add, smooth "
            "activation?)"
        )
    return out


def rescale_batchnorm(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    seed: int = 0,
    low: float = 1 / 3,
    high: float = 3.0,
    head: bool = True,
    rtol: float | None = None,
) -> nn.Module:
    r"""A copy of ``model`` rescaled in the two function-preserving ways BatchNorm allows
    (docs/math.md Eq. (11), rows (ii) and (iv)); factors log-uniform in [low, high], seeded.

    (ii) For every conv -> BatchNorm pair (:func:`convflat.measures.fold.conv_bn_pairs`):
    filter c and its bias times :math:`a_c`, the running mean times :math:`a_c`, and the running
    variance set to :math:`a_c^2 (v_c + \epsilon) - \epsilon`, so that
    :math:`\sqrt{v_c + \epsilon}` is multiplied by exactly :math:`a_c` whatever the layer's
    :math:`\epsilon`. The eval-mode function is unchanged for any activation and any residual
    structure; the BatchNorm-folded network is unchanged too.

    (iv) With ``head``: the BatchNorm after the conv that feeds global average pooling gets
    its weight and bias times :math:`\alpha_c` and the classifier's column c is divided by
    :math:`\alpha_c` (function-preserving for a positively homogeneous activation and no
    residual add after that BatchNorm). This moves the folded last conv, so the folded norms
    change while function-only measures must not.

    The logits are compared on ``example_input`` (``rtol`` as in :func:`rescale_filters`); a
    ValueError explains a mismatch, and one is raised when the model has no conv -> BN pair.
    """
    from convflat.curvature import find_head
    from convflat.measures.fold import conv_bn_pairs

    out = copy.deepcopy(model).eval()
    pairs, _ = conv_bn_pairs(out)
    if not pairs:
        raise ValueError(f"{type(model).__name__} has no conv -> BatchNorm pair to rescale")
    with torch.no_grad():
        ref = out(example_input)
        for i, (conv_name, bn_name) in enumerate(pairs):
            conv, bn = out.get_submodule(conv_name), out.get_submodule(bn_name)
            a = _alphas(conv.out_channels, seed + 1 + i, low, high)
            w = conv.weight
            w.mul_(a.to(w).view(-1, *([1] * (w.ndim - 1))))
            if conv.bias is not None:
                conv.bias.mul_(a.to(w))
            var = a**2 * (bn.running_var.double() + bn.eps) - bn.eps
            if bool((var < 0).any()):
                raise ValueError(f"'{bn_name}': a factor below sqrt(eps / (v + eps)) would make "
                                 "a running variance negative; raise low")
            bn.running_mean.mul_(a.to(bn.running_mean))
            bn.running_var.copy_(var)
        if head:
            h = find_head(out, example_input)
            bn_name = dict(pairs).get(h.conv_name)
            if bn_name is None:
                raise ValueError(f"the conv that feeds the pooling, '{h.conv_name}', is not "
                                 "followed by a BatchNorm (use rescale_filters)")
            bn = out.get_submodule(bn_name)
            if bn.weight is None:
                raise ValueError(f"'{bn_name}' has no affine parameters to rescale")
            a = _alphas(bn.num_features, seed, low, high).to(bn.weight)
            bn.weight.mul_(a)
            bn.bias.mul_(a)
            h.linear.weight.div_(a.to(h.linear.weight).view(1, -1))
        new = out(example_input)
    tol = rtol if rtol is not None else (1e-10 if ref.dtype == torch.float64 else 1e-4)
    err = float((new - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    if err > tol:
        raise ValueError(
            f"rescaling the conv -> BatchNorm pairs{' and the head' if head else ''} changed "
            f"the logits (relative error {err:.2e} > {tol:.0e}); with head=True the ops after "
            "the last BatchNorm must be positively homogeneous per channel (no residual add, "
            "no smooth activation)")
    return out


def _alphas(C: int, seed: int, low: float, high: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(C, generator=g, dtype=torch.float64)
    return torch.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def invariance_table(
    model: nn.Module,
    data: Any,
    *,
    alphas: torch.Tensor | Sequence[float] | None = None,
    names: str | Iterable[str] | None = None,
    init_model: nn.Module | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    batch_size: int | None = None,
    rtol: float = 1e-4,
    rescaling: str = "auto",
) -> pd.DataFrame:
    """Each measure before and after a function-preserving rescaling, with the theory's
    prediction.

    ``rescaling``: "filters" (:func:`rescale_filters`, the last conv's filters against the
    classifier; networks without BatchNorm after that conv), "batchnorm"
    (:func:`rescale_batchnorm`: every conv -> BatchNorm pair with its running statistics, and
    the last BatchNorm's affine against the classifier), or "auto" ("batchnorm" when the
    model has a conv -> BatchNorm pair, else "filters"). ``alphas`` (filters only) default:
    one per filter, log-uniform in [1/3, 3] (seeded). Both models are
    measured with the same seed, so a stochastic measure sees the same probes / noise draws
    and any change comes from the model. Columns: ``measure``, ``before``, ``after``,
    ``relative_change`` (|after - before| / |before|), ``changed`` (relative_change > rtol),
    ``theory`` ("invariant", "changes", "nearly invariant"), ``agrees`` (changed matches the
    theory; None for "nearly invariant" or a failed measure), ``status``.
    """
    from convflat.curvature import find_head
    from convflat.measures.fold import conv_bn_pairs

    ctx = Context(model, data, device="cpu", batch_size=batch_size)
    x = ctx.example_input
    if rescaling == "auto":
        rescaling = "batchnorm" if conv_bn_pairs(ctx.model)[0] else "filters"
    if rescaling == "batchnorm":
        rescaled = rescale_batchnorm(ctx.model, x, seed=seed)
    elif rescaling == "filters":
        C = find_head(ctx.model, x).conv.out_channels
        a = _alphas(C, seed, 1 / 3, 3.0) if alphas is None else torch.as_tensor(alphas)
        rescaled = rescale_filters(ctx.model, a, x)
    else:
        raise ValueError(f"rescaling must be 'auto', 'filters' or 'batchnorm', got {rescaling!r}")
    todo = resolve_names(names if names is not None else DEFAULT_MEASURES)
    kw = {"init_model": init_model, "names": todo, "params": params, "seed": seed,
          "device": device, "batch_size": batch_size}
    before = compute_measures(model, data, **kw)
    after = compute_measures(rescaled, data, **kw)
    rows = []
    for n in todo:
        b, f = before[n], after[n]
        ok = b["status"] == "ok" and f["status"] == "ok"
        bv, fv = b["value"], f["value"]
        rel = None
        if ok and bv is not None and fv is not None:
            rel = abs(fv - bv) / abs(bv) if bv != 0 else (0.0 if fv == 0 else math.inf)
        changed = None if rel is None else bool(rel > rtol)
        theory = MEASURES[n].theory
        agrees = None
        if changed is not None and theory in ("invariant", "changes"):
            agrees = changed == (theory == "changes")
        status = "ok" if ok else f"before: {b['status']}, after: {f['status']}"
        rows.append({"measure": n, "before": bv, "after": fv, "relative_change": rel,
                     "changed": changed, "theory": theory, "agrees": agrees, "status": status})
    return pd.DataFrame(rows)


def hutchinson_convergence(
    model: nn.Module,
    data: Any,
    *,
    probes: Sequence[int] = (3, 6, 12, 24, 48),
    seed: int = 0,
    repeats: int = 5,
    methods: Sequence[str] = ("hutchinson", "hutchpp"),
    device: str | torch.device | None = "auto",
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Stochastic estimates of the last conv's Hessian trace against the exact value.

    For each method and probe count m, the estimator with m products runs ``repeats`` times
    with seeds ``seed, seed+1, ...``. Columns: ``method``, ``probes``, ``estimate`` (the run
    with ``seed``), ``stderr`` (standard deviation of one m-product estimate over the repeats),
    ``mean`` (over repeats), ``exact`` (:func:`convflat.curvature.exact_curvature`),
    ``relative_error`` (of ``estimate``). Hutch++ counts are rounded up to multiples of 3.
    """
    from convflat.measures.hessian import hessian_operator, trace_estimate

    ctx = Context(model, data, device=device, seed=seed, batch_size=batch_size)
    head = ctx.head()
    exact = ctx.exact().trace
    op = hessian_operator(ctx, [head.conv.weight])
    rows = []
    for method in methods:
        for m in probes:
            m = int(m) if method == "hutchinson" else 3 * math.ceil(int(m) / 3)
            runs = [
                trace_estimate(op, method=method, probes=m, groups=1,
                               distribution="rademacher", seed=seed + r,
                               device=ctx.device)["value"]
                for r in range(repeats)
            ]
            rows.append({
                "method": method, "probes": m, "estimate": runs[0],
                "stderr": statistics.stdev(runs) if repeats > 1 else None,
                "mean": statistics.fmean(runs), "exact": exact,
                "relative_error": (runs[0] - exact) / abs(exact),
            })
    return pd.DataFrame(rows)


def cost_table(
    model: nn.Module,
    data: Any,
    names: str | Iterable[str] | None = None,
    *,
    repeats: int = 3,
    params: dict[str, dict[str, Any]] | None = None,
    init_model: nn.Module | None = None,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    batch_size: int | None = None,
) -> pd.DataFrame:
    """Median stand-alone seconds of each measure over ``repeats`` fresh runs.

    Every run uses a fresh :class:`Context` (nothing cached), so shared work (the exact
    curvature, the sigma search) is paid by each measure that needs it. Columns: ``measure``,
    ``seconds``, ``ratio_forward`` (to one no-grad forward pass over the data),
    ``ratio_exact`` (to :func:`convflat.curvature.exact_curvature`), ``status``.
    """
    from convflat.curvature import exact_curvature

    todo = resolve_names(names)
    params = params or {}
    base = Context(model, data, init_model=init_model, device=device, seed=seed,
                   batch_size=batch_size)
    fwd, ex = [], []
    for _ in range(repeats):
        t = base.tic()
        with torch.no_grad():
            for x, _y in base.batches:
                base.model(x)
        fwd.append(base.toc(t))
        t = base.tic()
        exact_curvature(base.model, base.batches, device=base.device)
        ex.append(base.toc(t))
    t_fwd, t_exact = statistics.median(fwd), statistics.median(ex)
    rows = [
        {"measure": "(forward pass)", "seconds": t_fwd, "ratio_forward": 1.0,
         "ratio_exact": t_fwd / t_exact, "status": "ok"},
        {"measure": "(exact_curvature)", "seconds": t_exact, "ratio_forward": t_exact / t_fwd,
         "ratio_exact": 1.0, "status": "ok"},
    ]
    for n in todo:
        secs, status = [], "ok"
        for _ in range(repeats):
            ctx = Context(base.model, base.batches, init_model=base.init_model,
                          device=base.device, seed=seed, _batches=base.batches)
            r = MEASURES[n].run(ctx, params.get(n))
            secs.append(r["seconds"])
            status = r["status"] if r["status"] != "ok" else status
        s = statistics.median(secs)
        rows.append({"measure": n, "seconds": s, "ratio_forward": s / t_fwd,
                     "ratio_exact": s / t_exact, "status": status})
    return pd.DataFrame(rows)
