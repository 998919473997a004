r"""Rank statistics that say whether a measure predicts generalization.

Sign convention: every statistic is computed between the measure ``mu`` and a target ``g``
(``loss_gap``, ``acc_gap`` or ``test_error``) as they are, so a *good* complexity measure has a
*positive* value (larger measure, larger gap). Nothing is negated.

Sources:

* Kendall (1938, 1945) for tau-a and tau-b.
* Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic Generalization Measures and Where to
  Find Them", ICLR 2020 (arXiv 1912.02178), section "Generalization: what is the goal and how
  to evaluate it?", subsections "Kendall's rank-correlation coefficient", "Granulated
  Kendall's coefficient" and "Conditional independence test": the sign-agreement form of
  tau, Psi, and the conditional mutual information score K(mu). The NeurIPS 2020 PGDL
  competition ("Predicting Generalization in Deep Learning") scored entries with the same
  conditional mutual information.

All pairwise statistics here are computed by hand with numpy on the n x n matrix of pair
signs (O(n^2) memory: about 8 n^2 bytes, 32 MB for 2000 runs). That form makes the bootstrap
of tau one matrix product per resample batch instead of one scipy call per resample.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats

from convflat.analysis.controls import (
    CONTROL_PREFIX,
    add_controls,
    control_columns,
    control_label,
    is_control,
)
from convflat.analysis.runs import (
    AXIS_PREFIX,
    DEFAULT_TARGETS,
    NUISANCE_AXES,
    axis_columns,
    is_ours,
    measure_columns,
    numeric_column,
    require_columns,
    select_runs,
    short_name,
)

__all__ = [
    "BootstrapCI",
    "CMIResult",
    "ConvergenceSummary",
    "PsiResult",
    "SpreadRatio",
    "axis_groups",
    "bootstrap_kendall",
    "bootstrap_weights",
    "conditional_mutual_information",
    "convergence_summary",
    "correlation_table",
    "granulated_kendall",
    "kendall_tau",
    "pearson",
    "spearman",
    "spread_ratio",
]

_H_EPS = 1e-12  # an entropy below this (in nats) is zero: the stratum's gap sign is certain


# --------------------------------------------------------------------------- Kendall tau


def _as_pair(x, y) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} and {y.size}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("x and y must not contain NaN; drop those runs first")
    return x, y


def _signs(v: np.ndarray) -> np.ndarray:
    """(n, n) matrix sign(v_i - v_j) in float64 (zero on the diagonal and on ties)."""
    return np.sign(v[:, None] - v[None, :])


def _weighted_tau(sx: np.ndarray, sy: np.ndarray, w: np.ndarray, variant: str) -> np.ndarray:
    """tau of the sample that holds run i w[b, i] times, for each row b of ``w`` (B, n).

    With pair signs s^x, s^y and counts w, sum_{i,j} w_i w_j s^x_ij s^y_ij is twice
    (concordant - discordant) pairs of the expanded sample (copies of one run are tied in
    both and add 0), and sum_{i,j} w_i w_j (s^x_ij)^2 is twice the pairs untied in x.
    """
    num = np.einsum("bi,bi->b", w @ (sx * sy), w)
    if variant == "a":
        total = w.sum(axis=1)
        den = total * (total - 1.0)
    else:
        dx = np.einsum("bi,bi->b", w @ (sx * sx), w)
        dy = np.einsum("bi,bi->b", w @ (sy * sy), w)
        den = np.sqrt(dx * dy)
    out = np.full(w.shape[0], np.nan)
    ok = den > 0
    out[ok] = num[ok] / den[ok]
    return out


def kendall_tau(x, y, *, variant: str = "b") -> float:
    r"""Kendall's rank correlation between ``x`` and ``y``; NaN when it is undefined.

    Over the ordered pairs i != j of the n runs,

    * ``variant="a"`` (Jiang et al. 2020, "Kendall's rank-correlation coefficient"):
      tau_a = 1 / (n (n - 1)) * sum_{i != j} sign(x_i - x_j) sign(y_i - y_j);
      a tie in either variable adds 0.
    * ``variant="b"`` (default; Kendall 1945, what ``scipy.stats.kendalltau`` returns):
      tau_b = sum sign(dx) sign(dy) / sqrt(sum sign(dx)^2 * sum sign(dy)^2), i.e.
      (P - Q) / sqrt((n0 - n1)(n0 - n2)) with n1, n2 the pairs tied in x, in y. It corrects
      for ties, so a measure that ties often is not pulled towards 0.

    Both agree when there are no ties. NaN when n < 2, or (tau_b) when x or y is constant.
    """
    if variant not in ("a", "b"):
        raise ValueError(f"variant must be 'a' or 'b', got {variant!r}")
    x, y = _as_pair(x, y)
    if x.size < 2:
        return float("nan")
    return float(_weighted_tau(_signs(x), _signs(y), np.ones((1, x.size)), variant)[0])


def bootstrap_weights(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """Counts (n_boot, n): how often each of n runs is drawn in each resample of size n.

    Drawing n runs with replacement is a multinomial(n; 1/n, ..., 1/n) draw of the counts.
    The same ``(n, n_boot, seed)`` gives the same resamples, so measures evaluated on the same
    runs share their resamples (a paired bootstrap).
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"need n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


