"""The answer of a study in one file: ``headline.md``.

The headline answers "does the exact conv-layer flatness predict generalization, and better
than the baselines?" the way a reviewer of a generalization-measures paper asks it:

1. **Enough runs?** Below ``min_runs`` usable runs (:mod:`convflat.usable`) the headline
   says the evidence is insufficient and names no winner.
2. **Paired comparison.** Our measures and every baseline are computed on the same runs, so
   each of ours is compared with every other measure by the paired bootstrap interval of
   the difference of their Kendall taus (and of their Psi):
   :mod:`convflat.analysis.paired`. Ours *wins* against a measure when the interval lies
   above 0, *loses* when it lies below, *ties* otherwise. The verdict per target is our best
   measure against the best baseline (both by tau).
3. **Per axis.** Psi per grid axis (Jiang et al. 2020) says along which hyperparameters a
   measure ranks the runs the right way (psi_i > 0) and along which the wrong way
   (psi_i < 0); a tau that comes from one axis while another fails is said as such.
4. **Robustness.** The sign error per hyperparameter family on pairs of runs that differ in
   one hyperparameter (Dziugaite et al. 2020): :mod:`convflat.analysis.robustness`.
5. **Controls.** The stopped training loss, the epochs, the parameter count and the grid
   hyperparameters ranked alongside (:mod:`convflat.analysis.controls`), and how strongly
   our measures follow the stopped training loss.

The first paragraph is computed from those numbers and says the verdict first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from convflat.analysis.controls import CONTROL_PREFIX, CONTROLS, add_controls, is_control
from convflat.analysis.paired import (
    PairedDifference,
    paired_psi_difference,
    paired_tau_difference,
)
from convflat.analysis.robustness import sign_error_table
from convflat.analysis.runs import OURS, read_runs, select_runs
from convflat.analysis.stats import (
    axis_groups,
    bootstrap_kendall,
    convergence_summary,
    kendall_tau,
    spread_ratio,
)
from convflat.analysis.tables import read_correlation_table
from convflat.io import atomic_write_text

__all__ = [
    "DEFAULT_MIN_RUNS",
    "HEADLINE_TARGETS",
    "HeadlineSettings",
    "TargetAnswer",
    "headline_markdown",
    "headline_rows",
    "target_answer",
    "write_headline",
]

HEADLINE_TARGETS: tuple[str, ...] = ("loss_gap", "acc_gap")

#: Fewest usable runs for a verdict. With n runs and no association, Kendall's tau has a
#: standard deviation of sqrt(2 (2n + 5) / (9 n (n - 1))): 0.25 at n = 10, so below 10 runs
#: even |tau| = 0.5 is within two standard deviations of chance, and a bootstrap over a
#: handful of runs gives degenerate intervals (2 runs: tau = 1, CI [1, 1]).
DEFAULT_MIN_RUNS = 10

_WORDS = {"loss_gap": "loss gap", "acc_gap": "accuracy gap", "test_error": "test error"}


def _words(target: str) -> str:
    return _WORDS.get(target, target)


@dataclass(frozen=True)
class HeadlineSettings:
    """How the headline judges: ``targets``, ``n_baselines`` (rows of the per-axis and
    sign-error tables besides ours and the controls), ``min_runs`` (fewest usable runs for a
    verdict), ``noise_z`` (the sign error's noise rule), ``digits``, ``require_converged``;
    the bootstrap (``n_boot``, ``level``, ``seed``, ``variant``) is the correlation
    table's, so the marginal and paired intervals share their resamples."""

    targets: tuple[str, ...] = HEADLINE_TARGETS
    n_baselines: int = 3
    min_runs: int = DEFAULT_MIN_RUNS
    noise_z: float = 1.0
    digits: int = 2
    require_converged: bool = True
    n_boot: int = 1000
    level: float = 0.95
    seed: int = 0
    variant: str = "b"


def _as_table(table) -> pd.DataFrame:
    return table if isinstance(table, pd.DataFrame) else read_correlation_table(table)


def _as_runs(runs) -> pd.DataFrame:
    return runs if isinstance(runs, pd.DataFrame) else read_runs(runs)


def _kind(table: pd.DataFrame) -> np.ndarray:
    """ours / baseline / control per row (tables without ``kind`` predate controls)."""
    if "kind" in table.columns:
        return table["kind"].astype(str).to_numpy()
    ours = [("m_" + str(m)) in OURS for m in table.index]
    return np.array(["ours" if o else "control" if is_control(m) else "baseline"
                     for m, o in zip(table.index, ours, strict=True)])


def _check_target(table: pd.DataFrame, target: str) -> None:
    need = [f"{target}.{s}" for s in ("tau", "tau_lo", "tau_hi", "psi", "n")]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"correlation table lacks column(s) {missing} for target {target!r}; "
                         f"its targets are {[c[:-4] for c in table.columns if c.endswith('.tau')]}")


