"""The library side of the Snakemake workflow, one module per stage (the rule files
``workflow/rules/<stage>.smk``), and the registries the rules are built from.

* :mod:`~convflat.pipeline.registry`: :data:`STAGES`, :data:`FIGURES` (each with its
  caption) and :data:`VALIDATION_TABLES`. No torch, no pandas: ``common.smk`` reads it on
  every dry run.
* :mod:`~convflat.pipeline.notices`: which runs the statistics cannot use, and why
  (:func:`unusable_reason`); the end-of-run notice and the correlation job's refusal.
  No torch, no pandas.
* One job module per stage: :mod:`~convflat.pipeline.data` (download, folder manifests),
  :mod:`~convflat.pipeline.train` (the time estimate and the start-up notice),
  :mod:`~convflat.pipeline.measure` (:func:`~convflat.pipeline.measure.measure_run`),
  :mod:`~convflat.pipeline.analysis` (the figure job), :mod:`~convflat.pipeline.validation`
  (the validation runs and table files), :mod:`~convflat.pipeline.report` (notebooks).
  ``data`` and ``train`` are read by the Snakemake process and import no torch; the
  others import what their jobs use.
* :mod:`~convflat.pipeline.script` (``start``, ``fail``, ``snakemake_from_argv``: what every
  workflow script does) and :mod:`~convflat.pipeline.mock` (``mock_snakemake``: a job's
  ``snakemake`` object, to run a script by hand).

This package's ``__init__`` imports only the registry and the notices.
"""

from convflat.pipeline.notices import failed_runs_notice, no_usable_runs_message, unusable_reason
from convflat.pipeline.registry import (
    FIGURES,
    STAGES,
    VALIDATION_TABLES,
    Figure,
    Stage,
    ValidationTable,
    figure,
    validation_table,
)

__all__ = [
    "FIGURES", "STAGES", "VALIDATION_TABLES", "Figure", "Stage", "ValidationTable",
    "failed_runs_notice", "figure", "no_usable_runs_message", "unusable_reason",
    "validation_table",
]
