"""The runs table: which columns are measures, axes and targets; which runs are usable.

A runs table (``results/tables/<study>/runs.csv``, see ``docs/internal-api.md``) has one row
per trained run. Columns are recognised by name:

* ``hp_<axis>``: a hyperparameter. ``hp_seed`` is a *nuisance* axis: it is held fixed when
  runs are grouped (so that a group's runs differ only in one real axis) but it is never an
  axis of the granulated Kendall coefficient nor a conditioning variable of the conditional
  mutual information, following Jiang et al. (2020), whose hyperparameter space has no seed.
* ``m_<name>``: a measure. ``m_conv_trace`` and ``m_conv_relative_flatness`` are ours
  (arXiv 2603.09016); every other measure is a baseline.
* ``status`` (``ok`` / ``diverged`` / ``failed``), ``converged`` (reached the stopping
  criterion), ``train_loss`` and ``initial_loss``: a run is usable only when its training
  ended sane and converged (:mod:`convflat.usable`, the one definition).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from convflat.io import METRICS, atomic_write_text
from convflat.usable import CATEGORIES, FALSE_WORDS, TRUE_WORDS, unusable_category

MEASURE_PREFIX = "m_"
AXIS_PREFIX = "hp_"
OURS: tuple[str, ...] = ("m_conv_trace", "m_conv_relative_flatness")
DEFAULT_TARGETS: tuple[str, ...] = ("loss_gap", "acc_gap", "test_error")
NUISANCE_AXES: tuple[str, ...] = ("hp_seed",)



def measure_columns(runs: pd.DataFrame) -> list[str]:
    """The ``m_`` columns of ``runs``, ours first, then the baselines in table order."""
    cols = [c for c in runs.columns if str(c).startswith(MEASURE_PREFIX)]
    return [c for c in OURS if c in cols] + [c for c in cols if c not in OURS]


def axis_columns(runs: pd.DataFrame, *, nuisance: bool = True, varying: bool = False) -> list[str]:
    """The ``hp_`` columns of ``runs``.

    ``nuisance=False`` leaves out the nuisance axes (``hp_seed``); ``varying=True`` keeps only
    the columns that take at least two distinct values (NaN counts as a value).
    """
    cols = [c for c in runs.columns if str(c).startswith(AXIS_PREFIX)]
    if not nuisance:
        cols = [c for c in cols if c not in NUISANCE_AXES]
    if varying:
        cols = [c for c in cols if runs[c].nunique(dropna=False) >= 2]
    return cols


def short_name(column: str) -> str:
    """``m_conv_trace`` -> ``conv_trace``, ``hp_width`` -> ``width``; other names unchanged."""
    for prefix in (MEASURE_PREFIX, AXIS_PREFIX):
        if column.startswith(prefix):
            return column[len(prefix):]
    return column


def is_ours(measure: str) -> bool:
    """Whether ``measure`` (with or without the ``m_`` prefix) is one of our measures."""
    name = measure if measure.startswith(MEASURE_PREFIX) else MEASURE_PREFIX + measure
    return name in OURS


def require_columns(df: pd.DataFrame, columns: Iterable[str], what: str = "runs table") -> None:
    """Raise a ValueError that names every column of ``columns`` missing from ``df``."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {missing}; it has {list(map(str, df.columns))}"
        )


def numeric_column(df: pd.DataFrame, column: str) -> np.ndarray:
    """``df[column]`` as float64 (non-finite values become NaN), or a ValueError naming it."""
    try:
        values = np.array(pd.to_numeric(df[column], errors="raise"), dtype=np.float64)
    except (ValueError, TypeError) as err:
        bad = df[column][pd.to_numeric(df[column], errors="coerce").isna() & df[column].notna()]
        example = bad.iloc[0] if len(bad) else "?"
        raise ValueError(
            f"column {column!r} must be numeric; found {example!r} ({err})"
        ) from None
    values[~np.isfinite(values)] = np.nan
    return values


