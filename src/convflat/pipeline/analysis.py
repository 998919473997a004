"""Stage ``analysis`` (workflow/rules/analysis.smk): the figure job, and the runs tables the
correlation job reads. The statistics, tables and plots are :mod:`convflat.analysis`; the
figures are :data:`convflat.pipeline.registry.FIGURES`."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from convflat.analysis import combine_runs, read_runs
from convflat.analysis.along import COLUMNS, TooFewRuns, write_tau_along_training
from convflat.analysis.figures import placeholder_figure, plot_tau_along_training
from convflat.analysis.headline import HEADLINE_TARGETS
from convflat.io import atomic_write_text
from convflat.pipeline.registry import FIGURES
from convflat.records import read_train_record

__all__ = ["draw_figure", "read_runs_tables", "tau_along_job"]


def read_runs_tables(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One study's runs table, or several stacked with ``study`` as one more axis (the
    overall analysis: :func:`convflat.analysis.combine_runs`)."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return read_runs(paths[0]) if len(paths) == 1 else combine_runs(paths)


def draw_figure(name: str, inputs: Mapping[str, Any], out: str | os.PathLike,
                analysis: Mapping[str, Any], *,
                caption: str | os.PathLike | None = None) -> list[Path]:
    """Draw figure ``name`` of the registry (``out``: its path without suffix; ``inputs`` and
    ``analysis`` as :attr:`convflat.pipeline.registry.Figure.draw` takes them) and, with
    ``caption``, write its caption file there
    (:meth:`~convflat.pipeline.registry.Figure.caption_text`). Returns the figure's paths."""
    figure = FIGURES[name]
    paths = figure.draw(inputs, Path(out), analysis)
    if caption is not None:
        atomic_write_text(caption, figure.caption_text(inputs, analysis) + "\n")
    return paths


def tau_along_job(runs: str | os.PathLike, records: Sequence[str | os.PathLike],
                  run_ids: Sequence[str], table: str | os.PathLike,
                  figure: str | os.PathLike, analysis: Mapping[str, Any], *,
                  title: str | None = None) -> list[Path]:
    """The tau-along-training job: ``<table>.csv`` / ``.md`` and ``<figure>.png`` / ``.pdf``
    for the headline targets of ``analysis["targets"]``, from the study's runs table and its
    runs' ``train.json`` (``records``, in the order of ``run_ids``)."""
    recs = {str(r): read_train_record(p) for r, p in zip(run_ids, records, strict=True)}
    targets = [t for t in HEADLINE_TARGETS if t in analysis["targets"]] or \
        list(analysis["targets"])[:1]
    paths = [Path(table).with_suffix(".csv"), Path(table).with_suffix(".md")]
    try:
        tables, _, _ = write_tau_along_training(
            read_runs(runs), recs, table, targets=targets, n_levels=analysis["along_levels"],
            n_boot=analysis["n_boot"], seed=analysis["seed"], title=title,
            require_converged=analysis["require_converged"])
    except TooFewRuns as exc:  # the outputs say so: the rest of the study is still drawn
        atomic_write_text(paths[0], ",".join(COLUMNS) + "\n")
        atomic_write_text(paths[1], f"# {title or 'Kendall τ along training'}\n\n{exc}.\n")
        return paths + placeholder_figure(figure, f"{exc}")
    return paths + plot_tau_along_training(tables, figure)
