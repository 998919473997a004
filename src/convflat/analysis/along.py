r"""When does flatness predict? Each tracked measure at common training-loss levels.

``train.json`` records, after every epoch, the training loss and the tracked measures (the
exact conv trace and relative flatness, and the cheap baselines where the run tracks them).
Nets stopped at a loss of 0.1 and at 0.01 are different objects, so a measure's Kendall tau
with the final generalization gap is a function of *where along training* it is read.

Levels. For a study, the levels are ``n_levels`` training losses log-spaced from the largest
loss that every run passes through (the smallest first-epoch loss over the runs) down to the
study's target (the smallest ``loss_target`` of the runs, or, without one, the largest final
loss, which every run reaches).

Reading a run at a level. The loss recorded per epoch (``train_loss_eval``, the eval-mode
loss on the whole training split, where the run stops on it; otherwise ``loss``, the mean
minibatch loss of the epoch) is followed until it first falls to the level or below, at
epoch k. The measure is interpolated between epochs k - 1 and k (or, for a measure tracked
only every few epochs late in training, the nearest epochs before and from k that have it)
linearly in (log loss, log measure), i.e. as a power law between the two epochs:

    t = (log L - log l_{k-1}) / (log l_k - log l_{k-1}),
    log m(L) = log m_{k-1} + t (log m_k - log m_{k-1}),

linearly in the measure where one of the two values is not positive. A level the run
never reaches (or reached before its first epoch ended) is NaN and marked; a run missing
the measure at either epoch gives NaN too.

A correlation at an earlier loss is a statement about the measure *at that point of
training* and the gap *at the end*; it is not a causal claim about flatness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from convflat.analysis.paired import paired_tau_difference
from convflat.analysis.runs import OURS, finite_or_nan, numeric_column
from convflat.analysis.stats import bootstrap_kendall, kendall_tau

__all__ = ["COLUMNS", "LOSS_KEYS", "LossLevels", "TooFewRuns", "along_markdown", "along_sentence",
           "loss_levels", "subset_note", "tau_along_training", "tracked_keys", "values_at_levels",
           "write_tau_along_training"]

#: The per-epoch loss a history is read by, first present wins.
LOSS_KEYS = ("train_loss_eval", "loss")
_NOT_MEASURES = {"epoch", "lr", "lr_end", "loss", "acc", "train_loss_eval", "train_acc_eval",
                 "seconds"}


def _losses(history: Sequence[Mapping]) -> np.ndarray:
    key = next((k for k in LOSS_KEYS if any(k in e and e[k] is not None for e in history)),
               None)
    if key is None:
        raise ValueError(f"history has none of the loss keys {LOSS_KEYS}")
    return np.array([finite_or_nan(e.get(key)) for e in history])


def tracked_keys(histories: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The measure keys with a finite value in some epoch of every history, ours first."""
    common = None
    for h in histories.values():
        keys = {k for e in h for k, v in e.items()
                if k not in _NOT_MEASURES and np.isfinite(finite_or_nan(v))}
        common = keys if common is None else common & keys
    keys = sorted(common or ())
    ours = [k for k in (o[2:] for o in OURS) if k in keys]
    return ours + [k for k in keys if k not in ours]


@dataclass(frozen=True)
class LossLevels:
    """``levels`` (descending training losses), from ``top`` (the largest every run passes
    through) down to ``bottom`` (the study's target), and how ``bottom`` was chosen."""

    levels: np.ndarray
    top: float
    bottom: float
    bottom_from: str


def loss_levels(histories: Mapping[str, Sequence[Mapping]], *, n_levels: int = 6,
                target: float | None = None) -> LossLevels:
    """Common loss levels of a study (see the module docstring)."""
    if n_levels < 2:
        raise ValueError(f"n_levels must be >= 2, got {n_levels}")
    firsts, lasts = [], []
    for h in histories.values():
        loss = _losses(h)
        finite = loss[np.isfinite(loss) & (loss > 0)]
        if finite.size:
            firsts.append(finite[0])
            lasts.append(finite.min())
    if not firsts:
        raise ValueError("no history has a positive finite training loss")
    top = float(min(firsts))
    if target is not None and np.isfinite(target) and target > 0:
        bottom, origin = float(target), "the training-loss target"
    else:
        bottom, origin = float(max(lasts)), "the largest final loss (no loss target)"
    if not bottom < top:
        raise ValueError(f"no common range of training loss: every run passes {top:.3g} but "
                         f"the bottom level is {bottom:.3g}")
    levels = np.exp(np.linspace(math.log(top), math.log(bottom), n_levels))
    return LossLevels(levels, top, bottom, origin)