@dataclass(frozen=True)
class BootstrapCI:
    """A percentile bootstrap interval: ``lo``, ``hi`` at ``level``, from ``n_valid`` of
    ``n_boot`` resamples (a resample whose statistic is undefined, e.g. all copies of one
    run, is dropped). ``samples`` holds every resample's value (NaN where undefined)."""

    lo: float
    hi: float
    level: float
    n_boot: int
    n_valid: int
    samples: np.ndarray = field(repr=False)


def bootstrap_kendall(
    x, y, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0, variant: str = "b",
    min_valid: float = 0.5, chunk: int = 256,
) -> BootstrapCI:
    """Percentile bootstrap CI of :func:`kendall_tau` over runs (resampled with replacement).

    The interval is [q_{(1-level)/2}, q_{(1+level)/2}] of the resampled taus. When fewer than
    ``min_valid * n_boot`` resamples give a defined tau (tiny or nearly constant samples),
    ``lo`` and ``hi`` are NaN. Cost: O(n_boot n^2) in matrix products, ``chunk`` resamples
    at a time.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if variant not in ("a", "b"):
        raise ValueError(f"variant must be 'a' or 'b', got {variant!r}")
    x, y = _as_pair(x, y)
    n = x.size
    if n < 2:
        samples = np.full(n_boot, np.nan)
    else:
        w = bootstrap_weights(n, n_boot, seed)
        sx, sy = _signs(x), _signs(y)
        samples = np.concatenate(
            [_weighted_tau(sx, sy, w[k : k + chunk], variant) for k in range(0, n_boot, chunk)]
        )
    finite = samples[np.isfinite(samples)]
    if finite.size < max(1, min_valid * n_boot):
        lo = hi = float("nan")
    else:
        lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return BootstrapCI(float(lo), float(hi), level, n_boot, int(finite.size), samples)


def _scipy_corr(fn, x, y) -> float:
    x, y = _as_pair(x, y)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y).statistic)


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the (average) ranks; scipy.stats.spearmanr.

    NaN when n < 2 or either input is constant.
    """
    return _scipy_corr(scipy.stats.spearmanr, x, y)


def pearson(x, y) -> float:
    """Pearson's r on the values as given (the scale the measure is reported on, not logs);
    scipy.stats.pearsonr. NaN when n < 2 or either input is constant."""
    return _scipy_corr(scipy.stats.pearsonr, x, y)


# ------------------------------------------------------------------ granulated Kendall


def _fixed_columns(runs: pd.DataFrame, fixed: Sequence[str] | None) -> list[str]:
    if fixed is not None:
        require_columns(runs, fixed)
        return list(fixed)
    out = [c for c in NUISANCE_AXES if c in runs.columns]
    if "study" in runs.columns:
        out.append("study")
    return out


def default_axes(runs: pd.DataFrame) -> list[str]:
    """The axes of Psi: the ``hp_`` columns that vary, without the nuisance ``hp_seed``."""
    return axis_columns(runs, nuisance=False, varying=True)


def axis_groups(
    runs: pd.DataFrame, axes: Sequence[str] | None = None, *, fixed: Sequence[str] | None = None,
) -> dict[str, list[np.ndarray]]:
    """For each axis, the row positions of the groups of runs that differ only in that axis.

    A group is a set of runs equal in every other ``hp_`` column and in the ``fixed`` columns
    (default: ``hp_seed`` and ``study`` where present; NaN is a value like any other). Every
    group is returned, singletons included, so that :func:`granulated_kendall` can count the
    groups an incomplete grid leaves too small.
    """
    runs = runs.reset_index(drop=True)
    axes = default_axes(runs) if axes is None else list(axes)
    require_columns(runs, axes)
    fixed = _fixed_columns(runs, fixed)
    hp = [c for c in runs.columns if str(c).startswith("hp_")]
    out: dict[str, list[np.ndarray]] = {}
    for axis in axes:
        key = [c for c in dict.fromkeys(hp + fixed) if c != axis]
        if key:
            parts = runs.groupby(key, dropna=False, sort=False).indices.values()
        else:
            parts = [np.arange(len(runs))]
        out[axis] = [np.asarray(pos) for pos in parts]
    return out


@dataclass(frozen=True)
class PsiResult:
    """Granulated Kendall coefficient: ``psi`` with its bootstrap interval ``lo``/``hi``,
    ``per_axis`` psi_i, ``n_groups`` (groups used per axis), and a ``note`` that says what
    was left out (empty when nothing was)."""

    psi: float
    lo: float
    hi: float
    per_axis: dict[str, float]
    n_groups: dict[str, int]
    note: str = ""


