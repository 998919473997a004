"""The answer of a study in one file: ``headline.md``.

For each target (default: the loss gap and the accuracy gap) the headline sets our two
measures (``conv_trace`` and ``conv_relative_flatness``, :data:`~convflat.analysis.runs.OURS`)
against the best baselines, ranked by Kendall's tau *as signed*: a good complexity measure
correlates positively with the gap, so the baseline with the largest tau is the best one and
a strongly negative tau ranks last. The first paragraph answers the question in words,
computed from the numbers; then one table per target, the spread of the gaps between and
within configurations (:func:`~convflat.analysis.stats.spread_ratio`), and the convergence
accounting (:func:`~convflat.analysis.stats.convergence_summary`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from convflat.analysis.runs import OURS, read_runs, select_runs
from convflat.analysis.stats import convergence_summary, spread_ratio
from convflat.analysis.tables import read_correlation_table
from convflat.io import atomic_write_text

__all__ = [
    "HEADLINE_TARGETS",
    "TargetVerdict",
    "headline_markdown",
    "headline_rows",
    "headline_verdicts",
    "write_headline",
]

HEADLINE_TARGETS: tuple[str, ...] = ("loss_gap", "acc_gap")

_WORDS = {"loss_gap": "loss gap", "acc_gap": "accuracy gap", "test_error": "test error"}


def _words(target: str) -> str:
    return _WORDS.get(target, target)


def _as_table(table) -> pd.DataFrame:
    return table if isinstance(table, pd.DataFrame) else read_correlation_table(table)


def _as_runs(runs) -> pd.DataFrame:
    return runs if isinstance(runs, pd.DataFrame) else read_runs(runs)


def _ours_mask(table: pd.DataFrame) -> np.ndarray:
    if "ours" in table.columns:
        return np.array([str(v).strip().lower() in ("true", "1", "1.0")
                         for v in table["ours"]])
    return np.array(["m_" + str(m) in OURS for m in table.index])


def _check_target(table: pd.DataFrame, target: str) -> None:
    need = [f"{target}.{s}" for s in ("tau", "tau_lo", "tau_hi", "psi", "pearson", "n")]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"correlation table lacks column(s) {missing} for target {target!r}; "
                         f"its targets are {[c[:-4] for c in table.columns if c.endswith('.tau')]}")


def _n_total(table: pd.DataFrame) -> np.ndarray:
    if "n_runs" in table.columns and "n_excluded" in table.columns:
        return (table["n_runs"].to_numpy(float) + table["n_excluded"].to_numpy(float))
    raise ValueError("correlation table lacks the columns n_runs and n_excluded")


def headline_rows(table, target: str, *, n_baselines: int = 3) -> pd.DataFrame:
    """The rows of the headline for one target: every measure of ours in the table and the
    ``n_baselines`` baselines with the largest Kendall tau (signed: a good measure correlates
    positively), in the order of their rank.

    ``table`` is a correlation table (:func:`~convflat.analysis.stats.correlation_table`) or
    the path of its CSV. Columns: ``measure``, ``ours``, ``rank`` (1 = largest tau among all
    measures of the table; measures with an undefined tau rank last, in table order),
    ``n_measures``, ``tau``, ``tau_lo``, ``tau_hi``, ``psi``, ``pearson``, ``n_used`` (runs
    with a finite measure and target) and ``n_excluded`` (the other runs of the table).
    """
    table = _as_table(table)
    _check_target(table, target)
    if n_baselines < 0:
        raise ValueError(f"n_baselines must be >= 0, got {n_baselines}")
    tau = table[f"{target}.tau"].to_numpy(float)
    order = sorted(range(len(tau)), key=lambda k: (not np.isfinite(tau[k]),
                                                   -tau[k] if np.isfinite(tau[k]) else 0.0, k))
    finite = tau[np.isfinite(tau)]
    # competition ranking: 1 + the number of measures with a larger tau (equal tau, equal
    # rank); an undefined tau ranks after every defined one
    rank = np.array([1 + int((finite > v).sum()) if np.isfinite(v) else finite.size + 1
                     for v in tau], dtype=int)
    ours = _ours_mask(table)
    baselines = [k for k in order if not ours[k]][:n_baselines]  # ties: table order
    keep = sorted([k for k in range(len(tau)) if ours[k]] + baselines, key=order.index)
    used = table[f"{target}.n"].to_numpy(float)
    total = _n_total(table)
    rows = pd.DataFrame({
        "measure": [str(table.index[k]) for k in keep],
        "ours": [bool(ours[k]) for k in keep],
        "rank": [int(rank[k]) for k in keep],
        "n_measures": len(tau),
        "tau": tau[keep],
        "tau_lo": table[f"{target}.tau_lo"].to_numpy(float)[keep],
        "tau_hi": table[f"{target}.tau_hi"].to_numpy(float)[keep],
        "psi": table[f"{target}.psi"].to_numpy(float)[keep],
        "pearson": table[f"{target}.pearson"].to_numpy(float)[keep],
        "n_used": used[keep].astype(int),
        "n_excluded": (total[keep] - used[keep]).astype(int),
    })
    return rows


@dataclass(frozen=True)
class TargetVerdict:
    """Who ranks best on one target. ``outcome``: ``"wins"`` (our best tau is larger than
    every baseline's), ``"ties"``, ``"loses"``, or ``"undecided"`` (ours or every baseline
    undefined or absent). ``ours`` and ``baseline`` are the best measure of each side (None
    when absent), with their tau and CI; ``overlap``: whether the two CIs overlap (None when
    one is undefined); ``any_positive``: whether some measure has tau > 0."""

    target: str
    outcome: str
    ours: str | None
    ours_tau: float
    ours_ci: tuple[float, float]
    baseline: str | None
    baseline_tau: float
    baseline_ci: tuple[float, float]
    overlap: bool | None
    any_positive: bool


def _best(table: pd.DataFrame, target: str, mask: np.ndarray):
    tau = table[f"{target}.tau"].to_numpy(float)
    idx = [k for k in range(len(tau)) if mask[k] and np.isfinite(tau[k])]
    if not idx:
        return None, float("nan"), (float("nan"), float("nan"))
    k = max(idx, key=lambda i: (tau[i], -i))  # first in table order among equals
    lo = float(table[f"{target}.tau_lo"].iloc[k])
    hi = float(table[f"{target}.tau_hi"].iloc[k])
    return str(table.index[k]), float(tau[k]), (lo, hi)


def headline_verdicts(table, targets: Sequence[str] = HEADLINE_TARGETS) -> list[TargetVerdict]:
    """For each target, our best measure against the best baseline by Kendall tau."""
    table = _as_table(table)
    ours = _ours_mask(table)
    out = []
    for t in targets:
        _check_target(table, t)
        o, o_tau, o_ci = _best(table, t, ours)
        b, b_tau, b_ci = _best(table, t, ~ours)
        if o is None or b is None:
            outcome = "undecided"
        else:
            outcome = "wins" if o_tau > b_tau else "ties" if o_tau == b_tau else "loses"
        overlap = None
        if all(np.isfinite(v) for v in (*o_ci, *b_ci)):
            overlap = bool(o_ci[0] <= b_ci[1] and b_ci[0] <= o_ci[1])
        tau = table[f"{t}.tau"].to_numpy(float)
        out.append(TargetVerdict(t, outcome, o, o_tau, o_ci, b, b_tau, b_ci, overlap,
                                 bool(np.any(tau[np.isfinite(tau)] > 0))))
    return out


def _num(v: float, digits: int) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    r = round(float(v), digits)
    return f"{(0.0 if r == 0 else r):.{digits}f}"


def _tau_text(name: str, tau: float, ci: tuple[float, float], digits: int) -> str:
    text = f"{name} (τ = {_num(tau, digits)}"
    if all(np.isfinite(ci)):
        text += f", CI [{_num(ci[0], digits)}, {_num(ci[1], digits)}]"
    return text + ")"


def _summary(verdicts: Sequence[TargetVerdict], digits: int) -> str:
    """The answer in words: first an overall sentence, then one sentence per target."""
    wins = [v for v in verdicts if v.outcome == "wins"]
    losses = [v for v in verdicts if v.outcome == "loses"]
    other = [v for v in verdicts if v.outcome not in ("wins", "loses")]

    def names(vs: Sequence[TargetVerdict]) -> str:
        return " and ".join(f"the {_words(v.target)}" for v in vs)

    if wins and not losses and not other:
        first = (f"Ours wins: one of our conv-layer measures ranks the runs better than every "
                 f"baseline on {names(wins)} (Kendall's τ).")
    elif losses and not wins and not other:
        first = (f"Ours loses: a baseline ranks the runs better than both of our conv-layer "
                 f"measures on {names(losses)} (Kendall's τ).")
    else:
        parts = []
        if wins:
            parts.append(f"rank the runs best on {names(wins)}")
        if losses:
            parts.append(f"lose to a baseline on {names(losses)}")
        ties = [v for v in other if v.outcome == "ties"]
        if ties:
            parts.append(f"tie with the best baseline on {names(ties)}")
        undecided = [v for v in other if v.outcome != "ties"]
        if undecided:
            parts.append(f"cannot be compared with the baselines on {names(undecided)}")
        first = "Our conv-layer measures " + ", and ".join(parts) + " (Kendall's τ)."
    sentences = [first]
    for v in verdicts:
        on = f"On the {_words(v.target)}"
        ours = _tau_text(f"our {v.ours}", v.ours_tau, v.ours_ci, digits) if v.ours else ""
        base = (_tau_text(f"the baseline {v.baseline}", v.baseline_tau, v.baseline_ci, digits)
                if v.baseline else "")
        if v.outcome == "wins":
            s = f"{on}, {ours} ranks best, ahead of {base}"
        elif v.outcome == "loses":
            s = (f"{on}, {base} ranks best; our best measure is "
                 + _tau_text(str(v.ours), v.ours_tau, v.ours_ci, digits))
        elif v.outcome == "ties":
            s = f"{on}, {ours} ties with {base}"
        elif v.ours is None and v.baseline is None:
            s = f"{on}, no measure has a defined τ"
        elif v.ours is None:
            s = f"{on}, our measures have no defined τ; the best baseline is {base}"
        else:
            s = f"{on}, no baseline has a defined τ; ours is {ours}"
        if v.overlap is True and v.outcome in ("wins", "loses"):
            s += "; the two confidence intervals overlap"
        if not v.any_positive and (v.ours or v.baseline):
            s += f"; no measure correlates positively with the {_words(v.target)}"
        sentences.append(s + ".")
    return " ".join(sentences)


def headline_markdown(
    table, runs, *, targets: Sequence[str] = HEADLINE_TARGETS, n_baselines: int = 3,
    title: str | None = None, digits: int = 2, require_converged: bool = True,
    loss_column: str = "train_loss", lr_column: str = "lr_at_stop",
    footer: str | None = None,
) -> str:
    """The headline of a study as Markdown (see the module docstring).

    ``table``: the study's correlation table (DataFrame or ``correlation.csv``); ``runs``:
    its runs table (DataFrame or ``runs.csv``), for the runs used and excluded, the spread
    ratio of each target and the convergence accounting (``loss_column``, ``lr_column`` as
    in :func:`~convflat.analysis.stats.convergence_summary`). ``footer``: an extra last line
    (e.g. the command and code version that made the file).
    """
    table, runs = _as_table(table), _as_runs(runs)
    targets = list(targets)
    if not targets:
        raise ValueError("targets must name at least one target")
    verdicts = headline_verdicts(table, targets)
    out = [f"# {title}" if title else "# Headline", "", _summary(verdicts, digits), ""]
    level = table.attrs.get("level")
    if level is None and "level" in table.columns and len(table):
        level = table["level"].iloc[0]
    ci_head = f"τ [{float(level):.0%} CI]" if level is not None and pd.notna(level) else "τ [CI]"
    n_measures = len(table)
    for t in targets:
        rows = headline_rows(table, t, n_baselines=n_baselines)
        out += [f"## {_words(t)} (`{t}`)", "",
                f"| rank | measure | {ci_head} | Ψ | r | runs used | excluded |",
                "|---:|:---|---:|---:|---:|---:|---:|"]
        for r in rows.itertuples(index=False):
            name = str(r.measure).replace("|", r"\|") + (" (ours)" if r.ours else "")
            if r.ours:
                name = f"**{name}**"
            tau = _num(r.tau, digits)
            if np.isfinite(r.tau_lo) and np.isfinite(r.tau_hi):
                tau += f" [{_num(r.tau_lo, digits)}, {_num(r.tau_hi, digits)}]"
            out.append(f"| {r.rank} of {r.n_measures} | {name} | {tau} | {_num(r.psi, digits)}"
                       f" | {_num(r.pearson, digits)} | {r.n_used} | {r.n_excluded} |")
        out.append("")
    sel = select_runs(runs, require_converged=require_converged)
    out.append(f"Runs: {sel.summary()}.")
    out.append("")
    for t in targets:
        if t in runs.columns:
            out.append(spread_ratio(runs, target=t, require_converged=require_converged)
                       .line(digits))
            out.append("")
    out.append(convergence_summary(runs, loss_column=loss_column, lr_column=lr_column)
               .markdown().rstrip())
    out.append("")
    n_boot = table.attrs.get("n_boot", table["n_boot"].iloc[0] if "n_boot" in table else None)
    seed = table.attrs.get("seed", table["seed"].iloc[0] if "seed" in table else None)
    boot = (f" ({int(n_boot)} resamples, seed {int(seed)})"
            if n_boot is not None and seed is not None and pd.notna(n_boot) and pd.notna(seed)
            else "")
    out.append(
        f"τ: Kendall's rank correlation of the measure with the target, with a percentile "
        f"bootstrap CI over runs{boot}; Ψ: granulated Kendall coefficient (Jiang et al. 2020); "
        f"r: Pearson. A good measure correlates positively. Rows: our measures and the "
        f"{n_baselines} baselines with the largest τ, of {n_measures} measures; rank 1 = "
        f"largest τ. Runs used: runs with a finite measure and target.")
    if footer:
        out += ["", footer]
    return "\n".join(out).rstrip() + "\n"


def write_headline(table, runs, path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`headline_markdown` atomically to ``path`` (e.g.
    ``results/tables/<study>/headline.md``) and return the path."""
    return atomic_write_text(path, headline_markdown(table, runs, **kwargs))
