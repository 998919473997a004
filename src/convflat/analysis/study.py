"""One call that turns a study's runs table into its tables and figures (for the workflow).

Files written (names fixed; the Snakemake rule lists them as outputs):

* ``<out_tables_dir>/``: :data:`STUDY_TABLES` = ``correlation.{csv,md,tex}`` (every measure
  against every target) and ``runs_summary.{csv,md,tex}`` (the runs themselves).
* ``<out_figures_dir>/``: :data:`STUDY_FIGURES` = ``measure_vs_gap.{png,pdf}``,
  ``tau_psi.{png,pdf}``, ``psi_heatmap.{png,pdf}``.

The "overall" analysis is the same call on several runs tables: pass a list of paths and
they are stacked by :func:`~convflat.analysis.runs.combine_runs` (``study`` is then held
fixed inside Psi groups and offered as a conditioning variable to the CMI).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from convflat.analysis.figures import plot_measure_vs_gap, plot_psi_heatmap, plot_tau_psi
from convflat.analysis.runs import DEFAULT_TARGETS, combine_runs, read_runs
from convflat.analysis.stats import correlation_table
from convflat.analysis.tables import write_correlation_table, write_runs_summary

__all__ = ["STUDY_FIGURES", "STUDY_TABLES", "analyse_study"]

STUDY_TABLES = tuple(f"{name}.{ext}" for name in ("correlation", "runs_summary")
                     for ext in ("csv", "md", "tex"))
STUDY_FIGURES = tuple(f"{name}.{ext}" for name in ("measure_vs_gap", "tau_psi", "psi_heatmap")
                      for ext in ("png", "pdf"))


def analyse_study(
    runs_csv: str | os.PathLike | Sequence[str | os.PathLike],
    out_tables_dir: str | os.PathLike,
    out_figures_dir: str | os.PathLike,
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    require_converged: bool = True,
    title: str | None = None,
    dpi: int = 300,
) -> dict[str, list[Path]]:
    """Write a study's correlation table, runs summary and figures; return the paths.

    ``runs_csv`` is one ``runs.csv`` or a list of them (the overall table). The scatter
    figure ``measure_vs_gap`` plots ``targets[0]``; ``tau_psi`` and ``psi_heatmap`` have
    one panel per target; PNGs at ``dpi``. Returns ``{"correlation": [...], "runs_summary": [...],
    "measure_vs_gap": [...], "tau_psi": [...], "psi_heatmap": [...], "paths": [all]}``.
    Raises ValueError when no run is usable or a target or measure column is bad.
    """
    if isinstance(runs_csv, (str, os.PathLike)):
        runs = read_runs(runs_csv)
        default_title = Path(runs_csv).parent.name
    else:
        runs = combine_runs(list(runs_csv))
        default_title = "overall"
    targets = list(targets)
    if not targets:
        raise ValueError("targets must name at least one column")
    tables, figures = Path(out_tables_dir), Path(out_figures_dir)
    table = correlation_table(runs, targets=targets, n_boot=n_boot, level=level, seed=seed,
                              require_converged=require_converged)
    out: dict[str, list[Path]] = {
        "correlation": write_correlation_table(table, tables / "correlation",
                                               title=title or default_title),
        "runs_summary": write_runs_summary(runs, tables / "runs_summary",
                                           require_converged=require_converged),
        "measure_vs_gap": plot_measure_vs_gap(runs, figures / "measure_vs_gap",
                                              target=targets[0],
                                              require_converged=require_converged, dpi=dpi),
        "tau_psi": plot_tau_psi(table, figures / "tau_psi", dpi=dpi),
        "psi_heatmap": plot_psi_heatmap(table, figures / "psi_heatmap", dpi=dpi),
    }
    out["paths"] = [p for paths in list(out.values()) for p in paths]
    return out