def _column(name: str) -> str:
    """The runs-table column of a correlation-table row (``conv_trace`` -> ``m_conv_trace``,
    ``control:width`` -> ``c_hp_width``, ``control:train_loss`` -> ``c_train_loss``)."""
    if name.startswith("control:"):
        base = name[len("control:"):]
        return CONTROL_PREFIX + (base if base in CONTROLS else "hp_" + base)
    return "m_" + name


def headline_rows(table, target: str) -> pd.DataFrame:
    """Every measure of the table for one target, ranked by Kendall tau *as signed* (a
    good measure correlates positively; 1 = largest tau among the measures, equal tau equal
    rank, undefined last), the controls after them (``rank`` 0).

    Columns: ``measure``, ``kind``, ``rank``, ``tau``, ``tau_lo``, ``tau_hi``, ``psi``,
    ``n_used``.
    """
    table = _as_table(table)
    _check_target(table, target)
    kind = _kind(table)
    tau = table[f"{target}.tau"].to_numpy(float)
    measure = kind != "control"
    finite = tau[measure & np.isfinite(tau)]
    rank = np.array([0 if not measure[k] else
                     1 + int((finite > v).sum()) if np.isfinite(v) else finite.size + 1
                     for k, v in enumerate(tau)], dtype=int)
    order = sorted(range(len(tau)), key=lambda k: (not measure[k], not np.isfinite(tau[k]),
                                                   -tau[k] if np.isfinite(tau[k]) else 0, k))
    return pd.DataFrame({
        "measure": [str(table.index[k]) for k in order], "kind": kind[order],
        "rank": rank[order], "tau": tau[order],
        "tau_lo": table[f"{target}.tau_lo"].to_numpy(float)[order],
        "tau_hi": table[f"{target}.tau_hi"].to_numpy(float)[order],
        "psi": table[f"{target}.psi"].to_numpy(float)[order],
        "n_used": table[f"{target}.n"].to_numpy(float)[order].astype(int),
    })


@dataclass(frozen=True)
class TargetAnswer:
    """What the headline says about one target.

    ``rows``: :func:`headline_rows`; ``paired``: (our measure, other measure) -> the paired
    differences of tau and of Psi; ``ours``/``baseline``/``control``: the best of each
    kind by tau (a control by |tau|, None when absent); ``outcome``: our best against the
    best baseline (``wins`` / ``ties`` / ``loses`` / ``undecided``); ``per_axis``: measure
    -> {axis: psi_i}; ``sign_error``: :func:`~convflat.analysis.robustness.sign_error_table`
    (rows named as in the correlation table); ``vs_loss``: our measure -> (tau with the
    stopped training loss, CI low, CI high)."""

    target: str
    rows: pd.DataFrame
    paired: dict[tuple[str, str], tuple[PairedDifference, PairedDifference]]
    ours: str | None
    baseline: str | None
    control: str | None
    outcome: str
    per_axis: dict[str, dict[str, float]]
    sign_error: pd.DataFrame
    vs_loss: dict[str, tuple[float, float, float]] = field(default_factory=dict)


