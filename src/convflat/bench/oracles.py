"""The alternatives the closed form is timed against: Hutchinson's estimate and BackPACK.

* :func:`hutchinson_to_1pct`: Hutchinson's estimate of one kernel's Hessian trace through
  curvlinops' ``HessianLinearOperator`` (Rademacher probes, one Hessian-vector product over
  the data each), with the probes a 1% standard error needs.
* :func:`backpack_ggn_trace`: BackPACK's exact GGN diagonal of one kernel, summed (the
  trace for ReLU heads), in sub-batches that bound BackPACK's largest array.

``bench curvature`` and ``bench gpu``'s cost check both call these. curvlinops and BackPACK
are imported when called: an ``ImportError`` says that one is not installed.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

from convflat.bench.timing import sync


def hutchinson_to_1pct(model: nn.Module, param: nn.Parameter, batches, exact: float,
                       device: torch.device, *, max_probes: int, max_seconds: float,
                       min_probes: int = 1) -> dict[str, Any]:
    """Hutchinson (curvlinops) on one kernel, seeded with 0 (the caller's random state is
    left as it was): probes drawn until ``max_probes`` or ``max_seconds`` (at least
    ``min_probes``). Returns ``probes_1pct``, the count for a 1% standard error,
    ``m = (sd / 0.01 T)^2`` (what the estimator costs on average to be that good; None with
    a single probe), ``seconds`` = that count x the time per probe (the probes run when
    there is no count), ``first_hit``, the first probe count at which the running mean came
    within 1% of ``exact`` (luck plays a part there), and ``probes_run``, ``per_probe_s``,
    ``sd``, ``mean``, ``mean_rel_diff``, ``stderr_rel``."""
    from curvlinops import HessianLinearOperator
    from curvlinops.trace.hutchinson import hutchinson_trace

    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), [param], batches,
                              check_deterministic=False)
    ests: list[float] = []
    first_hit = None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        sync(device)
        t0 = time.perf_counter()
        while len(ests) < min_probes or (len(ests) < max_probes
                                         and time.perf_counter() - t0 < max_seconds):
            ests.append(float(hutchinson_trace(H, 1)))
            mean = statistics.fmean(ests)
            if first_hit is None and len(ests) >= 2 and abs(mean - exact) <= 0.01 * abs(exact):
                first_hit = len(ests)
        sync(device)
        per_probe = (time.perf_counter() - t0) / len(ests)
    sd = statistics.stdev(ests) if len(ests) > 1 else math.nan
    needed = max(1, math.ceil((sd / (0.01 * abs(exact))) ** 2)) if math.isfinite(sd) else None
    scale = max(abs(exact), 1e-300)
    return {"probes_1pct": needed, "seconds": per_probe * (needed or len(ests)),
            "first_hit": first_hit, "probes_run": len(ests), "per_probe_s": per_probe,
            "sd": sd, "mean": mean, "mean_rel_diff": abs(mean - exact) / scale,
            "stderr_rel": sd / math.sqrt(len(ests)) / scale}


def backpack_bytes_per_sample(head, classes: int) -> int:
    """Bytes of BackPACK's conv diagonal array per sample: K x C x d entries of the kernel's
    dtype (``head``: :func:`convflat.curvature.find_head`'s result)."""
    weight = head.conv.weight
    return classes * weight.numel() * weight.element_size()


def _extended_kernel(model: nn.Module, layer: str):
    """BackPACK's extended copy of ``model`` with gradients for ``layer``'s weight only, and
    that weight."""
    from backpack import extend

    ext = extend(copy.deepcopy(model).eval(), use_converter=True)
    key = layer.replace(".", "_") + "_weight"
    target = None
    for name, p in ext.named_parameters():  # the oracle for this one kernel, nothing more
        mine = name.replace(".", "_") == key
        p.requires_grad_(mine)
        target = p if mine else target
    if target is None:
        raise RuntimeError(f"BackPACK's converted model has no weight for layer {layer!r}")
    return ext, target


def backpack_ggn_trace(model: nn.Module, head, batches, device: torch.device, *,
                       max_bytes: float, max_seconds: float = math.inf) -> dict[str, Any]:
    """BackPACK's exact GGN diagonal of ``head``'s kernel (``DiagGGNExact``), summed.

    BackPACK's conv diagonal forms the per-sample, per-class products ``J^T S`` as one array
    of K x b x C x d entries (12 GB for a CIFAR ResNet-18 at batch 128, 10 classes), so each
    batch runs in sub-batches of at most ``max_bytes`` of that array (at least one sample):
    the sum is the same, and a batch that would not fit no longer kills the process. After
    ``max_seconds`` it stops and the time is extrapolated linearly in the samples.
    Returns ``trace`` (None when cut short), ``seconds`` (the sub-batch loop, synchronised),
    ``samples_run``, ``n`` and ``sub_batch`` (the largest sub-batch run).
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    ext, target = _extended_kernel(model, head.conv_name)
    sub = max(1, int(max_bytes // backpack_bytes_per_sample(head, head.linear.out_features)))
    lossf = extend(nn.CrossEntropyLoss())  # BackPACK needs the loss module's own output
    n = sum(int(y.shape[0]) for _, y in batches)
    total, done = 0.0, 0
    pairs = ((x, y) for xb, yb in batches
             for x, y in zip(xb.split(sub), yb.split(sub), strict=True))
    sync(device)
    t0 = time.perf_counter()
    for x, y in pairs:
        ext.zero_grad()
        loss = lossf(ext(x), y)
        with backpack(DiagGGNExact()):
            loss.backward()
        # the sub-batch mean's GGN, weighted by the sub-batch's share of the data
        total += float(target.diag_ggn_exact.sum()) * int(y.shape[0]) / n
        done += int(y.shape[0])
        if time.perf_counter() - t0 > max_seconds and done < n:
            break
    sync(device)
    return {"seconds": (time.perf_counter() - t0) * n / done, "samples_run": done, "n": n,
            "sub_batch": min(sub, max(int(y.shape[0]) for _, y in batches)),
            "trace": total if done == n else None}