def granulated_kendall(
    runs: pd.DataFrame, measure: str, target: str, *, axes: Sequence[str] | None = None,
    fixed: Sequence[str] | None = None, variant: str = "b", n_boot: int = 1000,
    level: float = 0.95, seed: int = 0, groups: dict[str, list[np.ndarray]] | None = None,
) -> PsiResult:
    r"""Granulated Kendall coefficient Psi (Jiang et al. 2020, "Granulated Kendall's
    coefficient").

    For axis i with value set Theta_i, and each setting theta_{-i} of all other axes,
    tau is taken over the runs that differ only in axis i; psi_i is their mean:

        psi_i = (1 / m_i) sum_{theta_{-i}} tau( {(mu(theta), g(theta)) : theta_i in Theta_i} ),
        Psi   = (1 / n_axes) sum_i psi_i,

    with m_i the number of such groups. The seed is not an axis (as in Jiang et al., whose
    grid has no seed axis) but it is held fixed inside a group, so each seed gives its own
    groups and psi_i also averages over seeds. Runs are grouped by :func:`axis_groups`.

    An incomplete grid is handled as the statistic allows: groups with fewer than 2 usable
    runs (after dropping runs with a missing measure or target) are skipped, groups whose tau
    is undefined (constant measure or target inside the group) are skipped and counted, and
    an axis with no usable group is left out of the mean. ``n_groups`` and ``note`` say so.

    The interval is a stratified bootstrap over groups: each axis's group taus are resampled
    with replacement, psi_i and Psi recomputed, percentiles at ``level``. It is NaN when an
    axis has fewer than 2 groups (a single group's tau has no spread to resample).
    """
    runs = runs.reset_index(drop=True)
    require_columns(runs, [measure, target])
    if groups is None:
        groups = axis_groups(runs, axes, fixed=fixed)
    elif axes is not None:
        groups = {a: groups[a] for a in axes}
    mu, g = numeric_column(runs, measure), numeric_column(runs, target)
    finite = np.isfinite(mu) & np.isfinite(g)
    taus: dict[str, np.ndarray] = {}
    small: dict[str, int] = {}
    undefined: dict[str, int] = {}
    for axis, parts in groups.items():
        values = runs[axis].to_numpy()
        t, n_small, n_undef = [], 0, 0
        for pos in parts:
            pos = pos[finite[pos]]
            if len(pos) < 2 or pd.unique(values[pos]).size < 2:
                n_small += 1  # no pair of runs that differ in this axis
                continue
            tau = kendall_tau(mu[pos], g[pos], variant=variant)
            if np.isfinite(tau):
                t.append(tau)
            else:
                n_undef += 1  # measure or target constant inside the group
        taus[axis], small[axis], undefined[axis] = np.asarray(t), n_small, n_undef
    per_axis = {a: (float(t.mean()) if t.size else float("nan")) for a, t in taus.items()}
    n_groups = {a: int(t.size) for a, t in taus.items()}
    used = [a for a in per_axis if np.isfinite(per_axis[a])]
    notes = []
    if not groups:
        notes.append("psi: no hyperparameter axis varies")
    elif not used:
        notes.append("psi: no group of >= 2 runs differing only in one axis")
    elif len(used) < len(groups):
        missing = ", ".join(short_name(a) for a in groups if a not in used)
        notes.append(f"psi averages {len(used)} of {len(groups)} axes (no usable group: {missing})")
    for label, counts in (("< 2 runs", small), ("tau undefined", undefined)):
        text = ", ".join(f"{short_name(a)} {k}" for a, k in counts.items() if k)
        if text:
            notes.append(f"psi groups left out ({label}): {text}")
    psi = float(np.mean([per_axis[a] for a in used])) if used else float("nan")
    lo = hi = float("nan")
    if n_boot <= 0 or not used:
        pass  # no interval asked for, or nothing to resample
    elif all(n_groups[a] >= 2 for a in used):
        rng = np.random.default_rng(seed)
        boot = np.zeros(n_boot)
        for a in used:
            t = taus[a]
            boot += t[rng.integers(0, t.size, size=(n_boot, t.size))].mean(axis=1)
        lo, hi = (float(q) for q in np.quantile(boot / len(used), [(1 - level) / 2,
                                                                    (1 + level) / 2]))
    else:
        notes.append("psi CI needs >= 2 groups per axis")
    return PsiResult(psi, lo, hi, per_axis, n_groups, "; ".join(notes))


# ------------------------------------------------------- conditional mutual information


@dataclass(frozen=True)
class CMIResult:
    """Conditional mutual information score: ``value`` = min over conditioning sets,
    ``argmin`` the minimising set (``()`` is the empty set), ``per_set`` every set's
    normalised CMI (NaN where H(V_g | U_S) = 0), ``n_pairs`` the ordered pairs used."""

    value: float
    argmin: tuple[str, ...] | None
    per_set: dict[tuple[str, ...], float]
    n_pairs: int
    note: str = ""


def default_conditioning(runs: pd.DataFrame) -> list[str]:
    """Candidate conditioning variables: the varying non-seed axes, plus ``study`` when a
    combined table mixes studies."""
    out = default_axes(runs)
    if "study" in runs.columns and runs["study"].nunique(dropna=False) >= 2:
        out.append("study")
    return out