def finite_or_nan(value: Any) -> float:
    """``value`` as a float, NaN when it is missing, unparseable or not finite (a history
    entry of train.json that was not measured that epoch)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return f if math.isfinite(f) else float("nan")


def _as_bool(series: pd.Series, column: str) -> np.ndarray:
    """Parse a boolean column written by pandas or by hand (True/False, 1/0, yes/no).

    A missing value is False: a run whose convergence is unknown is not counted as converged.
    """
    out = np.zeros(len(series), dtype=bool)
    for k, v in enumerate(series.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        numeric01 = isinstance(v, (int, float, np.integer, np.floating)) and v in (0, 1)
        if isinstance(v, (bool, np.bool_)) or numeric01:
            out[k] = bool(v)
        elif isinstance(v, str) and v.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            out[k] = v.strip().lower() in TRUE_WORDS
        else:
            raise ValueError(f"column {column!r} must be boolean; found {v!r} in row {k}")
    return out


@dataclass(frozen=True)
class RunSelection:
    """The usable runs of a table and what was left out.

    ``excluded`` maps a reason (``"status=diverged"``, ``"not converged"``) to a count.
    """

    runs: pd.DataFrame
    n_total: int
    excluded: dict[str, int] = field(default_factory=dict)

    @property
    def n_runs(self) -> int:
        """Runs kept."""
        return len(self.runs)

    @property
    def n_excluded(self) -> int:
        """Runs left out."""
        return self.n_total - len(self.runs)

    def summary(self) -> str:
        """One line, e.g. ``40 runs used, 3 excluded (status=diverged: 2; not converged: 1)``."""
        text = f"{self.n_runs} runs used, {self.n_excluded} excluded"
        if self.excluded:
            text += " (" + "; ".join(f"{k}: {v}" for k, v in self.excluded.items()) + ")"
        return text


def select_runs(runs: pd.DataFrame, *, require_converged: bool = True) -> RunSelection:
    """Keep the usable runs: the rule of :mod:`convflat.usable` (status ``ok``, a finite
    stopped training loss below the initial loss, and, if ``require_converged``,
    ``converged``).

    Every left-out run is counted under the first rule it breaks
    (:func:`convflat.usable.unusable_category`); a run with a bad status is counted under
    its status only. Raises a ValueError naming ``status`` or ``converged`` when the column
    is missing or unparseable.
    """
    if not isinstance(runs, pd.DataFrame):
        raise TypeError(f"runs must be a pandas DataFrame, got {type(runs).__name__}")
    need = ["status"] + (["converged"] if require_converged else [])
    require_columns(runs, need)
    if require_converged:
        _as_bool(runs["converged"], "converged")  # raises on a value that is not boolean
    for col in ("train_loss", "initial_loss"):
        if col in runs.columns:
            numeric_column(runs, col)  # raises naming the column
    records = runs.to_dict("records")
    reasons = [unusable_category(r, require_converged=require_converged) for r in records]
    excluded: dict[str, int] = {}
    for reason in reasons:
        if reason is not None:
            excluded[reason] = excluded.get(reason, 0) + 1
    order = {c: k for k, c in enumerate(CATEGORIES)}
    excluded = dict(sorted(excluded.items(), key=lambda kv: (order.get(kv[0], -1), kv[0])))
    keep = np.array([r is None for r in reasons], dtype=bool)
    return RunSelection(runs=runs.loc[keep].reset_index(drop=True), n_total=len(runs),
                        excluded=excluded)


def read_runs(path: str | os.PathLike) -> pd.DataFrame:
    """Read a runs table written by the collect step (``runs.csv``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"runs table {path} does not exist")
    return pd.read_csv(path)


