"""The single entry point: compute a set of measures for one model and write measures.json."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

# importing the measure modules fills MEASURES through their @register decorators
from convflat.measures import (  # noqa: F401
    convblock,
    fisher_rao,
    hessian,
    norms,
    pacbayes,
    sharpness,
)
from convflat.measures.base import MEASURES, Measure
from convflat.measures.context import Context
from convflat.records import MEASURES_FORMAT, write_measures_record

__all__ = [
    "DEFAULT_MEASURES",
    "MEASURES",
    "MEASURES_FORMAT",
    "compute_measures",
    "resolve_names",
    "write_measures_json",
]

#: Computed when ``names`` is None: a set that costs a few seconds per small model on a CPU
#: (docs/measures.md has the figures). Not here, ask for them by name: ``hutchpp_trace`` and
#: ``hutchpp_conv_trace`` (second estimators of quantities already here; see also
#: :func:`convflat.measures.hutchinson_convergence`), ``conv_hessian_frobenius`` (exact but
#: O(N^2) in the number of samples: give it ``max_samples`` on large sets),
#: ``pacbayes_mag_flatness``, ``sharpness_avg_adaptive`` and ``sharpness_keskar`` (optional
#: variants; Keskar et al.'s box sharpness).
DEFAULT_MEASURES: list[str] = [
    # ours (exact, closed form)
    "conv_trace",
    "conv_relative_flatness",
    "classifier_trace",
    "classifier_relative_flatness",
    # Hessian: stochastic (whole network, last conv against its exact trace) and spectral
    "hutchinson_trace",
    "hutchinson_conv_trace",
    "hessian_top_eigenvalue",
    "conv_top_eigenvalue",
    # Fisher-Rao, PAC-Bayes, sharpness
    "fisher_rao_norm",
    "pacbayes_flatness",
    "pacbayes_bound",
    "sharpness_worst",
    "sharpness_adaptive",
    "sharpness_avg",
    # norms and margin
    "frobenius_norm",
    "spectral_norm_sum",
    "spectral_norm_balanced_sum",
    "spectral_norm_product",
    "distance_from_init",
    "path_norm",
    "inverse_margin",
]


def resolve_names(names: str | Iterable[str] | None) -> list[str]:
    """Measure names from a list or a comma-separated string ("all" = every registered one,
    "default" = :data:`DEFAULT_MEASURES`); unknown names raise a ValueError naming them."""
    if names is None:
        return list(DEFAULT_MEASURES)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for n in names:
        every = DEFAULT_MEASURES + [m for m in MEASURES if m not in DEFAULT_MEASURES]
        expand = {"all": every, "default": DEFAULT_MEASURES}.get(n, [n])
        out.extend(e for e in expand if e not in out)
    unknown = [n for n in out if n not in MEASURES]
    if unknown:
        raise ValueError(
            f"unknown measure(s) {', '.join(map(repr, unknown))}; known: {', '.join(MEASURES)}"
        )
    if not out:
        raise ValueError("no measures requested")
    return out


def compute_measures(
    model: nn.Module,
    data: Any,
    *,
    init_model: nn.Module | None = None,
    names: str | Iterable[str] | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    device: str | torch.device | None = "auto",
    seed: int = 0,
    progress: bool = False,
    batch_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Compute measures of one trained model on its training data.

    Args:
        model: the trained network (not modified: a copy is measured, in eval mode).
        data: the training set: ``(X, Y)`` tensors, a DataLoader, or an iterable of batches.
        init_model: the network at initialisation; measures that need it are "skipped"
            without it (``distance_from_init``, ``pacbayes_bound``).
        names: measure names (list or comma-separated; "all", "default"); default
            :data:`DEFAULT_MEASURES`.
        params: ``{measure name: {parameter: value}}`` overriding the defaults of
            ``MEASURES[name].defaults``; every measure that reads data also accepts
            ``max_samples`` (a seeded random subset of that size).
        device: "auto" (CUDA when present), "cpu", "cuda:0", ...
        seed: seed of every random draw (probes, noise, Lanczos start vectors).
        progress: show a progress bar over measures (and inside long ones).
        batch_size: batch size when ``data`` is a pair of tensors (default 256).

    Returns:
        ``{name: {"value", "seconds", "params", "status", "error", ...extras}}`` in the order
        of ``names``. ``status`` is "ok", "failed" (``error`` holds the exception; the other
        measures still run) or "skipped" (a needed input such as ``init_model`` is missing).
        ``seconds`` is the stand-alone cost: it includes the time of shared results (the
        exact curvature, the PAC-Bayes sigma search, ...) even when another measure computed
        them first; ``shared`` lists them.

    Bad input (unknown names or parameters, a parameter value outside the type or range
    its measure declares at ``@register``, empty data) raises before anything runs: a
    ValueError, :class:`convflat.errors.OptionError` (``.key`` the parameter) for a value.
    """
    todo = resolve_names(names)
    params = dict(params or {})
    extra = sorted(set(params) - set(todo))
    if extra:
        raise ValueError(
            f"params given for measure(s) not requested: {', '.join(map(repr, extra))}"
        )
    resolved = {n: MEASURES[n].resolve(params.get(n)) for n in todo}
    ctx = Context(model, data, init_model=init_model, device=device, seed=seed,
                  batch_size=batch_size, progress=progress)
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(todo, desc="measures", unit="measure", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        m: Measure = MEASURES[name]
        results[name] = m.run(ctx, {k: v for k, v in resolved[name].items()})
    bar.close()
    return results


def write_measures_json(
    path: str | os.PathLike,
    results: dict[str, dict[str, Any]],
    *,
    device: str | torch.device | None = None,
    seed: int | None = None,
    seconds: float | None = None,
    **meta: Any,
) -> Path:
    """Write ``results`` of :func:`compute_measures` atomically as measures.json, through
    :func:`convflat.records.write_measures_record` (the one definition of its layout).

    Layout: the provenance fields of :func:`convflat.io.provenance` (convflat, torch and
    python versions, device, seed, seconds, status), ``format``, ``values`` (name -> value,
    null for a failed or skipped measure), ``failed`` and ``skipped`` (names), ``measures``
    (the full entries), and any ``meta`` keyword (checkpoint, init, data, n_samples, ...).

    ``status`` is "failed" only when every requested measure failed; a run with some failed
    measures stays "ok" and lists them in ``failed``, so analysis can drop just those values.
    """
    from convflat.io import provenance

    failed = [n for n, r in results.items() if r.get("status") == "failed"]
    skipped = [n for n, r in results.items() if r.get("status") == "skipped"]
    status = "failed" if results and len(failed) == len(results) else "ok"
    if seconds is None:
        seconds = float(sum(r.get("seconds") or 0.0 for r in results.values()))
    doc = {
        "format": MEASURES_FORMAT,
        **provenance(device=device, seed=seed, seconds=seconds, status=status),
        **meta,
        "values": {n: (r.get("value") if r.get("status") == "ok" else None)
                   for n, r in results.items()},
        "failed": failed,
        "skipped": skipped,
        "measures": results,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_measures_record(path, doc)
    return Path(path)