def conditional_mutual_information(
    runs: pd.DataFrame, measure: str, target: str, *, axes: Sequence[str] | None = None,
    max_set_size: int = 2,
) -> CMIResult:
    r"""PGDL / Jiang et al. (2020, "Conditional independence test") conditional mutual
    information between the ordering of a measure and the ordering of the gap.

    Over ordered pairs (i, j), i != j, of usable runs:

        V_mu = sign(mu_i - mu_j) in {-1, 0, +1},   V_g = sign(g_i - g_j) in {-1, +1},
        U_S  = (theta_i[S], theta_j[S])   (the values of the axes in S for *both* runs),

        I(V_mu; V_g | U_S) = sum_u p(u) sum_{a,b} p(a,b|u) log[ p(a,b|u) / (p(a|u) p(b|u)) ]
        H(V_g | U_S)       = - sum_u p(u) sum_b p(b|u) log p(b|u)
        I_hat(S)           = I(V_mu; V_g | U_S) / H(V_g | U_S)
        K(mu)              = min_{S : |S| <= max_set_size} I_hat(S)      (S = {} included)

    with probabilities the empirical frequencies over pairs. Pairs whose runs agree on S fall
    in the "diagonal" strata u = (v, v); pairs that differ on S are compared within their
    stratum (v, w), so the hyperparameters in S cannot explain the dependence. K = 1 when the
    measure orders every pair like the gap; it is near 0 for a measure independent of it.
    K is blind to the sign: a measure that orders every pair *against* the gap also scores 1,
    so read it beside tau (which has the sign). The ratio is scale-free (any log base).
    Pairs with a tied gap (V_g = 0) have no order to predict and are dropped. A set S for
    which H(V_g | U_S) = 0 (S alone fixes every pair's gap order) is undefined and skipped.

    Differences from the PGDL scoring program: PGDL conditions only on pairs of distinct
    axes (|S| = 2), averages the per-stratum MI and entropy uniformly over strata (empty
    strata included), and counts i = j pairs; here strata are weighted by p(u) as in the
    definition of conditional mutual information, and the empty set and single axes are
    candidates too, as in Jiang et al.

    Computed by hand with numpy (bincount of (stratum, V_g, V_mu) codes): no library offers
    this score on pairs of runs conditioned on hyperparameter strata.
    """
    runs = runs.reset_index(drop=True)
    require_columns(runs, [measure, target])
    axes = default_conditioning(runs) if axes is None else list(axes)
    require_columns(runs, axes)
    mu, g = numeric_column(runs, measure), numeric_column(runs, target)
    keep = np.isfinite(mu) & np.isfinite(g)
    mu, g, sub = mu[keep], g[keep], runs.loc[keep]
    n = mu.size
    if n < 2:
        return CMIResult(float("nan"), None, {}, 0, "cmi: fewer than 2 usable runs")
    i, j = np.nonzero(~np.eye(n, dtype=bool))            # ordered pairs, (n (n - 1),)
    vg = np.sign(g[i] - g[j])
    untied = vg != 0
    i, j, vg = i[untied], j[untied], vg[untied]
    if i.size == 0:
        return CMIResult(float("nan"), None, {}, 0, "cmi: the target is equal for all runs")
    b = (vg > 0).astype(np.int64)                        # V_g code in {0, 1}
    a = (np.sign(mu[i] - mu[j]) + 1).astype(np.int64)   # V_mu code in {0, 1, 2}
    # Per axis, the pair code theta_i * L + theta_j of its factorised values (L levels).
    pair_code = {}
    for ax in axes:
        codes, levels = pd.factorize(sub[ax], use_na_sentinel=False)
        pair_code[ax] = (codes[i].astype(np.int64) * len(levels) + codes[j], len(levels) ** 2)
    per_set: dict[tuple[str, ...], float] = {}
    for size in range(max_set_size + 1):
        for subset in itertools.combinations(axes, size):
            stratum = np.zeros(i.size, dtype=np.int64)
            for ax in subset:
                code, span = pair_code[ax]
                stratum = stratum * span + code
            _, u = np.unique(stratum, return_inverse=True)
            per_set[subset] = _normalised_cmi(u.ravel(), b, a)
    finite = {s: v for s, v in per_set.items() if np.isfinite(v)}
    if not finite:
        return CMIResult(float("nan"), None, per_set, int(i.size),
                         "cmi: every conditioning set fixes the gap order (H(V_g|U_S) = 0)")
    best = min(finite, key=finite.get)
    note = ""
    if len(finite) < len(per_set):
        note = f"cmi: {len(per_set) - len(finite)} conditioning set(s) skipped (H(V_g|U_S) = 0)"
    return CMIResult(float(finite[best]), best, per_set, int(i.size), note)


