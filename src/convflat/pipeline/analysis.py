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
from convflat.io import atomic_write_text
from convflat.pipeline.registry import FIGURES

__all__ = ["draw_figure", "read_runs_tables"]


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
