"""Floor 0: which trained runs a study may compare (the one definition, without pandas).

A run is *usable* when its training ended sane and, when asked, at the study's target:

1. ``status`` is ``ok`` (not ``failed``, not ``diverged``);
2. its stopped training loss (``train_loss``, the eval-mode cross-entropy on the whole
   training split) is finite;
3. that loss is below the run's initial loss (``initial_loss``: the same cross-entropy of
   the initialised net before its first step). A net that ends no better than it started
   has diverged whatever its stopping rule says (a run at loss 7e18 with no loss target
   stops at its epoch cap and would otherwise count as converged). Where the record
   predates ``initial_loss`` the check falls back to ``ln(num_classes)``, the loss of the
   uniform prediction (the runs table carries the data's class count), and is skipped
   when neither is known;
4. with ``require_converged``: ``converged`` is true (the training-loss target was reached,
   or, in a study without one, the epochs ran out normally).

A runs table (``runs.csv``) row and a ``train.json`` record both carry these keys, so the
analysis (:func:`convflat.analysis.runs.select_runs`), the figures and the end-of-run
notices of the workflow, which runs in the Snakemake process without pandas, all ask
:func:`unusable_reason` and count by :func:`unusable_category`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["CATEGORIES", "FALSE_WORDS", "TRUE_WORDS", "as_bool", "unusable_category",
           "unusable_reason"]

#: The reasons a run is left out, as counted in the headline and the runs summary. A bad
#: status is counted as ``status=<status>``.
CATEGORIES = ("training loss not finite", "diverged (final loss >= initial loss)",
              "not converged")

#: How a true and a false flag are written by pandas or by hand (runs.csv's ``converged``).
TRUE_WORDS = frozenset({"true", "1", "yes", "y", "t", "1.0"})
FALSE_WORDS = frozenset({"false", "0", "no", "n", "f", "0.0", ""})


def as_bool(value: Any) -> bool:
    """True for True, 1 and the strings true/1/yes/y/t (any case); False otherwise,
    missing values included (a run whose convergence is unknown is not converged)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
        return value == 1
    return str(value).strip().lower() in TRUE_WORDS if value is not None else False


def _number(value: Any) -> float | None:
    """``value`` as a float; None when missing or unparseable (an empty CSV cell, NaN)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _initial_loss(row: Mapping[str, Any]) -> float | None:
    init = _number(row.get("initial_loss"))
    if init is not None and math.isfinite(init):
        return init
    k = _number(row.get("num_classes"))
    return math.log(k) if k is not None and k >= 2 else None


def unusable_category(row: Mapping[str, Any], *, require_converged: bool = True) -> str | None:
    """None when the run is usable (see the module docstring), else the reason as one of
    ``status=<status>`` or :data:`CATEGORIES`, the first rule it breaks. A row without a
    ``train_loss`` key at all (a hand-made table) is not checked for sanity."""
    status = str(row.get("status") if row.get("status") is not None else "<missing>").strip()
    if status != "ok":
        return f"status={status or '<missing>'}"
    if "train_loss" in row:
        loss = _number(row.get("train_loss"))
        if loss is None or not math.isfinite(loss):
            return CATEGORIES[0]
        init = _initial_loss(row)
        if init is not None and loss >= init:
            return CATEGORIES[1]
    if require_converged and not as_bool(row.get("converged")):
        return CATEGORIES[2]
    return None


def unusable_reason(row: Mapping[str, Any], *, require_converged: bool = True) -> str | None:
    """None when the run is usable, else its :func:`unusable_category` with the details
    a user needs to act on it: the error of a failed run, the losses of a diverged one, the
    stop reason and epochs of one that did not converge."""
    category = unusable_category(row, require_converged=require_converged)
    if category is None:
        return None
    if category.startswith("status="):
        error = row.get("error")
        has_error = error is not None and str(error) not in ("", "nan", "None")
        stop = row.get("stop_reason")
        if category == "status=diverged" and str(stop).startswith("diverged_"):
            category += f" ({stop})"  # which rule stopped it: diverged_factor, ...
        return category + (f": {error}" if has_error else "")
    if category == CATEGORIES[1]:
        return (f"diverged: final training loss {_number(row.get('train_loss')):.4g} is not "
                f"below the initial loss {_initial_loss(row):.4g}")
    if category == CATEGORIES[0]:
        return f"training loss not finite ({row.get('train_loss')})"
    return (f"not converged (stop reason {row.get('stop_reason')}, "
            f"{row.get('epochs_run')} epochs)")