def _best(rows: pd.DataFrame, kind: str, absolute: bool = False) -> str | None:
    sub = rows[(rows["kind"] == kind) & np.isfinite(rows["tau"])]
    if sub.empty:
        return None
    score = sub["tau"].abs() if absolute else sub["tau"]
    return str(sub.loc[score.idxmax(), "measure"])  # first in rank order among equals


def _paired(use: pd.DataFrame, rows: pd.DataFrame, target: str, s: HeadlineSettings):
    groups = axis_groups(use)
    kw = {"n_boot": s.n_boot, "level": s.level, "seed": s.seed, "variant": s.variant}
    out = {}
    for ours in rows.loc[rows["kind"] == "ours", "measure"]:
        for other, kind in zip(rows["measure"], rows["kind"], strict=True):
            if other == ours:
                continue
            a, b, orient = _column(ours), _column(other), kind == "control"
            d_tau = paired_tau_difference(use, a, b, target, orient_b=orient, **kw)
            if b.startswith(CONTROL_PREFIX + "hp_"):  # Psi of a grid axis is +-1 by design
                d_psi = PairedDifference(a, b, target, "psi", *[float("nan")] * 3, s.level, 0)
            else:
                d_psi = paired_psi_difference(use, a, b, target, groups=groups,
                                              orient_b=orient, **kw)
            out[(ours, other)] = (d_tau, d_psi)
    return out


def _per_axis(table: pd.DataFrame, target: str) -> dict[str, dict[str, float]]:
    prefix = f"{target}.psi["
    cols = [c for c in table.columns if c.startswith(prefix)]
    return {str(m): {c[len(prefix):-1]: float(table.loc[m, c]) for c in cols}
            for m in table.index}


def _vs_loss(use: pd.DataFrame, ours: Sequence[str], s: HeadlineSettings):
    if "train_loss" not in use.columns:
        return {}
    out = {}
    loss = pd.to_numeric(use["train_loss"], errors="coerce").to_numpy(float)
    for m in ours:
        mu = pd.to_numeric(use[_column(m)], errors="coerce").to_numpy(float)
        ok = np.isfinite(mu) & np.isfinite(loss)
        if ok.sum() < 2:
            continue
        ci = bootstrap_kendall(mu[ok], loss[ok], n_boot=s.n_boot, level=s.level, seed=s.seed,
                               variant=s.variant)
        out[m] = (kendall_tau(mu[ok], loss[ok], variant=s.variant), ci.lo, ci.hi)
    return out


def target_answer(table, runs, target: str, settings: HeadlineSettings) -> TargetAnswer:
    """Everything the headline says about ``target`` (see :class:`TargetAnswer`).
    ``runs``: the runs table (all runs; the usable ones are selected here)."""
    table, runs = _as_table(table), _as_runs(runs)
    rows = headline_rows(table, target)
    # controls from all runs, as the correlation table makes them, then the usable runs
    use = select_runs(add_controls(runs), require_converged=settings.require_converged).runs
    missing = [m for m in rows["measure"] if _column(m) not in use.columns]
    if missing:
        raise ValueError(f"runs table lacks the column(s) {[_column(m) for m in missing]} of "
                         f"correlation-table row(s) {missing}: are table and runs of one study?")
    ours, baseline = _best(rows, "ours"), _best(rows, "baseline")
    paired = _paired(use, rows, target, settings)
    outcome = paired[(ours, baseline)][0].verdict if ours and baseline else "undecided"
    shown = _shown(rows, settings.n_baselines)
    se = sign_error_table(use, [_column(m) for m in shown], target, noise_z=settings.noise_z)
    se.index = shown
    return TargetAnswer(target, rows, paired, ours, baseline,
                        _best(rows, "control", absolute=True), outcome,
                        _per_axis(table, target), se,
                        _vs_loss(use, [m for m in rows["measure"] if m in _ours(rows)],
                                 settings))


