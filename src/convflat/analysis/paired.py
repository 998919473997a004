r"""Paired comparison of two measures on the same runs.

Two measures evaluated on the same runs are not independent: whether their Kendall taus
differ is a question about the *difference* tau(a) - tau(b), not about whether their two
marginal intervals overlap (they can overlap while the difference is clearly non-zero).
:func:`paired_tau_difference` resamples the runs once per bootstrap replicate and computes
both taus on that same resample; the percentile interval of the differences decides the
verdict: ``a`` wins when its lower end is above 0, loses when its upper end is below 0,
and ties otherwise.

:func:`paired_psi_difference` does the same for the granulated Kendall coefficient: its
bootstrap resamples the groups of each axis (as
:func:`~convflat.analysis.stats.granulated_kendall` does) and applies the same resample to
both measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from convflat.analysis.runs import numeric_column
from convflat.analysis.stats import (
    _signs,
    _weighted_tau,
    axis_groups,
    bootstrap_weights,
    kendall_tau,
)

__all__ = ["PairedDifference", "paired_psi_difference", "paired_tau_difference"]


@dataclass(frozen=True)
class PairedDifference:
    """``diff`` = stat(a) - orientation * stat(b) on the same runs, with its paired
    percentile bootstrap interval ``lo``/``hi`` at ``level`` (NaN when fewer than half of
    the resamples give a defined difference). ``orientation`` is +1, or the sign of b's
    statistic when b was oriented by the data (a control). ``n`` runs (tau) or groups
    (psi) used."""

    a: str
    b: str
    target: str
    stat: str
    diff: float
    lo: float
    hi: float
    level: float
    n: int
    orientation: float = 1.0

    @property
    def verdict(self) -> str:
        """``"wins"`` (interval above 0), ``"loses"`` (below 0), ``"ties"`` (contains 0),
        or ``"undecided"`` (no interval)."""
        if not (np.isfinite(self.lo) and np.isfinite(self.hi)):
            return "undecided"
        return "wins" if self.lo > 0 else "loses" if self.hi < 0 else "ties"


def _interval(samples: np.ndarray, level: float, n_boot: int) -> tuple[float, float]:
    finite = samples[np.isfinite(samples)]
    if finite.size < max(1, 0.5 * n_boot):
        return float("nan"), float("nan")
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _orientation(value: float, orient: bool) -> float:
    return float(np.sign(value)) if orient and np.isfinite(value) and value != 0 else 1.0


def paired_tau_difference(
    runs: pd.DataFrame, a: str, b: str, target: str, *, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, variant: str = "b", orient_b: bool = False,
    chunk: int = 256,
) -> PairedDifference:
    """tau(a, target) - tau(b, target) over the runs where a, b and the target are all
    finite, with a paired bootstrap interval: replicate r draws the runs with the counts
    ``bootstrap_weights(n, n_boot, seed)[r]`` and evaluates both taus on that same sample.

    With ``orient_b`` (for a control), b's tau enters with the sign of its full-sample tau,
    so a measure is compared with the control's best direction.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    x, y, g = (numeric_column(runs, c) for c in (a, b, target))
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(g)
    x, y, g = x[keep], y[keep], g[keep]
    n = int(keep.sum())
    tau_b = kendall_tau(y, g, variant=variant) if n >= 2 else float("nan")
    s = _orientation(tau_b, orient_b)
    diff = (kendall_tau(x, g, variant=variant) - s * tau_b) if n >= 2 else float("nan")
    if n < 2:
        return PairedDifference(a, b, target, "tau", diff, float("nan"), float("nan"), level,
                                n, s)
    w = bootstrap_weights(n, n_boot, seed)
    sx, sy, sg = _signs(x), _signs(y), _signs(g)
    samples = np.concatenate([
        _weighted_tau(sx, sg, w[k:k + chunk], variant)
        - s * _weighted_tau(sy, sg, w[k:k + chunk], variant)
        for k in range(0, n_boot, chunk)])
    lo, hi = _interval(samples, level, n_boot)
    return PairedDifference(a, b, target, "tau", float(diff), lo, hi, level, n, s)


def _group_taus(mu_a, mu_b, g, values, parts, variant):
    """Per group of one axis: (tau_a, tau_b) where both are defined."""
    out = []
    for pos in parts:
        pos = pos[np.isfinite(mu_a[pos]) & np.isfinite(mu_b[pos]) & np.isfinite(g[pos])]
        if len(pos) < 2 or pd.unique(values[pos]).size < 2:
            continue
        ta = kendall_tau(mu_a[pos], g[pos], variant=variant)
        tb = kendall_tau(mu_b[pos], g[pos], variant=variant)
        if np.isfinite(ta) and np.isfinite(tb):
            out.append((ta, tb))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def paired_psi_difference(
    runs: pd.DataFrame, a: str, b: str, target: str, *, n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, variant: str = "b",
    groups: dict[str, list[np.ndarray]] | None = None, orient_b: bool = False,
) -> PairedDifference:
    """Psi(a) - Psi(b) over the groups of runs (per axis, runs that differ only in that
    axis) where both measures have a defined tau, with a stratified paired bootstrap:
    each axis's groups are resampled with replacement, the same draw for both measures.
    The interval is NaN when an axis used has fewer than 2 such groups. ``n`` counts the
    groups used over all axes.
    """
    runs = runs.reset_index(drop=True)
    if groups is None:
        groups = axis_groups(runs)
    mu_a, mu_b, g = (numeric_column(runs, c) for c in (a, b, target))
    per_axis = {axis: _group_taus(mu_a, mu_b, g, runs[axis].to_numpy(), parts, variant)
                for axis, parts in groups.items()}
    per_axis = {axis: t for axis, t in per_axis.items() if len(t)}
    if not per_axis:
        return PairedDifference(a, b, target, "psi", float("nan"), float("nan"),
                                float("nan"), level, 0)
    psi_b = float(np.mean([t[:, 1].mean() for t in per_axis.values()]))
    s = _orientation(psi_b, orient_b)
    diff = float(np.mean([t[:, 0].mean() for t in per_axis.values()])) - s * psi_b
    n = sum(len(t) for t in per_axis.values())
    if any(len(t) < 2 for t in per_axis.values()):
        return PairedDifference(a, b, target, "psi", diff, float("nan"), float("nan"), level,
                                n, s)
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for t in per_axis.values():
        d = t[:, 0] - s * t[:, 1]
        boot += d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(axis=1)
    lo, hi = _interval(boot / len(per_axis), level, n_boot)
    return PairedDifference(a, b, target, "psi", diff, lo, hi, level, n, s)