def _interpolate(l0: float, l1: float, m0: float, m1: float, level: float) -> float:
    if not (np.isfinite(m0) and np.isfinite(m1)):
        return float("nan")
    if l1 == l0:
        return m1
    t = (math.log(level) - math.log(l0)) / (math.log(l1) - math.log(l0))
    if m0 > 0 and m1 > 0:
        return math.exp(math.log(m0) + t * (math.log(m1) - math.log(m0)))
    return m0 + t * (m1 - m0)


def values_at_levels(history: Sequence[Mapping], key: str, levels: Sequence[float]
                     ) -> np.ndarray:
    """``key`` of one history read at each training-loss level (NaN where not reached)."""
    loss = _losses(history)
    values = np.array([finite_or_nan(e.get(key)) for e in history])
    has = np.nonzero(np.isfinite(values))[0]
    out = np.full(len(levels), np.nan)
    for j, level in enumerate(levels):
        below = np.nonzero(np.isfinite(loss) & (loss <= level))[0]
        if not below.size or below[0] == 0:
            continue  # never reached, or already below it after the first epoch
        k = below[0]
        # the nearest epochs with a value on either side of the crossing (a measure tracked
        # every few epochs late in training is null in between)
        before, after = has[has < k], has[has >= k]
        if not (before.size and after.size):
            continue
        k0, k1 = before[-1], after[0]
        if not (loss[k0] > level >= loss[k1]):
            continue  # the loss went back above the level between them: no clean crossing
        out[j] = _interpolate(loss[k0], loss[k1], values[k0], values[k1], level)
    return out


def _one_level(values: np.ndarray, gap: np.ndarray, *, n_boot: int, level: float,
               seed: int) -> dict[str, float]:
    ok = np.isfinite(values) & np.isfinite(gap)
    if ok.sum() < 2:
        return {"tau": np.nan, "tau_lo": np.nan, "tau_hi": np.nan, "n": int(ok.sum())}
    ci = bootstrap_kendall(values[ok], gap[ok], n_boot=n_boot, level=level, seed=seed)
    return {"tau": kendall_tau(values[ok], gap[ok]), "tau_lo": ci.lo, "tau_hi": ci.hi,
            "n": int(ok.sum())}


