"""Former home of the workflow's library code, now :mod:`convflat.pipeline` (one module per
stage). These names stay importable from here; new code imports them from the pipeline."""

from convflat.pipeline.notices import failed_runs_notice, no_usable_runs_message
from convflat.pipeline.registry import (
    FIGURES,
    VALIDATION_TABLES,
    Figure,
    ValidationTable,
    figure,
    validation_table,
)

__all__ = [
    "FIGURES", "VALIDATION_TABLES", "Figure", "ValidationTable", "failed_runs_notice",
    "figure", "no_usable_runs_message", "validation_table",
]