def _normalised_cmi(u: np.ndarray, b: np.ndarray, a: np.ndarray) -> float:
    """I(A; B | U) / H(B | U) from integer codes u (strata), b in {0,1}, a in {0,1,2}."""
    k = int(u.max()) + 1
    counts = np.bincount(u * 6 + b * 3 + a, minlength=k * 6).reshape(k, 2, 3)
    p = counts / counts.sum()                      # p(u, b, a)
    p_u = p.sum(axis=(1, 2))                       # (k,)
    p_ub = p.sum(axis=2)                           # (k, 2)
    p_ua = p.sum(axis=1)                           # (k, 3)
    nz = p > 0
    ratio = np.ones_like(p)
    # p(u,b,a) p(u) / (p(u,b) p(u,a)) = p(a,b|u) / (p(a|u) p(b|u)); only where p(u,b,a) > 0.
    ratio[nz] = (p * p_u[:, None, None])[nz] / (p_ub[:, :, None] * p_ua[:, None, :])[nz]
    mi = float(np.sum(p[nz] * np.log(ratio[nz])))
    nzb = p_ub > 0
    h = float(-np.sum(p_ub[nzb] * np.log((p_ub / p_u[:, None])[nzb])))
    if h <= _H_EPS:
        return float("nan")
    return min(1.0, max(0.0, mi / h))


# -------------------------------------------------------------------- the whole table

STATS_PER_TARGET = ("tau", "tau_lo", "tau_hi", "spearman", "pearson", "psi", "psi_lo",
                    "psi_hi", "cmi", "cmi_set", "n", "note")


def correlation_table(
    runs: pd.DataFrame, *, targets: Sequence[str] = DEFAULT_TARGETS,
    measures: Sequence[str] | None = None, n_boot: int = 1000, level: float = 0.95,
    seed: int = 0, variant: str = "b", require_converged: bool = True,
    max_set_size: int = 2, cmi: bool = True, controls: bool = True,
) -> pd.DataFrame:
    r"""Every statistic of every measure against every target, one row per measure.

    With ``controls`` (and ``measures`` left at None), the controls of
    :func:`~convflat.analysis.controls.add_controls` (stopped training loss, epochs,
    parameter count, numeric grid hyperparameters) follow the measures as rows
    ``control:<name>``; a grid hyperparameter's Psi is left NaN (on its own axis it is
    +-1 by construction, on the others undefined).

    Runs whose ``status`` is not ``ok`` or (``require_converged``) that did not converge are
    left out first (:func:`~convflat.analysis.runs.select_runs`); then, per measure and
    target, the runs whose value is missing or non-finite.

    Index: the measure name without ``m_`` (name ``measure``). Columns: ``ours`` (bool),
    ``kind`` (``ours`` / ``baseline`` / ``control``);
    for each target ``t``: ``t.tau`` (tau_b, or tau_a with ``variant="a"``), ``t.tau_lo``,
    ``t.tau_hi`` (percentile bootstrap over runs, ``n_boot`` resamples, seeded with ``seed``
    and shared by all measures), ``t.spearman``, ``t.pearson``, ``t.psi``, ``t.psi_lo``,
    ``t.psi_hi``, ``t.psi[<axis>]`` and ``t.psi_groups[<axis>]`` (groups used) for each
    varying non-seed axis, ``t.cmi`` and ``t.cmi_set`` (the minimising conditioning set,
    ``+``-joined, ``{}`` for the empty set), ``t.n`` (runs used) and ``t.note`` (why a value
    is NaN or what was left out; empty when nothing); then ``n_runs`` and ``n_excluded``,
    and ``n_boot``, ``level``, ``seed``, ``variant`` (how tau and its CI were computed; the
    same in every row, so that the CSV keeps them and the table legend can state them).
    ``table.attrs`` carries the same counts, the exclusion reasons, targets, axes, n_boot,
    level, seed and variant.

    Raises ValueError when a target or measure column is missing or not numeric, when no
    ``m_`` column exists, or when no run is usable. One usable run gives NaN with a note.
    """
    require_columns(runs, list(targets))
    if measures is None:
        measures = measure_columns(runs)
        if not measures:
            raise ValueError("runs table has no measure column (names start with 'm_')")
        if controls:
            runs = add_controls(runs)
            measures += control_columns(runs)
    else:
        measures = list(measures)
        require_columns(runs, measures)
    for col in list(targets) + measures:
        numeric_column(runs, col)  # raises with the column's name
    selection = select_runs(runs, require_converged=require_converged)
    if selection.n_runs == 0:
        raise ValueError(f"no usable runs: {selection.summary()}")
    use = selection.runs
    axes = default_axes(use)
    cond = default_conditioning(use)
    groups = axis_groups(use, axes)
    rows = []
    for m in measures:
        control = is_control(m)
        row: dict[str, object] = {
            "measure": control_label(m) if control else short_name(m), "ours": is_ours(m),
            "kind": "control" if control else "ours" if is_ours(m) else "baseline"}
        mu = numeric_column(use, m)
        for t in targets:
            row.update(_one_pair(use, m, t, mu, numeric_column(use, t), axes, cond, groups,
                                 n_boot=n_boot, level=level, seed=seed, variant=variant,
                                 max_set_size=max_set_size, cmi=cmi,
                                 psi=not m.startswith(CONTROL_PREFIX + AXIS_PREFIX)))
        row["n_runs"], row["n_excluded"] = selection.n_runs, selection.n_excluded
        # How the CIs were made, in the table itself so that its CSV keeps them.
        row.update(n_boot=n_boot, level=level, seed=seed, variant=variant)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("measure")
    table.attrs.update({
        "n_runs": selection.n_runs, "n_excluded": selection.n_excluded,
        "excluded": dict(selection.excluded), "selection": selection.summary(),
        "targets": list(targets), "axes": list(axes), "conditioning": list(cond),
        "n_boot": n_boot, "level": level, "seed": seed, "variant": variant,
    })
    return table


