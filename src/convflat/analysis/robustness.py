r"""Robustness: where does a measure order a pair of runs the wrong way?

Dziugaite, Drouin, Neal, Rajkumar, Caballero, Wang, Mitliagkas, Roy, "In search of robust
measures of generalization", NeurIPS 2020 (arXiv 2010.11924), judge a measure by its sign
error on pairs of runs that differ in one hyperparameter, and by the worst case over the
hyperparameter families rather than the average: a measure that is right on average can be
wrong on every pair of one family. For scale: in their study every measure reaches a
worst-case sign error of 1.0 in some environment, and 0.5 is what a coin flip scores.

Here, for a target ``g`` and measure ``mu``:

* **pairs**: every pair of usable runs that differs in exactly one grid hyperparameter
  (the ``hp_`` columns, the seed included among the ones held equal, and ``study`` in a
  pooled table). The family of the pair is that hyperparameter.
* **noise rule**: a pair whose target difference is within seed noise says nothing about
  the order of the two configurations, so it is left out: with ``s`` the pooled
  within-configuration standard deviation of the target over the seeds
  (:func:`~convflat.analysis.stats.spread_ratio`), a pair is kept only when
  ``|g_i - g_j| > z * sqrt(2) * s`` (``sqrt(2) s`` is the sd of the difference of two runs
  of one configuration; default ``z = 1``: a pair counts when its difference exceeds one
  standard deviation of the difference between two seeds of one configuration). Without
  replicated seeds ``s`` is unknown and every pair with ``g_i != g_j`` is kept (the result
  says so).
* **sign error** of a pair: ``(1 - sign(mu_i - mu_j) * sign(g_i - g_j)) / 2``: 0 when the
  measure orders the pair as the target does, 1 when it orders it the other way, 1/2 on a
  tie of the measure. Its mean over a family's pairs is the family's sign error; the
  largest of these is the measure's worst family.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from convflat.analysis.runs import NUISANCE_AXES, axis_columns, numeric_column, short_name
from convflat.analysis.stats import config_groups, pooled_within_sd

__all__ = ["OneAxisPairs", "one_axis_pairs", "sign_error_table"]


@dataclass(frozen=True)
class OneAxisPairs:
    """The pairs of runs (row positions ``i``, ``j``) that differ in exactly one grid
    hyperparameter (``family``), after the noise rule; ``threshold`` is the smallest kept
    ``|g_i - g_j|`` bound (NaN when the seed noise is unknown), ``n_dropped`` per family
    the pairs left out as within noise, ``note`` what was assumed."""

    i: np.ndarray
    j: np.ndarray
    family: np.ndarray
    threshold: float
    n_dropped: dict[str, int] = field(default_factory=dict)
    note: str = ""


def _hp_key(runs: pd.DataFrame) -> list[str]:
    cols = axis_columns(runs)  # every hp_ column, the seed included
    if "study" in runs.columns:
        cols.append("study")
    return cols


def one_axis_pairs(runs: pd.DataFrame, target: str, *, noise_z: float = 1.0) -> OneAxisPairs:
    """Pairs of ``runs`` (already the usable ones) that differ in exactly one non-seed
    hyperparameter, their target difference beyond ``noise_z * sqrt(2) * s`` (see the
    module docstring)."""
    runs = runs.reset_index(drop=True)
    g = numeric_column(runs, target)
    cols = _hp_key(runs)
    values = runs[cols].astype("string").fillna("<NA>").to_numpy()
    finite = np.isfinite(g)  # the seed sd of the target, as spread_ratio pools it
    s, _ = pooled_within_sd(g[finite], config_groups(runs.loc[finite].reset_index(drop=True)))
    threshold = noise_z * np.sqrt(2.0) * s if np.isfinite(s) else float("nan")
    note = (f"pairs kept when |Δ{target}| > {noise_z:g} × √2 × seed sd ({s:.3g})"
            if np.isfinite(s) else
            f"no replicated seeds: the seed noise of {target} is unknown, every pair is kept")
    ii, jj, fam, dropped = [], [], [], {}
    for i, j in itertools.combinations(range(len(runs)), 2):
        differ = np.nonzero(values[i] != values[j])[0]
        if len(differ) != 1 or cols[differ[0]] in NUISANCE_AXES or cols[differ[0]] == "study":
            continue
        if not (np.isfinite(g[i]) and np.isfinite(g[j])) or g[i] == g[j]:
            continue
        family = cols[differ[0]]
        if np.isfinite(threshold) and abs(g[i] - g[j]) <= threshold:
            dropped[family] = dropped.get(family, 0) + 1
            continue
        ii.append(i), jj.append(j), fam.append(family)
    return OneAxisPairs(np.asarray(ii, dtype=int), np.asarray(jj, dtype=int),
                        np.asarray(fam, dtype=object), float(threshold), dropped, note)


def sign_error_table(runs: pd.DataFrame, measures: list[str], target: str, *,
                     noise_z: float = 1.0) -> pd.DataFrame:
    """Mean sign error of each measure column per hyperparameter family.

    ``runs``: the usable runs. One row per measure (index: the column name); columns
    ``<family>`` (the family's mean sign error, NaN without a pair) and
    ``pairs[<family>]`` (pairs used, after dropping those where the measure is not
    finite), then ``mean`` (over all kept pairs), ``worst`` (the largest family value) and
    ``worst_family``. ``attrs``: ``note`` (the noise rule as applied), ``dropped`` (pairs
    within noise per family), ``threshold``.
    """
    runs = runs.reset_index(drop=True)
    pairs = one_axis_pairs(runs, target, noise_z=noise_z)
    g = numeric_column(runs, target)
    # every varying axis, also one whose pairs all fell within noise (shown with 0 pairs)
    families = axis_columns(runs, nuisance=False, varying=True)
    rows = {}
    for m in measures:
        mu = numeric_column(runs, m)
        ok = np.isfinite(mu[pairs.i]) & np.isfinite(mu[pairs.j])
        err = (1 - np.sign(mu[pairs.i] - mu[pairs.j]) * np.sign(g[pairs.i] - g[pairs.j])) / 2
        row: dict[str, object] = {}
        for f in families:
            sel = ok & (pairs.family == f)
            row[short_name(f)] = float(err[sel].mean()) if sel.any() else float("nan")
            row[f"pairs[{short_name(f)}]"] = int(sel.sum())
        fam_values = {k: v for k, v in row.items() if not k.startswith("pairs[")
                      and np.isfinite(v)}
        row["mean"] = float(err[ok].mean()) if ok.any() else float("nan")
        worst = max(fam_values, key=fam_values.get) if fam_values else None
        row["worst"] = fam_values[worst] if worst else float("nan")
        row["worst_family"] = worst or ""
        rows[m] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.attrs.update(note=pairs.note, threshold=pairs.threshold,
                       dropped={short_name(k): v for k, v in pairs.n_dropped.items()},
                       n_pairs=len(pairs.i), target=target)
    return table