def _ours(rows: pd.DataFrame) -> list[str]:
    return rows.loc[rows["kind"] == "ours", "measure"].tolist()


def _shown(rows: pd.DataFrame, n_baselines: int) -> list[str]:
    """Rows of the per-axis and sign-error tables: ours, the best baselines, the controls."""
    base = rows.loc[rows["kind"] == "baseline", "measure"].tolist()[:n_baselines]
    keep = set(_ours(rows) + base + rows.loc[rows["kind"] == "control", "measure"].tolist())
    return [m for m in rows["measure"] if m in keep]


# ------------------------------------------------------------------------- the text


def _num(v: float, digits: int) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    r = round(float(v), digits)
    return f"{(0.0 if r == 0 else r):.{digits}f}"


def _end(v: float, digits: int) -> str:
    """An interval's end: a negative one that rounds to 0 keeps its sign (-0.00), so an
    interval that excludes 0 never reads as if it reached it."""
    text = _num(v, digits)
    return "-" + text if v < 0 and text == _num(0.0, digits) else text


def _ci(lo: float, hi: float, digits: int) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ""
    return f" [{_end(lo, digits)}, {_end(hi, digits)}]"


def _diff_cell(d: PairedDifference, digits: int, words: bool) -> str:
    if not np.isfinite(d.diff):
        return "–"
    mark = {"wins": " ours better", "loses": " ours worse"}.get(d.verdict, "") if words else ""
    return f"{_num(d.diff, digits)}{_ci(d.lo, d.hi, digits)}{mark}"


def _axis_words(per_axis: dict[str, float], digits: int) -> tuple[list[str], list[str]]:
    right = [f"{a} (ψ {_num(v, digits)})" for a, v in per_axis.items() if np.isfinite(v) and v > 0]
    wrong = [f"{a} (ψ {_num(v, digits)})" for a, v in per_axis.items() if np.isfinite(v) and v < 0]
    return right, wrong