def _one_pair(use, m, t, mu, g, axes, cond, groups, *, n_boot, level, seed, variant,
              max_set_size, cmi, psi=True) -> dict[str, object]:
    """The statistics of measure column ``m`` against target column ``t`` (prefixed ``t.``)."""
    keep = np.isfinite(mu) & np.isfinite(g)
    x, y = mu[keep], g[keep]
    n = int(keep.sum())
    notes = []
    if n < keep.size:
        notes.append(f"{keep.size - n} run(s) without a finite measure or target left out")
    degenerate = True  # then psi and cmi notes would only repeat the reason
    if n < 2:
        notes.append(f"{n} usable run(s): correlations need >= 2")
    elif np.ptp(x) == 0:
        notes.append("measure is constant: correlations undefined")
    elif np.ptp(y) == 0:
        notes.append("target is constant: correlations undefined")
    else:
        degenerate = False
    tau = kendall_tau(x, y, variant=variant)
    ci = bootstrap_kendall(x, y, n_boot=n_boot, level=level, seed=seed, variant=variant)
    if np.isfinite(tau) and not np.isfinite(ci.lo):
        notes.append(f"tau CI: only {ci.n_valid} of {n_boot} resamples defined")
    if psi:
        psi = granulated_kendall(use, m, t, variant=variant, n_boot=n_boot, level=level,
                                 seed=seed, groups=groups)
    else:
        nan = float("nan")
        psi = PsiResult(nan, nan, nan, {}, {}, "psi: a grid hyperparameter, not defined")
    if psi.note and not degenerate:
        notes.append(psi.note)
    out: dict[str, object] = {
        f"{t}.tau": tau, f"{t}.tau_lo": ci.lo, f"{t}.tau_hi": ci.hi,
        f"{t}.spearman": spearman(x, y), f"{t}.pearson": pearson(x, y),
        f"{t}.psi": psi.psi, f"{t}.psi_lo": psi.lo, f"{t}.psi_hi": psi.hi,
    }
    for a in axes:
        out[f"{t}.psi[{short_name(a)}]"] = psi.per_axis.get(a, float("nan"))
    for a in axes:
        out[f"{t}.psi_groups[{short_name(a)}]"] = psi.n_groups.get(a, 0)
    if cmi:
        res = conditional_mutual_information(use, m, t, axes=cond, max_set_size=max_set_size)
        if res.note and not degenerate:
            notes.append(res.note)
        out[f"{t}.cmi"] = res.value
        out[f"{t}.cmi_set"] = (
            "" if res.argmin is None else ("+".join(map(short_name, res.argmin)) or "{}")
        )
    out[f"{t}.n"] = n
    out[f"{t}.note"] = "; ".join(notes)
    return out


# ------------------------------------------------ spread of the gap, and convergence


@dataclass(frozen=True)
class SpreadRatio:
    """Between- over within-configuration spread of a target (see :func:`spread_ratio`).

    ``ratio`` = ``between`` / ``within``; ``n_configs`` configurations with a finite target,
    ``n_replicated`` of them with >= 2 runs (the ones ``within`` is pooled over), ``n_runs``
    runs used, ``dof`` = sum over configurations of (runs - 1), ``axes`` the columns that
    define a configuration, ``note`` why a value is NaN or infinite (empty otherwise).
    """

    target: str
    ratio: float
    between: float
    within: float
    n_configs: int
    n_replicated: int
    n_runs: int
    dof: int
    axes: tuple[str, ...]
    note: str = ""

    def line(self, digits: int = 2) -> str:
        """One sentence, e.g. ``Spread of loss_gap: between / within configurations = 4.1
        (sd of 16 configuration means 0.031, pooled seed sd 0.0076; 32 runs).``"""
        if not np.isfinite(self.ratio) and not np.isinf(self.ratio):
            return f"Spread of {self.target}: between / within configurations undefined " \
                   f"({self.note})."
        text = (f"Spread of {self.target}: between / within configurations = "
                f"{self.ratio:.{digits}f} (sd of {self.n_configs} configuration means "
                f"{self.between:.2g}, pooled within-configuration sd {self.within:.2g} over "
                f"{self.n_replicated} configurations with >= 2 runs; {self.n_runs} runs)")
        return text + (f"; {self.note}." if self.note else ".")


def _config_columns(runs: pd.DataFrame) -> list[str]:
    """The columns that define a configuration: every ``hp_`` column except the nuisance
    axes (the seed), plus ``study`` in a combined table."""
    cols = [c for c in runs.columns
            if str(c).startswith(AXIS_PREFIX) and c not in NUISANCE_AXES]
    if "study" in runs.columns:
        cols.append("study")
    return cols


