"""Stage ``measure`` (workflow/rules/measure.smk): the measure job, which records a failure
instead of raising (the train job's counterpart is
:func:`convflat.train.train_or_record_failure`)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convflat.data import load_prepared
from convflat.io import atomic_write_json, provenance, resolve_device
from convflat.measures import (
    MEASURES,
    MEASURES_FORMAT,
    compute_measures,
    resolve_names,
    write_measures_json,
)
from convflat.models import load_checkpoint
from convflat.train import error_text

__all__ = ["measure_run", "measure_sizes"]

log = logging.getLogger(__name__)


def measure_run(model: str | os.PathLike, init: str | os.PathLike,
                record: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                cfg: Mapping[str, Any], *, device: str = "auto",
                meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every measure of a study's ``measure`` section (``cfg``) on one trained run; write
    ``out`` (measures.json) and return its content. Never raises.

    The run's training record decides: a run that diverged or failed gets a measures.json
    with the same status and no values (nothing is measured on NaN weights). A measure that
    fails is recorded by :func:`convflat.measures.compute_measures` (the others still run);
    an error outside the measures (unreadable checkpoint, bad data) gives status "failed".
    The exact measures of ``cfg["whole_split"]`` see the whole training split; the other
    data-reading measures a seeded random subset of ``cfg["n_samples"]`` training images,
    the same for every run of the study (:func:`measure_sizes`; the subset is drawn by
    :meth:`convflat.measures.context.Context.subset`). ``meta`` (run_id, study, version,
    ...) is copied into the file, with ``n_samples`` (the training split) and
    ``n_samples_by_measure``.
    """
    start_time = time.perf_counter()
    meta = {**(meta or {}), "checkpoint": str(model), "n_samples": None}

    def write_status(status: str, error: str | None) -> dict[str, Any]:
        obj = {"format": MEASURES_FORMAT,
               **provenance(device=None, seed=cfg["seed"],
                            seconds=time.perf_counter() - start_time, status=status),
               **meta, "values": {}, "failed": [], "skipped": [], "measures": {},
               "error": error}
        atomic_write_json(out, obj)
        return json.loads(Path(out).read_text())

    trained = json.loads(Path(record).read_text())
    if trained.get("status") != "ok":
        log.info("training status is %r: nothing to measure", trained.get("status"))
        return write_status(trained.get("status") or "failed",
                            f"training: {trained.get('error')}")
    try:
        results, dev = _compute(model, init, data, cfg, device, meta)
    except Exception as exc:  # recorded, not raised
        log.exception("measuring failed")
        return write_status("failed", error_text(exc))
    for name, r in results.items():
        log.info("%-30s %-7s %8.2f s  %s", name, r["status"], r.get("seconds") or 0.0,
                 r.get("value") if r["status"] == "ok" else r.get("error"))
    write_measures_json(out, results, device=dev, seed=cfg["seed"],
                        seconds=time.perf_counter() - start_time, **meta, error=None)
    return json.loads(Path(out).read_text())


def measure_sizes(cfg: Mapping[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """The per-measure parameters of a study's ``measure`` section (``cfg``), with the
    training images each data-reading measure sees as its ``max_samples``: None (the whole
    training split) for the measures of ``cfg["whole_split"]``, ``cfg["n_samples"]`` for
    the others; a ``max_samples`` in ``cfg["params"][name]`` wins over both."""
    params = {n: dict(p) for n, p in (cfg["params"] or {}).items()}
    whole = set(cfg.get("whole_split", ()))
    for name in names:
        if not MEASURES[name].uses_data:
            continue
        own = params.setdefault(name, {})
        if "max_samples" not in own:
            own["max_samples"] = None if name in whole else cfg["n_samples"]
    return params


def _compute(model, init, data, cfg, device, meta):
    """Load the run and its whole training split, compute the measures, each on the
    training images :func:`measure_sizes` gives it: (results, device)."""
    dev = resolve_device(device)
    names = resolve_names(cfg["names"])
    unknown = sorted(set(cfg.get("whole_split", ())) - set(resolve_names("all")))
    if unknown:
        raise ValueError(f"config key measure.whole_split: unknown measure(s) {unknown}")
    params = measure_sizes(cfg, names)
    net, _ = load_checkpoint(model, map_location="cpu")
    init_net, _ = load_checkpoint(init, map_location="cpu")
    x, y = load_prepared(data).tensors("train")
    n = int(x.shape[0])
    meta["n_samples"] = n
    meta["n_samples_by_measure"] = {  # None: the measure reads no data (norms)
        name: min(params[name]["max_samples"] or n, n) if MEASURES[name].uses_data else None
        for name in names}
    log.info("measuring %d measures on %d training samples on %s (subsamples: %s)",
             len(names), n, dev, meta["n_samples_by_measure"])
    results = compute_measures(
        net, (x, y), init_model=init_net, names=names, params=params or None,
        device=dev, seed=cfg["seed"], batch_size=cfg["batch_size"], progress=False)
    return results, dev
