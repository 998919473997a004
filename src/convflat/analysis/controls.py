"""Controls: what a reviewer asks a generalization measure to beat.

A flatness measure is only interesting if it ranks the runs better than knowing how they
were trained. The controls are pseudo-measures read straight off the runs table: the
stopped training loss, the epochs trained (to the target, in a matched-loss study), the
parameter count, and every numeric grid hyperparameter that varies (except the seed). They
are ranked alongside the measures in the correlation tables (rows ``control:<name>``) and
the headline.

A control has no a-priori direction: more epochs may mean a larger or a smaller gap. The
headline therefore compares a measure against a control *oriented by the data* (its sign
chosen so that its Kendall tau with the target is positive on the usable runs), which
favours the control; a measure that beats a control so oriented beats it honestly.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from convflat.analysis.runs import axis_columns, numeric_column, short_name

__all__ = [
    "CONTROLS",
    "CONTROL_PREFIX",
    "add_controls",
    "control_columns",
    "control_label",
    "is_control",
]

#: Prefix of a control's column in a runs table after :func:`add_controls`.
CONTROL_PREFIX = "c_"

#: The runs-table columns that become controls, with what knowing them means.
CONTROLS: dict[str, str] = {
    "train_loss": "the stopped training loss",
    "epochs_run": "the epochs trained",
    "n_params": "the parameter count",
}


def is_control(name: str) -> bool:
    """Whether a column (``c_...``) or a correlation-table row (``control:...``) is a
    control."""
    return str(name).startswith((CONTROL_PREFIX, "control:"))


def control_label(column: str) -> str:
    """The row name of a control column in the correlation tables:
    ``c_train_loss`` -> ``control:train_loss``, ``c_hp_width`` -> ``control:width``."""
    return "control:" + short_name(column[len(CONTROL_PREFIX):])


def control_columns(runs: pd.DataFrame) -> list[str]:
    """The ``c_`` columns of ``runs``, in table order."""
    return [c for c in runs.columns if str(c).startswith(CONTROL_PREFIX)]


def add_controls(runs: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``runs`` with a ``c_<column>`` column for every control that varies.

    Controls: the columns of :data:`CONTROLS` present in the table, and every ``hp_``
    column except the seed that is numeric and varies (``c_hp_<axis>``). A column that is
    constant or has no finite value over the table is left out (it orders nothing), as is a
    non-numeric axis (no order to rank by).
    """
    out = runs.copy()
    candidates = [c for c in CONTROLS if c in runs.columns]
    candidates += axis_columns(runs, nuisance=False, varying=True)
    for col in candidates:
        values = pd.to_numeric(runs[col], errors="coerce").to_numpy(dtype=np.float64)
        if runs[col].notna().sum() > np.isfinite(values).sum():
            continue  # a categorical axis (e.g. an optimizer name): no order to rank by
        values = numeric_column(runs.assign(**{col: values}), col)
        finite = values[np.isfinite(values)]
        if finite.size >= 2 and np.ptp(finite) > 0:
            out[CONTROL_PREFIX + col] = values
    return out