def config_groups(runs: pd.DataFrame) -> list[np.ndarray]:
    """Row positions of each configuration of ``runs``: the runs that differ only in the
    seed (:func:`_config_columns`); one group when no other axis exists."""
    axes = _config_columns(runs)
    if axes:
        return [np.asarray(p) for p in runs.groupby(axes, dropna=False, sort=False)
                .indices.values()]
    return [np.arange(len(runs))] if len(runs) else []


def pooled_within_sd(y: np.ndarray, parts: Sequence[np.ndarray]) -> tuple[float, int]:
    """Pooled within-group sd of ``y`` over the groups ``parts`` (positions into ``y``)
    and its degrees of freedom sum(n_c - 1); NaN when no group has >= 2 values."""
    dof = int(sum(len(p) - 1 for p in parts))
    if dof <= 0:
        return float("nan"), dof
    ss = float(sum(((y[p] - y[p].mean()) ** 2).sum() for p in parts))
    return float(np.sqrt(ss / dof)), dof


def spread_ratio(runs: pd.DataFrame, *, target: str = "loss_gap",
                 require_converged: bool = True) -> SpreadRatio:
    r"""How much more a target varies across configurations than across seeds.

    A *configuration* is a unique combination of the ``hp_`` columns other than ``hp_seed``
    (and of ``study`` when the table has it); runs of one configuration differ only in the
    seed. Only usable runs count (:func:`~convflat.analysis.runs.select_runs`: status ``ok``
    and, with ``require_converged``, converged), and of those only the ones with a finite
    target. With configurations c = 1..k, runs y_{c,1..n_c} and means m_c:

        between = sd(m_1, ..., m_k)          (sample sd, ddof = 1, each configuration once)
        within  = sqrt( sum_c sum_i (y_ci - m_c)^2 / sum_c (n_c - 1) )
                                              (pooled sd; configurations with n_c = 1 add 0)
        ratio   = between / within

    Without any real effect of the hyperparameters, m_c scatters with sd ~ within /
    sqrt(n_seeds), so the ratio is ~ 1 / sqrt(n_seeds); a ratio well above 1 means the grid
    moves the target far more than the seed does.

    NaN with a ``note`` when fewer than 2 configurations exist (no ``between``) or no
    configuration has >= 2 runs (no ``within``); ``inf`` when within = 0 < between. Raises
    ValueError when ``target`` is missing or not numeric, or no run is usable.
    """
    require_columns(runs, [target])
    numeric_column(runs, target)
    selection = select_runs(runs, require_converged=require_converged)
    if selection.n_runs == 0:
        raise ValueError(f"spread ratio of {target!r}: no usable runs ({selection.summary()})")
    use = selection.runs
    y = numeric_column(use, target)
    keep = np.isfinite(y)
    use, y = use.loc[keep].reset_index(drop=True), y[keep]
    axes = _config_columns(use)
    parts = config_groups(use)
    means = np.array([y[p].mean() for p in parts])
    sizes = np.array([p.size for p in parts])
    within, dof = pooled_within_sd(y, parts)
    notes = []
    if len(parts) >= 2:
        between = float(np.std(means, ddof=1))
    else:
        between = float("nan")
        notes.append(f"{len(parts)} configuration(s): the between-configuration sd needs >= 2")
    if dof <= 0:
        notes.append("no configuration has >= 2 runs (seeds): the within-configuration sd "
                     "is undefined")
    if np.isfinite(between) and np.isfinite(within):
        if within > 0:
            ratio = between / within
        elif between > 0:
            ratio = float("inf")
            notes.append("every configuration's runs have the same value (within sd = 0)")
        else:
            ratio = float("nan")
            notes.append(f"{target} is constant")
    else:
        ratio = float("nan")
    if keep.size > keep.sum():
        notes.append(f"{int(keep.size - keep.sum())} run(s) without a finite {target} left out")
    return SpreadRatio(target, float(ratio), between, within, len(parts),
                       int((sizes >= 2).sum()), len(use), dof, tuple(axes),
                       "; ".join(notes))