def _join(items: Sequence[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


_VERB = {"wins": "beats", "ties": "ties with", "loses": "loses to",
         "undecided": "cannot be compared with"}
_INTERVAL = {"wins": "lies above 0", "ties": "contains 0", "loses": "lies below 0",
             "undecided": "is undefined"}


def _tally(a: TargetAnswer, ours: str) -> str:
    """How our measure fares against every baseline, by the paired tau intervals."""
    counts = {"wins": 0, "ties": 0, "loses": 0}
    kind = dict(zip(a.rows["measure"], a.rows["kind"], strict=True))
    for (o, other), (d, _) in a.paired.items():
        if o == ours and kind[other] == "baseline" and d.verdict in counts:
            counts[d.verdict] += 1
    return (f"against all {sum(counts.values())} baselines it is better than "
            f"{counts['wins']}, tied with {counts['ties']} and worse than {counts['loses']}")


def _target_sentences(a: TargetAnswer, s: HeadlineSettings) -> list[str]:
    """The answer for one target, verdict first."""
    d, r = s.digits, a.rows.set_index("measure")
    if a.ours is None or a.baseline is None:
        return [f"On the {_words(a.target)}, our measures cannot be compared with the "
                "baselines (no defined τ on one side)."]
    diff = a.paired[(a.ours, a.baseline)][0]
    out = [f"On the {_words(a.target)}, our best measure {a.ours} "
           f"(τ {_num(r.loc[a.ours, 'tau'], d)}) "
           f"{_VERB[a.outcome]} the best baseline {a.baseline} (τ "
           f"{_num(r.loc[a.baseline, 'tau'], d)}): paired Δτ = {_diff_cell(diff, d, False)}, an "
           f"interval that {_INTERVAL[a.outcome]}; {_tally(a, a.ours)}."]
    for m in _ours(a.rows):
        right, wrong = _axis_words(a.per_axis.get(m, {}), d)
        if wrong:
            out.append(f"{m} ranks the runs the wrong way along {_join(wrong)}"
                       + (f" and the right way only along {_join(right)}, so its τ comes from "
                          "those axes and it is not a reliable predictor across this grid"
                          if right else "")
                       + ".")
        elif right:
            out.append(f"{m} ranks the runs the right way along every axis with a defined ψ: "
                       f"{_join(right)}.")
        se = a.sign_error.loc[m] if m in a.sign_error.index else None
        if se is not None and np.isfinite(se["worst"]):
            out[-1] = out[-1][:-1] + (f"; its sign error on one-hyperparameter pairs is "
                                      f"{_num(se['mean'], d)} on average and "
                                      f"{_num(se['worst'], d)} in its worst family "
                                      f"({se['worst_family']}).")
    out.append(_control_sentence(a, s))
    return [x for x in out if x]


def _control_sentence(a: TargetAnswer, s: HeadlineSettings) -> str:
    if a.control is None or a.ours is None:
        return ""
    d = s.digits
    tau = a.rows.set_index("measure").loc[a.control, "tau"]
    diff = a.paired[(a.ours, a.control)][0]
    what = {"wins": "beats it", "ties": "does not beat it (the paired interval contains 0)",
            "loses": "loses to it", "undecided": "cannot be compared with it"}[diff.verdict]
    label = _control_name(a.control)
    return (f"The strongest control, {label}, ranks the runs with |τ| = {_num(abs(tau), d)}; "
            f"{a.ours} {what}: Δτ against the control in its better direction = "
            f"{_diff_cell(diff, d, False)}.")


def _control_name(row: str) -> str:
    name = row[len("control:"):]
    return CONTROLS.get(name, f"the grid hyperparameter {name}")


def _answer(answers: Sequence[TargetAnswer], n_used: int, s: HeadlineSettings) -> str:
    if n_used < s.min_runs:
        return (f"**Insufficient evidence.** Only {n_used} usable run(s), fewer than the "
                f"{s.min_runs} this analysis needs for a verdict (`analysis.min_runs`): with "
                f"so few runs a rank correlation cannot tell a measure from chance, so this "
                f"headline names no winner. The numbers below are descriptive only.")
    verdicts = {v: [a for a in answers if a.outcome == v]
                for v in ("wins", "ties", "loses", "undecided")}
    parts = [f"{_VERB[v]} the "
             f"best baseline on the {' and the '.join(_words(a.target) for a in items)}"
             for v, items in verdicts.items() if items]
    beaten = [a for a in answers if a.control and a.ours
              and a.paired[(a.ours, a.control)][0].verdict in ("ties", "loses")]
    if beaten:
        how = {"loses": "does better", "ties": "does as well"}
        parts.append("does not beat knowing the training run: " + "; ".join(
            f"on the {_words(a.target)} ranking the runs by {_control_name(a.control)} "
            f"{how[a.paired[(a.ours, a.control)][0].verdict]}" for a in beaten))
    lead = (f"**Verdict: our best conv-layer measure {_join(parts)}** (paired bootstrap "
            f"of the difference in Kendall's τ, {s.level:.0%} interval).")
    body = [x for a in answers for x in _target_sentences(a, s)]
    return " ".join([lead, *body])


def _paired_table(a: TargetAnswer, s: HeadlineSettings, words: bool) -> list[str]:
    ours, d = _ours(a.rows), s.digits
    head = ["rank", "measure", f"τ [{s.level:.0%} CI]", "Ψ"]
    head += [f"Δτ {o} − it" for o in ours] + [f"ΔΨ {o} − it" for o in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---:", ":---"] + ["---:"]
                                                       * (len(head) - 2)) + "|"]
    for r in a.rows.itertuples(index=False):
        name = str(r.measure).replace("|", r"\|")
        name = f"**{name} (ours)**" if r.kind == "ours" else name
        cells = [str(r.rank) if r.rank else "control", name,
                 _num(r.tau, d) + _ci(r.tau_lo, r.tau_hi, d), _num(r.psi, d)]
        for k in (0, 1):
            cells += ["" if o == r.measure else _diff_cell(a.paired[(o, r.measure)][k], d, words)
                      for o in ours]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _axis_table(a: TargetAnswer, s: HeadlineSettings) -> list[str]:
    shown = [m for m in _shown(a.rows, s.n_baselines) if not m.startswith("control:")]
    axes = sorted({ax for m in shown for ax in a.per_axis.get(m, {})})
    if not axes:
        return ["No grid axis varies: no per-axis ψ."]
    lines = ["| measure | " + " | ".join(f"ψ[{ax}]" for ax in axes) + " |",
             "|:---|" + "---:|" * len(axes)]
    for m in shown:
        cells = [_num(a.per_axis.get(m, {}).get(ax, float("nan")), s.digits) for ax in axes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    for m in shown:
        right, wrong = _axis_words(a.per_axis.get(m, {}), s.digits)
        lines += ["", f"{m}: right way along {_join(right) if right else 'no axis'}; wrong way "
                      f"along {_join(wrong) if wrong else 'no axis'}."]
    return lines


def _sign_error_lines(a: TargetAnswer, s: HeadlineSettings) -> list[str]:
    se = a.sign_error
    fams = [c for c in se.columns if not c.startswith("pairs[")
            and c not in ("mean", "worst", "worst_family")]
    dropped = se.attrs.get("dropped", {})
    head = [f"{f} ({int(se[f'pairs[{f}]'].max())} pairs)" for f in fams]
    lines = [f"Pairs of runs that differ in one hyperparameter, {se.attrs.get('note')}"
             + ("; left out as within noise: "
                + ", ".join(f"{f} {n}" for f, n in dropped.items()) if dropped else "") + ".",
             ""]
    if not fams:
        return [*lines, "No such pair: no sign error."]
    lines += ["| measure | " + " | ".join(head) + " | mean | worst |",
              "|:---|" + "---:|" * (len(fams) + 2)]
    for m, row in se.iterrows():
        cells = [_num(row[f], s.digits) for f in fams]
        worst = f"{_num(row['worst'], s.digits)} ({row['worst_family']})" \
            if row["worst_family"] else "–"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_num(row['mean'], s.digits)} | "
                     f"{worst} |")
    return lines


