"""Stage ``validation`` (workflow/rules/validation.smk): the trained runs a validation table
is built on, and the tables' files. The tables themselves are
:data:`convflat.pipeline.registry.VALIDATION_TABLES`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from convflat.data import load_prepared, seeded_subset
from convflat.io import atomic_write_text
from convflat.models import load_checkpoint

__all__ = ["TrainedRun", "load_trained_run", "load_validation_runs", "markdown_table",
           "write_table"]

log = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """The trained model a validation table uses, its initial weights and a seeded subset
    of its training data ``(x, y)``; ``path`` names it (``<study>/<run_id>``), ``also``
    holds the runs of ``validation.invariance.extra_runs`` (invariance table only)."""

    model: Any
    init: Any
    data: tuple[Any, Any]
    path: str = ""
    also: list[TrainedRun] = field(default_factory=list)


def load_trained_run(model: str | os.PathLike, init: str | os.PathLike,
                     record: str | os.PathLike, data: str | os.PathLike, *, n_samples: int,
                     seed: int) -> TrainedRun:
    """The validation run: its model, initial weights and a seeded random subset of
    ``n_samples`` training images (:func:`convflat.data.seeded_subset`). A run whose
    training did not end with status ok is an error that names config key validation.run."""
    rec = json.loads(Path(record).read_text())
    if rec.get("status") != "ok":
        raise RuntimeError(
            f"the validation run {model} has training status {rec.get('status')!r}"
            f" ({rec.get('error')}); choose another with config key validation.run")
    x, y = load_prepared(data).tensors("train")
    x, y = seeded_subset(x, y, n=n_samples, seed=seed)
    log.info("model %s, %d training samples", model, int(x.shape[0]))
    path = Path(model).parent.as_posix()
    path = path.split("results/runs/", 1)[1] if "results/runs/" in path else path
    return TrainedRun(load_checkpoint(model)[0], load_checkpoint(init)[0], (x, y), path)


def load_validation_runs(inputs: Mapping[str, Any], *, n_samples: int,
                         seed: int) -> TrainedRun:
    """The validation run of a validation_model job's ``inputs`` (``model``, ``init``,
    ``record``, ``data``; :func:`load_trained_run`), with the runs of the lists
    ``also_model``, ``also_init``, ``also_record``, ``also_data`` in its ``also``."""
    keys = ("model", "init", "record", "data")
    extra = zip(*(inputs.get(f"also_{k}", []) for k in keys), strict=True)
    run = load_trained_run(*(inputs[k] for k in keys), n_samples=n_samples, seed=seed)
    run.also = [load_trained_run(*files, n_samples=n_samples, seed=seed) for files in extra]
    return run


def markdown_table(df: Any) -> str:
    """A DataFrame as a GitHub Markdown table (floats with 4 significant digits)."""
    return df.to_markdown(index=False, floatfmt=".4g") + "\n"


def write_table(df: Any, csv: str | os.PathLike, md: str | os.PathLike | None = None) -> None:
    """Write ``df`` atomically as CSV (floats to 10 significant digits) and, with ``md``, as
    a Markdown table (:func:`markdown_table`)."""
    atomic_write_text(csv, df.to_csv(index=False, float_format="%.10g"))
    if md is not None:
        atomic_write_text(md, markdown_table(df))