@dataclass(frozen=True)
class ConvergenceSummary:
    """Did the runs reach the training-loss target, and at similar losses?

    ``n_total`` runs; ``n_converged`` with status ``ok`` that reached the target (``share``
    = n_converged / n_total); ``excluded`` the reasons and counts of
    :func:`~convflat.analysis.runs.select_runs`. Over the included runs: ``loss_min`` and
    ``loss_max`` of ``loss_column``, ``loss_ratio`` = max / min, ``within_factor`` =
    ``loss_ratio <= max_loss_ratio``; ``lr_min`` / ``lr_max`` of ``lr_column`` (None when
    the table has no such column). ``warnings`` are the failed checks in words.
    ``has_target``: whether the study trains to a training-loss target (``loss_target``);
    without one the summary never says that runs "reached the target".
    """

    n_total: int
    n_converged: int
    share: float
    excluded: dict[str, int]
    loss_column: str
    loss_min: float
    loss_max: float
    loss_ratio: float
    within_factor: bool
    max_loss_ratio: float
    min_share: float
    lr_column: str | None
    lr_min: float | None
    lr_max: float | None
    warnings: tuple[str, ...] = ()
    has_target: bool = True

    def markdown(self) -> str:
        """A Markdown fragment: one line of figures, then each warning in bold."""
        if self.has_target:
            text = (f"Convergence: {self.n_converged} of {self.n_total} runs "
                    f"({self.share:.0%}) reached the training-loss target")
        else:
            text = (f"No training-loss target: this study sets no `train.stop_loss`, so its "
                    f"nets are compared at unmatched training losses; {self.n_converged} of "
                    f"{self.n_total} runs ({self.share:.0%}) ended sane and are used")
        if self.excluded:
            text += " (excluded: " + "; ".join(f"{k}: {v}" for k, v in
                                               self.excluded.items()) + ")"
        if np.isfinite(self.loss_min):
            text += (f"; stopped {self.loss_column} of the included runs "
                     f"{self.loss_min:.3g}-{self.loss_max:.3g} (max/min "
                     f"{self.loss_ratio:.2f}, limit {self.max_loss_ratio:g})")
        if self.lr_column is not None and self.lr_min is not None:
            lr = (f"{self.lr_min:.3g}" if self.lr_min == self.lr_max
                  else f"{self.lr_min:.3g}-{self.lr_max:.3g}")
            text += f"; learning rate at the stop {lr}"
        lines = [text + "."]
        lines += [f"**Warning: {w}.**" for w in self.warnings]
        return "\n\n".join(lines) + "\n"


def convergence_summary(
    runs: pd.DataFrame, *, loss_column: str = "train_loss", lr_column: str = "lr_at_stop",
    min_share: float = 0.8, max_loss_ratio: float = 2.0,
) -> ConvergenceSummary:
    """Account for the matched-loss protocol: how many runs converged, and whether the
    included runs stopped at comparable training losses.

    ``share`` = (runs with status ``ok`` and ``converged``) / (all runs); a diverged or
    failed run counts as not converged. The included runs are those of
    :func:`~convflat.analysis.runs.select_runs` (the ones the correlations use). Their
    ``loss_column`` (default ``train_loss``: the training cross-entropy at the stop) must lie
    within a factor ``max_loss_ratio`` of each other: max / min <= ``max_loss_ratio``
    (non-finite values are ignored; a non-positive minimum gives an infinite ratio). When
    ``lr_column`` is in the table its range over the included runs is reported; when it is
    not, ``lr_column`` is None. Warnings (in :meth:`ConvergenceSummary.markdown`, bold):
    share < ``min_share``, ratio > ``max_loss_ratio``, no run included.

    Raises ValueError when ``status``, ``converged`` or ``loss_column`` is missing, or the
    table is empty.
    """
    require_columns(runs, ["status", "converged", loss_column])
    if len(runs) == 0:
        raise ValueError("convergence summary: the runs table has no rows")
    numeric_column(runs, loss_column)
    sel = select_runs(runs, require_converged=True)
    n_total, n_conv = len(runs), sel.n_runs
    share = n_conv / n_total
    warn = []
    has_target = _has_loss_target(runs)
    if share < min_share:
        warn.append(f"only {n_conv} of {n_total} runs ({share:.0%}) "
                    + ("reached the training-loss target" if has_target else "are usable")
                    + f", under {min_share:.0%}")
    loss = numeric_column(sel.runs, loss_column)
    loss = loss[np.isfinite(loss)]
    if loss.size:
        lo, hi = float(loss.min()), float(loss.max())
        ratio = hi / lo if lo > 0 else float("inf")
    else:
        lo = hi = ratio = float("nan")
        warn.append(f"no included run has a finite {loss_column}")
    within = bool(np.isfinite(ratio) and ratio <= max_loss_ratio)
    if loss.size and not within:
        warn.append(f"the stopped {loss_column} of the included runs spans {lo:.3g}-{hi:.3g}, "
                    f"a factor {ratio:.3g} > {max_loss_ratio:g}: the nets are not compared at "
                    "a matched training loss")
    if not has_target:
        warn.append("the study has no training-loss target: differences in the measures may "
                    "only restate how far each net trained")
    lr_col: str | None = lr_column if lr_column in runs.columns else None
    lr_min = lr_max = None
    if lr_col is not None:
        lr = numeric_column(sel.runs, lr_col)
        lr = lr[np.isfinite(lr)]
        if lr.size:
            lr_min, lr_max = float(lr.min()), float(lr.max())
    return ConvergenceSummary(n_total, n_conv, share, dict(sel.excluded), loss_column, lo, hi,
                              ratio, within, max_loss_ratio, min_share, lr_col, lr_min, lr_max,
                              tuple(warn), has_target)


def _has_loss_target(runs: pd.DataFrame) -> bool:
    """Whether the runs trained to a training-loss target: the ``loss_target`` column has a
    finite value (a table without the column, written before it existed, is assumed to)."""
    if "loss_target" not in runs.columns:
        return True
    return bool(np.isfinite(pd.to_numeric(runs["loss_target"], errors="coerce")
                            .to_numpy(float)).any())