def tau_along_training(runs: pd.DataFrame, histories: Mapping[str, Sequence[Mapping]],
                       target: str, *, levels: LossLevels, n_boot: int = 1000,
                       level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Kendall tau of each tracked measure at each loss level against the final ``target``.

    ``runs``: the usable runs (with ``run_id`` and ``target``); ``histories``: run id ->
    history. One row per (loss level, measure): ``loss_level``, ``measure``, ``ours``,
    ``tau``, ``tau_lo``, ``tau_hi``, ``n`` (runs with a value at the level), ``n_missing``
    (usable runs that never reached the level or lack the measure there), and, where a
    baseline is tracked, ``best_baseline`` (the baseline with the largest tau at that
    level) and the paired ``diff``, ``diff_lo``, ``diff_hi`` of our measure against it.
    """
    runs = runs[runs["run_id"].astype(str).isin(histories)].reset_index(drop=True)
    gap = numeric_column(runs, target)
    hist = [histories[str(r)] for r in runs["run_id"]]
    keys = tracked_keys({str(r): h for r, h in zip(runs["run_id"], hist, strict=True)})
    # each run's history is read once per measure, at every level together: (keys, runs, levels)
    read = {k: np.array([values_at_levels(h, k, levels.levels) for h in hist]).reshape(
        len(hist), len(levels.levels)) for k in keys}
    rows = []
    for j, lv in enumerate(levels.levels):
        at = pd.DataFrame({k: read[k][:, j] for k in keys})
        at["_gap"] = gap
        level_rows = []
        for k in keys:
            row = {"loss_level": float(lv), "level_index": j, "measure": k,
                   "ours": "m_" + k in OURS,
                   **_one_level(at[k].to_numpy(), gap, n_boot=n_boot, level=level, seed=seed)}
            row["n_missing"] = len(runs) - row["n"]
            level_rows.append(row)
        _paired_at_level(level_rows, at, n_boot=n_boot, level=level, seed=seed)
        rows += level_rows
    return pd.DataFrame(rows)


#: The columns of tau_along_training.csv (``target`` first, then a row of
#: :func:`tau_along_training`).
COLUMNS = ("target", "loss_level", "level_index", "measure", "ours", "tau", "tau_lo", "tau_hi",
           "n", "n_missing", "best_baseline", "diff", "diff_lo", "diff_hi")


def _paired_at_level(rows: list[dict], at: pd.DataFrame, **kw) -> None:
    """Add the best baseline at this level and our paired difference against it."""
    base = [r for r in rows if not r["ours"] and np.isfinite(r["tau"])]
    best = max(base, key=lambda r: r["tau"])["measure"] if base else None
    for r in rows:
        r["best_baseline"] = best or ""
        r["diff"] = r["diff_lo"] = r["diff_hi"] = float("nan")
        if r["ours"] and best is not None:
            frame = at.rename(columns={r["measure"]: "a", best: "b"})
            d = paired_tau_difference(frame, "a", "b", "_gap", **kw)
            r["diff"], r["diff_lo"], r["diff_hi"] = d.diff, d.lo, d.hi


def _fmt(v: float, digits: int = 2) -> str:
    return "–" if not np.isfinite(v) else f"{(0.0 if round(v, digits) == 0 else v):.{digits}f}"


def along_sentence(table: pd.DataFrame, target: str) -> str:
    """One computed sentence: at which loss level our best tracked measure predicts
    ``target`` best, against its tau at the last level (the target loss)."""
    ours = table[table["ours"] & np.isfinite(table["tau"])]
    if ours.empty:
        return f"Along training: none of our measures has a defined τ with the {target}."
    last = table["level_index"].max()
    best = ours.loc[ours["tau"].idxmax()]
    end = ours[(ours["measure"] == best["measure"]) & (ours["level_index"] == last)]
    end_tau = float(end["tau"].iloc[0]) if len(end) else float("nan")
    ci = f"[{_fmt(best['tau_lo'])}, {_fmt(best['tau_hi'])}], {int(best['n'])} runs"
    end_loss = table.loc[table["level_index"] == last, "loss_level"].iloc[0]
    if best["level_index"] == last or best["tau"] <= end_tau:
        text = (f"Along training, {best['measure']} predicts the {target} best at the last "
                f"level, training loss {end_loss:.3g} (τ = {_fmt(best['tau'])} {ci}): no "
                "earlier level predicts better")
    else:
        text = (f"Along training, {best['measure']} predicts the {target} best at training "
                f"loss {best['loss_level']:.3g} (τ = {_fmt(best['tau'])} {ci}), against "
                f"τ = {_fmt(end_tau)} at the last level ({end_loss:.3g})")
    if best["best_baseline"] and np.isfinite(best["diff"]):
        verdict = ("ahead of" if best["diff_lo"] > 0 else "behind" if best["diff_hi"] < 0
                   else "level with")
        text += (f"; there it is {verdict} the best tracked baseline {best['best_baseline']} "
                 f"(paired Δτ = {_fmt(best['diff'])} [{_fmt(best['diff_lo'])}, "
                 f"{_fmt(best['diff_hi'])}])")
    return text + "."


def along_markdown(tables: Mapping[str, pd.DataFrame], levels: LossLevels, *,
                   title: str | None = None, note: str = "") -> str:
    """``tau_along_training.md``: per target, a sentence and a table of tau [CI] with one
    row per measure and one column per loss level."""
    out = [f"# {title}" if title else "# Kendall τ along training", ""]
    out += [f"Levels: {len(levels.levels)} training losses log-spaced from {levels.top:.3g} "
            f"(the largest every run passes through) to {levels.bottom:.3g} "
            f"({levels.bottom_from}); a measure is read at a level by log-log interpolation "
            "between the two epochs around it. A correlation at an earlier loss describes the "
            "measure at that point of training against the final gap; it is not a causal "
            "claim.", ""]
    if note:
        out += [note, ""]
    for target, table in tables.items():
        out += [f"## {target}", "", along_sentence(table, target), ""]
        lv = sorted(table["loss_level"].unique(), reverse=True)
        out += ["| measure | " + " | ".join(f"loss {v:.3g}" for v in lv) + " |",
                "|:---|" + "---:|" * len(lv)]
        for m, grp in table.groupby("measure", sort=False):
            grp = grp.set_index("loss_level")
            cells = []
            for v in lv:
                r = grp.loc[v]
                cell = f"{_fmt(r['tau'])} [{_fmt(r['tau_lo'])}, {_fmt(r['tau_hi'])}]"
                cells.append(cell + (f" ({int(r['n_missing'])} missing)" if r["n_missing"] else ""))
            name = f"**{m} (ours)**" if grp["ours"].iloc[0] else m
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


class TooFewRuns(ValueError):
    """A study with fewer than two usable runs that have a history: no correlation."""


def subset_note(records: Sequence[Mapping]) -> str:
    """Where the tracked values come from, against the end-of-training measures: the
    tracker reads a seeded subset of the training images (``flatness_tracking.n_samples``),
    the measure job the whole training split, so they agree only where the subset is the
    whole split."""
    parts = []
    for rec in records:
        tracking = rec.get("flatness_tracking") or {}
        n = tracking.get("n_samples")
        total = (rec.get("dataset") or {}).get("n_train")
        if n is not None:
            parts.append((int(n), int(total) if total is not None else None))
    if not parts:
        return "The runs record no tracking subset."
    smaller = [p for p in parts if p[1] is not None and p[0] < p[1]]
    if not smaller:
        return ("The tracked values are computed on each run's whole training split, the "
                "images the end-of-training measures use.")
    return (f"The tracked values are computed on a seeded subset of the training images; in "
            f"{len(smaller)} of {len(parts)} runs it is smaller than the training split "
            f"({smaller[0][0]} of {smaller[0][1]} images), so there the values differ from the "
            "end-of-training measures, which use the whole split.")


def write_tau_along_training(runs: pd.DataFrame, records: Mapping[str, Mapping],
                             prefix, *, targets: Sequence[str], n_levels: int = 6,
                             n_boot: int = 1000, seed: int = 0, title: str | None = None,
                             require_converged: bool = True) -> tuple[dict, LossLevels, str]:
    """The workflow's job: ``<prefix>.csv`` (every target's rows, a ``target`` column) and
    ``<prefix>.md`` from the usable runs of ``runs`` and their ``train.json`` records
    (run id -> record). Returns the per-target tables, the levels and the subset note."""
    from pathlib import Path

    from convflat.analysis.runs import select_runs
    from convflat.io import atomic_write_text

    use = select_runs(runs, require_converged=require_converged).runs
    hist = {str(r): (records[str(r)].get("history") or []) for r in use["run_id"]
            if str(r) in records}
    hist = {r: h for r, h in hist.items() if h}
    if len(hist) < 2:
        raise TooFewRuns(f"tau along training needs >= 2 usable runs with a history; this "
                         f"study has {len(hist)}")
    goal = pd.to_numeric(use.get("loss_target"), errors="coerce") \
        if "loss_target" in use.columns else pd.Series(dtype=float)
    target_loss = float(goal.min()) if goal.notna().any() else None
    levels = loss_levels(hist, n_levels=n_levels, target=target_loss)
    tables = {t: tau_along_training(use, hist, t, levels=levels, n_boot=n_boot, seed=seed)
              for t in targets}
    note = subset_note([records[r] for r in hist])
    prefix = Path(prefix)
    frame = pd.concat([tb.assign(target=t) for t, tb in tables.items()],
                      ignore_index=True)[list(COLUMNS)]
    atomic_write_text(prefix.with_suffix(".csv"), frame.to_csv(index=False, float_format="%.10g"))
    atomic_write_text(prefix.with_suffix(".md"), along_markdown(tables, levels, title=title,
                                                                note=note))
    return tables, levels, note