def _evidence(runs: pd.DataFrame, answers, s: HeadlineSettings) -> list[str]:
    sel = select_runs(runs, require_converged=s.require_converged)
    out = [f"Runs: {sel.summary()}; a verdict needs at least {s.min_runs} usable runs.", ""]
    for t in s.targets:
        if t in runs.columns and sel.n_runs:
            out += [spread_ratio(runs, target=t, require_converged=s.require_converged)
                    .line(s.digits), ""]
    out += [convergence_summary(runs).markdown().rstrip(), ""]
    for a in answers[:1]:
        for m, (tau, lo, hi) in a.vs_loss.items():
            out.append(f"{m} against the stopped training loss: τ = {_num(tau, s.digits)}"
                       f"{_ci(lo, hi, s.digits)} (a measure that mostly restates how far "
                       f"training went is not evidence of flatness).")
        out.append("")
    return out


def _settings_from(table: pd.DataFrame, s: HeadlineSettings | None, **kw) -> HeadlineSettings:
    if s is not None:
        return s
    base = {}
    for key in ("n_boot", "level", "seed", "variant"):
        v = table.attrs.get(key, table[key].iloc[0] if key in table.columns and len(table)
                            else None)
        if v is not None and not (isinstance(v, float) and np.isnan(v)):
            base[key] = type(getattr(HeadlineSettings, key))(v)
    return HeadlineSettings(**{**base, **kw})