def build_runs_table(study: str, run_ids: Sequence[str], hps: Mapping[str, Mapping[str, Any]],
                     records: Sequence[Mapping[str, Any]],
                     measured: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The runs table of a study from its runs' train.json and measures.json contents.

    One row per run of ``run_ids`` (``records`` and ``measured`` in the same order; ``hps``
    maps each run id to its ``{axis: value}``), whatever happened to it. Columns, in order:
    ``run_id``, ``study``, ``status`` (the training status ok / diverged / failed, or
    "failed" when training was ok but measuring failed as a whole), ``converged`` (and
    status ok), ``hp_<axis>``, the metrics (:data:`convflat.io.METRICS`), ``m_<measure>``
    for every measure any run asked for (in the order of the first run that has it; NaN
    for a measure that failed or was skipped), then ``epochs_run``, ``stop_reason``,
    ``lr_at_stop`` (the learning rate of the last step), ``loss_target`` (the training-loss
    target, ``train.stop_loss``; empty when the study has none), ``initial_loss`` (the
    training loss before the first step) and ``n_params`` (trainable parameters), both
    empty for records that predate them, ``num_classes`` (of the run's data: the usable-run
    rule bounds an old record's final loss by ln K), ``train_seconds``,
    ``measure_seconds``, ``failed_measures`` (``;``-separated) and
    ``error`` (why a run is not ok).
    """
    if not len(run_ids) == len(records) == len(measured):
        raise ValueError(f"{len(run_ids)} run ids, {len(records)} training records and "
                         f"{len(measured)} measure records: they must match")
    names = list(dict.fromkeys(n for m in measured for n in (m.get("measures") or {})))
    rows = []
    for run_id, rec, mea in zip(run_ids, records, measured, strict=True):
        status, error = rec.get("status") or "failed", rec.get("error")
        if status == "ok" and mea.get("status") != "ok":
            status, error = "failed", f"measures: {mea.get('error')}"
        row = {"run_id": run_id, "study": study, "status": status,
               "converged": bool(rec.get("converged")) and status == "ok"}
        row.update({f"{AXIS_PREFIX}{axis}": value for axis, value in hps[run_id].items()})
        row.update({k: rec.get(k) for k in METRICS})
        values = mea.get("values") or {}
        row.update({f"{MEASURE_PREFIX}{name}": values.get(name) for name in names})
        stopping = rec.get("stopping") or {}
        row.update({"epochs_run": rec.get("epochs_run"), "stop_reason": rec.get("stop_reason"),
                    "lr_at_stop": rec.get("lr_at_stop"),
                    "loss_target": stopping.get("target"),
                    "initial_loss": rec.get("initial_loss"), "n_params": rec.get("n_params"),
                    "num_classes": (rec.get("dataset") or {}).get("num_classes"),
                    "train_seconds": rec.get("seconds"),
                    "measure_seconds": mea.get("seconds"),
                    "failed_measures": ";".join(mea.get("failed") or []), "error": error})
        rows.append(row)
    runs = pd.DataFrame(rows)
    numeric = [*METRICS, "loss_target", "initial_loss", "n_params", "num_classes"]
    for col in [c for c in runs.columns if c.startswith(MEASURE_PREFIX)] + numeric:
        runs[col] = pd.to_numeric(runs[col], errors="coerce")
    return runs


def write_runs_table(runs: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a runs table atomically as CSV (floats to 10 significant digits), as the collect
    step does; :func:`read_runs` reads it back."""
    return atomic_write_text(path, runs.to_csv(index=False, float_format="%.10g"))


def combine_runs(sources: Sequence[str | os.PathLike | pd.DataFrame]) -> pd.DataFrame:
    """Stack several studies' runs tables into one "overall" table.

    Each source is a path to a ``runs.csv`` or a DataFrame. A table without a ``study``
    column gets one: the name of the CSV's parent folder (``results/tables/<study>/runs.csv``)
    or ``study<k>`` for the k-th DataFrame. Columns are the union over sources; an axis or
    measure that a study lacks is NaN there (the analysis treats NaN as one more axis value
    and leaves runs with a NaN measure out of that measure's statistics). ``(study, run_id)``
    must be unique across the result.
    """
    if isinstance(sources, (str, os.PathLike, pd.DataFrame)):
        sources = [sources]
    frames = []
    for k, src in enumerate(sources):
        if isinstance(src, pd.DataFrame):
            df, default = src.copy(), f"study{k}"
        else:
            df, default = read_runs(src), Path(src).parent.name or f"study{k}"
        if "study" not in df.columns:
            df.insert(0, "study", default)
        frames.append(df)
    if not frames:
        raise ValueError("combine_runs needs at least one runs table")
    out = pd.concat(frames, ignore_index=True, sort=False)
    if "run_id" in out.columns:
        dup = out.duplicated(subset=["study", "run_id"], keep=False)
        if dup.any():
            first = out.loc[dup, ["study", "run_id"]].iloc[0].tolist()
            raise ValueError(f"(study, run_id) = {tuple(first)} occurs more than once")
    # Ours first among the measures, the rest in first-seen order.
    front = [c for c in out.columns if not str(c).startswith(MEASURE_PREFIX)]
    return out[front + measure_columns(out)]