def _along_lines(along, targets: Sequence[str]) -> list[str]:
    """One sentence per target from the tau-along-training table (a DataFrame with a
    ``target`` column, or the path of ``tau_along_training.csv``); nothing without one."""
    if along is None:
        return []
    from convflat.analysis.along import along_sentence

    frame = along if isinstance(along, pd.DataFrame) else pd.read_csv(along)
    out = [along_sentence(frame[frame["target"] == t], _words(t))
           for t in targets if (frame["target"] == t).any()]
    return [*out, ""] if out else []


def headline_markdown(table, runs, *, settings: HeadlineSettings | None = None,
                      title: str | None = None, footer: str | None = None, along=None,
                      **kw) -> str:
    """The headline of a study as Markdown (see the module docstring).

    ``table``: the study's correlation table (DataFrame or ``correlation.csv``, with its
    control rows); ``runs``: its runs table (DataFrame or ``runs.csv``) with the measure
    columns. ``settings`` or keyword arguments of :class:`HeadlineSettings` (the bootstrap
    settings default to the table's). ``along``: the study's tau-along-training table
    (:func:`~convflat.analysis.along.write_tau_along_training`'s CSV or DataFrame), for one
    sentence per target on where along training our measure predicts best. ``footer``: an
    extra last line.
    """
    table, runs = _as_table(table), _as_runs(runs)
    if "targets" in kw:
        kw["targets"] = tuple(kw["targets"])
    s = _settings_from(table, settings, **kw)
    if not s.targets:
        raise ValueError("targets must name at least one target")
    n_used = select_runs(runs, require_converged=s.require_converged).n_runs
    answers = [target_answer(table, runs, t, s) for t in s.targets]
    words = n_used >= s.min_runs
    out = [f"# {title}" if title else "# Headline", "", _answer(answers, n_used, s), "",
           "## Evidence", "", *_evidence(runs, answers, s), *_along_lines(along, s.targets)]
    for a in answers:
        out += [f"## {_words(a.target)} (`{a.target}`)", "", "### Paired comparison", "",
                *_paired_table(a, s, words), "", "### Along each grid axis", "",
                *_axis_table(a, s), "", "### Sign error on one-hyperparameter pairs", "",
                *_sign_error_lines(a, s), ""]
    out.append(_LEGEND.format(level=f"{s.level:.0%}", n_boot=s.n_boot, seed=s.seed))
    if footer:
        out += ["", footer]
    return "\n".join(out).rstrip() + "\n"


_LEGEND = (
    "τ: Kendall's rank correlation of a measure with the target over the usable runs, "
    "with a percentile bootstrap {level} interval ({n_boot} resamples, seed {seed}); a good "
    "measure correlates positively, and rank 1 is the largest τ. Δτ / ΔΨ: our measure minus "
    "the row's, on the same bootstrap resamples of the same runs (paired); \"ours better\" "
    "/ \"ours worse\" when the {level} interval excludes 0. A control (the stopped training "
    "loss, the epochs, the parameter count, a grid hyperparameter) has no fixed direction: "
    "it is compared in the direction the data favour, which favours the control. Ψ: "
    "granulated Kendall coefficient, ψ[axis] its value along one axis (Jiang et al. 2020). "
    "Sign error: Dziugaite et al. (2020), \"In search of robust measures of "
    "generalization\"; 0.5 is a coin flip, and in their study every measure reaches 1.0 in "
    "its worst environment."
)


def write_headline(table, runs, path: str | os.PathLike, **kwargs) -> Path:
    """Write :func:`headline_markdown` atomically to ``path`` (e.g.
    ``results/tables/<study>/headline.md``) and return the path."""
    return atomic_write_text(path, headline_markdown(table, runs, **kwargs))
