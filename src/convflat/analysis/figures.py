"""Figures for a paper column: seaborn on matplotlib's object API, PNG and PDF.

Every function takes an output path ``out`` given either without a suffix
(``results/figures/cifar10/tau_psi``) or with ``.png`` / ``.pdf`` (the suffix is dropped),
writes ``<out>.png`` (``dpi``, default 300) and ``<out>.pdf`` (fonts embedded as TrueType), each
atomically, and returns ``[png_path, pdf_path]``.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot: no
global figure state, no backend is chosen or changed, and nothing is left open. Panels are
sized for a 3.5 inch paper column with 7-8 pt text; multi-panel figures span the page.
Our measures (``m_conv_trace``, ``m_conv_relative_flatness``) are drawn in red with bold
labels, the baselines in blue-grey.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib as mpl
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import scipy.stats
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from convflat.analysis.controls import is_control
from convflat.analysis.runs import (
    axis_columns,
    finite_or_nan,
    is_ours,
    measure_columns,
    numeric_column,
    require_columns,
    select_runs,
    short_name,
)
from convflat.analysis.stats import kendall_tau
from convflat.analysis.tables import read_correlation_table, table_targets
from convflat.io import atomic_write
from convflat.records import FLATNESS_KEYS as _RECORD_FLATNESS_KEYS

__all__ = [
    "FLATNESS_KEYS",
    "false_friend_caption",
    "figure_paths",
    "load_histories",
    "placeholder_figure",
    "plot_false_friend",
    "plot_flatness_over_training",
    "plot_hutchinson_convergence",
    "plot_measure_vs_gap",
    "plot_psi_heatmap",
    "plot_sign_error",
    "plot_tau_along_training",
    "plot_tau_psi",
]

OURS_COLOR = "#c0392b"
BASE_COLOR = "#4c6a92"
PANEL = (3.5, 2.6)  # inches: one panel in a paper column
_RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7,
    "ytick.labelsize": 7, "legend.fontsize": 7, "legend.title_fontsize": 7,
    "pdf.fonttype": 42, "ps.fonttype": 42, "axes.titleweight": "normal",
}


# ------------------------------------------------------------------------- plumbing


@contextlib.contextmanager
def _style():
    with sns.axes_style("whitegrid"), sns.plotting_context("paper"), mpl.rc_context(_RC):
        yield


def figure_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    """``out`` (no suffix, or ``.png`` / ``.pdf``) -> (``<out>.png``, ``<out>.pdf``)."""
    p = Path(out)
    base = p.with_suffix("") if p.suffix.lower() in (".png", ".pdf") else p
    return base.with_name(base.name + ".png"), base.with_name(base.name + ".pdf")


def _save(fig: Figure, out: str | os.PathLike, dpi: int = 300) -> list[Path]:
    paths = []
    for path in figure_paths(out):
        # constrained layout keeps every artist inside the canvas: no "tight" pass; the
        # atomic write means a killed job never leaves half a figure
        atomic_write(path, lambda fh, p=path: fig.savefig(fh, format=p.suffix[1:], dpi=dpi))
        paths.append(path)
    return paths


def _wants_log(values: np.ndarray) -> bool:
    """Log scale when every finite value is positive and they span more than 2 decades."""
    v = values[np.isfinite(values)]
    return v.size >= 2 and bool((v > 0).all()) and v.max() / v.min() > 100.0


def _log_label(v: float, _pos=None) -> str:
    """Tick text on a log axis: plain for 1e-3 <= |v| < 1e4, else m x 10^k (mathtext)."""
    if v <= 0 or not np.isfinite(v):
        return ""
    if 1e-3 <= v < 1e4:
        return f"{v:g}"
    k = math.floor(math.log10(v) + 1e-9)
    m = v / 10.0 ** k
    mant = f"{m:.0f}" if abs(m - round(m)) < 1e-6 else f"{m:.1f}"
    return rf"$10^{{{k}}}$" if mant == "1" else rf"${mant}\times10^{{{k}}}$"


def _tidy_log_ticks(ax, max_ticks: int = 5) -> None:
    """Readable ticks on every log-scaled axis of ``ax``: at most ``max_ticks`` labelled
    major ticks, never a label on a minor tick.

    matplotlib's default labels the minor ticks of a log axis that spans about one decade
    or less (2x10^0, 3x10^0, 4x10^0, ...), and those labels overlap in a 3.5 inch panel.
    When the axis shows at least two powers of ten only those are labelled (every k-th, k
    chosen so at most ``max_ticks`` show); otherwise the ticks are 1, 2 and 5 times a power
    of ten.
    Call after the data are drawn (the limits decide the ticks).
    """
    for axis, lim in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
        if axis.get_scale() != "log":
            continue
        lo, hi = sorted(lim)
        if not (lo > 0 and np.isfinite(hi)):
            continue
        powers = math.floor(math.log10(hi) + 1e-9) - math.ceil(math.log10(lo) - 1e-9) + 1
        if powers >= 2:
            axis.set_major_locator(mticker.LogLocator(base=10, numticks=max_ticks))
        else:
            axis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0),
                                                      numticks=max_ticks))
        axis.set_major_formatter(mticker.FuncFormatter(_log_label))
        axis.set_minor_locator(mticker.LogLocator(base=10, subs=np.arange(2, 10) * 1.0,
                                                  numticks=12))
        axis.set_minor_formatter(mticker.NullFormatter())


def _label(column: str) -> str:
    return short_name(column) + (" (ours)" if is_ours(column) else "")


def _style_title(ax, column: str, extra: str = "") -> None:
    text = _label(column) + (f"\n{extra}" if extra else "")
    if is_ours(column):
        ax.set_title(text, color=OURS_COLOR, fontweight="bold")
    else:
        ax.set_title(text)


def _value_label(v) -> str:
    if v is None or v is pd.NA:
        return "NaN"
    if isinstance(v, (float, np.floating)):
        return "NaN" if math.isnan(v) else f"{v:g}"
    return str(v)


def _num(v: float) -> str:
    r = round(float(v), 2)
    return f"{(0.0 if r == 0 else r):.2f}"


def _sorted_levels(values: pd.Series) -> list:
    levels = pd.unique(values)
    try:
        return sorted(levels, key=lambda v: (pd.isna(v), v))
    except TypeError:
        return sorted(levels, key=str)


def _grid(n: int, ncols: int, panel: tuple[float, float]):
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _usable(runs: pd.DataFrame, require_converged: bool):
    sel = select_runs(runs, require_converged=require_converged)
    if sel.n_runs == 0:
        raise ValueError(f"nothing to plot: {sel.summary()}")
    return sel


def _table(table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        return table
    return read_correlation_table(table)


def _bold_ours_ticks(labels) -> None:
    for lab in labels:
        if lab.get_text().endswith("(ours)"):
            lab.set_color(OURS_COLOR)
            lab.set_fontweight("bold")


# ---------------------------------------------------------- measure vs generalization


def plot_measure_vs_gap(
    runs: pd.DataFrame, out: str | os.PathLike, *, target: str = "loss_gap",
    measures: Sequence[str] | None = None, hue: str | None = None, ncols: int = 3,
    panel: tuple[float, float] = PANEL, variant: str = "b", require_converged: bool = True,
    dpi: int = 300,
) -> list[Path]:
    """Scatter of each measure (x) against ``target`` (y), one panel per measure.

    Points are coloured by the hyperparameter axis ``hue`` (default: the non-seed axis with
    the most distinct values; no colour when no axis varies) with an ordered palette and
    one shared legend. Each panel's title gives Kendall's tau (:func:`kendall_tau`) and the
    runs used. The x axis is logarithmic when the measure is positive and spans more than
    two orders of magnitude. Left-out runs (status, convergence) are counted in the title.
    """
    require_columns(runs, [target])
    measures = measure_columns(runs) if measures is None else list(measures)
    if not measures:
        raise ValueError("runs table has no measure column (names start with 'm_')")
    require_columns(runs, measures)
    sel = _usable(runs, require_converged)
    use = sel.runs
    if hue is None:
        axes = axis_columns(use, nuisance=False, varying=True)
        hue = max(axes, key=lambda a: use[a].nunique(dropna=False)) if axes else None
    elif hue not in use.columns:
        raise ValueError(f"hue column {hue!r} is not in the runs table")
    g = numeric_column(use, target)
    if hue is not None:
        # Keyed by label, not value: NaN (an axis a combined study lacks) is not == NaN.
        labels = list(dict.fromkeys(_value_label(v) for v in _sorted_levels(use[hue])))
        palette = dict(zip(labels, sns.color_palette("viridis", len(labels)), strict=True))
    with _style():
        fig, axs = _grid(len(measures), ncols, panel)
        for ax, m in zip(axs, measures, strict=True):
            mu = numeric_column(use, m)
            ok = np.isfinite(mu) & np.isfinite(g)
            tau = kendall_tau(mu[ok], g[ok], variant=variant) if ok.sum() >= 2 else np.nan
            tau_text = "τ = n/a" if not np.isfinite(tau) else f"τ = {tau:.2f}"
            _style_title(ax, m, f"{tau_text}  (n = {int(ok.sum())})")
            if not ok.any():
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            colors = ([palette[_value_label(v)] for v in use.loc[ok, hue]] if hue is not None
                      else OURS_COLOR if is_ours(m) else BASE_COLOR)
            ax.scatter(mu[ok], g[ok], c=colors, s=14, alpha=0.85, linewidths=0.3,
                       edgecolors="white")
            if _wants_log(mu[ok]):
                ax.set_xscale("log")
                _tidy_log_ticks(ax, max_ticks=5)
            ax.set_xlabel(short_name(m))
            ax.set_ylabel(target)
        if hue is not None:
            handles = [Line2D([], [], marker="o", ls="", color=c, label=lab)
                       for lab, c in palette.items()]
            fig.legend(handles=handles, title=short_name(hue), loc="outside right upper")
        fig.suptitle(f"measures vs {target}: {sel.summary()}", fontsize=8)
        return _save(fig, out, dpi)


# -------------------------------------------------------------------- tau and Psi


def plot_tau_psi(
    table, out: str | os.PathLike, *, targets: Sequence[str] | None = None,
    panel_width: float = PANEL[0], dpi: int = 300,
) -> list[Path]:
    """Kendall tau and Psi of each measure with their confidence intervals, one panel per
    target.

    ``table`` is the output of :func:`~convflat.analysis.stats.correlation_table` or the path
    of its CSV. Rows are measures (ours in red, bold, on a shaded band); tau is a filled
    circle with its bootstrap CI over runs, Psi an open square with its bootstrap CI over
    groups. A value that is NaN is simply not drawn (the table's note says why).
    """
    table = _table(table)
    targets = table_targets(table) if targets is None else list(targets)
    missing = [t for t in targets if f"{t}.tau" not in table.columns]
    if missing or not targets:
        raise ValueError(f"correlation table has no '<target>.tau' column for {missing or 'any'}")
    names = [_label("m_" + m) for m in table.index]
    y = np.arange(len(names), dtype=float)
    with _style():
        fig = Figure(figsize=(panel_width * len(targets), 0.3 * len(names) + 1.2),
                     layout="constrained")
        axs = np.atleast_1d(fig.subplots(1, len(targets), sharey=True, squeeze=False).ravel())
        for ax, t in zip(axs, targets, strict=True):
            for k, m in enumerate(table.index):
                color = OURS_COLOR if _label("m_" + m).endswith("(ours)") else BASE_COLOR
                if color == OURS_COLOR:
                    ax.axhspan(k - 0.45, k + 0.45, color=OURS_COLOR, alpha=0.08, lw=0)
                drawn = False
                for stat, dy, marker, face in (("tau", -0.15, "o", color),
                                               ("psi", 0.15, "s", "white")):
                    v = table.loc[m, f"{t}.{stat}"] if f"{t}.{stat}" in table else np.nan
                    if not np.isfinite(v):
                        continue
                    drawn = True
                    lo = table.loc[m, f"{t}.{stat}_lo"] if f"{t}.{stat}_lo" in table else np.nan
                    hi = table.loc[m, f"{t}.{stat}_hi"] if f"{t}.{stat}_hi" in table else np.nan
                    if np.isfinite(lo) and np.isfinite(hi):
                        ax.plot([lo, hi], [k + dy, k + dy], color=color, lw=1.2)
                    ax.plot([v], [k + dy], marker=marker, ms=5, color=color, mfc=face,
                            mew=1.2, ls="")
                if not drawn:  # the table's note says why
                    ax.text(0.5, k, "undefined", color="0.4", ha="center", va="center",
                            fontsize=6, fontstyle="italic")
            ax.axvline(0.0, color="0.3", lw=0.8)
            ax.set_xlim(-1.05, 1.05)
            ax.set_xticks([-1.0, -0.5, 0.0, 0.5, 1.0])
            ax.set_title(t)
            ax.set_xlabel("correlation with " + t)
        axs[0].set_yticks(y, names)
        axs[0].set_ylim(len(names) - 0.5, -0.5)  # first measure on top
        _bold_ours_ticks(axs[0].get_yticklabels())
        handles = [
            Line2D([], [], marker="o", color="0.25", label="τ (Kendall), bootstrap CI"),
            Line2D([], [], marker="s", color="0.25", mfc="white", label="Ψ (granulated), CI"),
        ]
        fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
        return _save(fig, out, dpi)


def plot_psi_heatmap(
    table, out: str | os.PathLike, *, targets: Sequence[str] | None = None,
    with_psi: bool = True, dpi: int = 300,
) -> list[Path]:
    """Heatmap of psi_i, measures (rows) by hyperparameter axes (columns), one panel per
    target, annotated, diverging colour map on [-1, 1] centred at 0. ``with_psi`` adds the
    mean Psi as a last column. ``table`` as in :func:`plot_tau_psi`. NaN cells stay blank."""
    table = _table(table)
    targets = table_targets(table) if targets is None else list(targets)
    if not targets:
        raise ValueError("correlation table has no '<target>.tau' column")
    names = [_label("m_" + m) for m in table.index]
    with _style():
        mats = []
        for t in targets:
            cols = [c for c in table.columns if str(c).startswith(f"{t}.psi[")]
            if with_psi and f"{t}.psi" in table.columns:
                cols.append(f"{t}.psi")
            mat = table[cols].astype(float)
            mat.columns = [c[len(t) + 5 : -1] if c.endswith("]") else "Ψ" for c in cols]
            mat.index = names
            mats.append(mat)
        width = sum(0.5 * max(1, m.shape[1]) + 1.6 for m in mats) + 0.6
        fig = Figure(figsize=(max(3.5, width), 0.28 * len(names) + 1.3), layout="constrained")
        axs = np.atleast_1d(fig.subplots(1, len(targets), squeeze=False).ravel())
        for k, (ax, t, mat) in enumerate(zip(axs, targets, mats, strict=True)):
            if mat.shape[1] == 0 or not np.isfinite(mat.to_numpy()).any():
                ax.text(0.5, 0.5, "no hyperparameter axis\nwith a usable group",
                        ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                ax.set_title(t)
                continue
            text = mat.map(lambda v: "" if not np.isfinite(v) else _num(v))
            ax.set_facecolor("0.93")  # NaN cells (undefined psi_i) show as light grey
            with warnings.catch_warnings():  # seaborn 0.13 calls Colormap.set_bad
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                sns.heatmap(mat, ax=ax, vmin=-1, vmax=1, center=0, cmap="vlag", annot=text,
                            fmt="", annot_kws={"size": 6}, linewidths=0.5,
                            linecolor="white", cbar=k == len(targets) - 1,
                            cbar_kws={"label": "ψ", "shrink": 0.8}, yticklabels=k == 0,
                            square=False)
            ax.grid(False)
            ax.set_title(t)
            ax.tick_params(axis="x", rotation=45)
            for lab in ax.get_xticklabels():
                lab.set_horizontalalignment("right")
                lab.set_rotation_mode("anchor")
            if k == 0:
                _bold_ours_ticks(ax.get_yticklabels())
        return _save(fig, out, dpi)


def plot_sign_error(
    tables: Mapping[str, pd.DataFrame], out: str | os.PathLike, *, dpi: int = 300,
) -> list[Path]:
    """Heatmap of the sign error (Dziugaite et al. 2020) of each measure (rows) per
    hyperparameter family (columns, with the number of pairs) and its mean, one panel per
    target; 0 = every pair ordered as the target orders it, 0.5 = a coin flip, 1 = every
    pair the wrong way. ``tables``: target -> :func:`~convflat.analysis.robustness.
    sign_error_table` (its index the row labels). NaN cells (no pair) stay grey."""
    if not tables:
        raise ValueError("plot_sign_error needs at least one target's sign-error table")
    with _style():
        mats = {}
        for t, se in tables.items():
            fams = [c for c in se.columns if not str(c).startswith("pairs[")
                    and c not in ("mean", "worst", "worst_family")]
            mat = se[[*fams, "mean"]].astype(float)
            mat.columns = [f"{f}\n({int(se[f'pairs[{f}]'].max())})" for f in fams] + ["mean"]
            mat.index = [m if is_control(m) else _label("m_" + str(m)) for m in se.index]
            mats[t] = mat
        rows = max(len(m) for m in mats.values())
        width = sum(0.55 * m.shape[1] + 1.8 for m in mats.values()) + 0.6
        fig = Figure(figsize=(max(3.5, width), 0.28 * rows + 1.4), layout="constrained")
        axs = np.atleast_1d(fig.subplots(1, len(mats), squeeze=False).ravel())
        for k, (ax, (t, mat)) in enumerate(zip(axs, mats.items(), strict=True)):
            ax.set_facecolor("0.93")
            with warnings.catch_warnings():  # seaborn 0.13 calls Colormap.set_bad
                warnings.simplefilter("ignore", PendingDeprecationWarning)
                sns.heatmap(mat, ax=ax, vmin=0, vmax=1, cmap="rocket_r",
                            annot=mat.map(lambda v: "" if not np.isfinite(v) else f"{v:.2f}"),
                            fmt="", annot_kws={"size": 6}, linewidths=0.5, linecolor="white",
                            cbar=k == len(mats) - 1, yticklabels=k == 0,
                            cbar_kws={"label": "sign error", "shrink": 0.8})
            ax.grid(False)
            ax.set_title(f"{t}: sign error per family (pairs)")
            if k == 0:
                _bold_ours_ticks(ax.get_yticklabels())
        return _save(fig, out, dpi)


def placeholder_figure(out: str | os.PathLike, message: str, *, dpi: int = 150) -> list[Path]:
    """A figure that only says why there is nothing to draw (a study with too few runs), so
    that a rule's outputs exist and the rest of the study is still reported."""
    with _style():
        fig = Figure(figsize=PANEL, layout="constrained")
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 40)), ha="center", va="center",
                fontsize=7)
        return _save(fig, out, dpi)


def plot_tau_along_training(
    tables: Mapping[str, pd.DataFrame], out: str | os.PathLike, *,
    panel: tuple[float, float] = PANEL, dpi: int = 300,
) -> list[Path]:
    """Kendall tau of each tracked measure with the final target against the training loss
    at which it was read (:func:`~convflat.analysis.along.tau_along_training`), one panel per
    target; training runs from left (high loss) to right (the target). Ours in red with
    their bootstrap interval as a band, the baselines in blue-grey."""
    if not tables:
        raise ValueError("plot_tau_along_training needs at least one target's table")
    with _style():
        fig, axs = _grid(len(tables), len(tables), panel)
        for ax, (target, table) in zip(axs, tables.items(), strict=True):
            for m, grp in table.groupby("measure", sort=False):
                grp = grp.sort_values("loss_level")
                ours = bool(grp["ours"].iloc[0])
                kw = ({"color": OURS_COLOR, "lw": 1.6, "zorder": 3} if ours
                      else {"color": BASE_COLOR, "lw": 0.8, "alpha": 0.6})
                ax.plot(grp["loss_level"], grp["tau"], marker="o", ms=2.5,
                        label=f"{m} (ours)" if ours else m, **kw)
                if ours:
                    ax.fill_between(grp["loss_level"], grp["tau_lo"], grp["tau_hi"],
                                    color=OURS_COLOR, alpha=0.12, lw=0)
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.axhline(0, color="0.5", lw=0.6)
            ax.set_xlabel("training loss where the measure is read")
            ax.set_ylabel(f"Kendall τ with final {target}")
            ax.set_title(target)
        axs[0].legend(fontsize=5, loc="best")
        return _save(fig, out, dpi)


# ---------------------------------------------------------------- validation figures


def plot_hutchinson_convergence(
    df: pd.DataFrame, exact: float, out: str | os.PathLike, *, band: float = 1.96,
    relative: bool = True, title: str | None = None, dpi: int = 300,
) -> list[Path]:
    """Stochastic trace estimates against the number of probes, with the exact trace.

    ``df`` has columns ``probes``, ``estimate``, ``stderr`` and optionally ``method``
    (e.g. ``hutchinson``, ``hutchpp``), one row per (method, probes). Left panel: the
    estimate and the band estimate +- ``band`` * stderr (1.96: a 95 % normal interval) on a
    log probe axis, the exact value as a dashed line. Right panel (``relative=True``): the
    relative error |estimate - exact| / |exact| and ``band`` * stderr / |exact| on log-log
    axes, where Hutchinson's m^(-1/2) decay is a straight line (absolute error if exact = 0).
    """
    require_columns(df, ["probes", "estimate", "stderr"], "convergence table")
    if not np.isfinite(exact):
        raise ValueError(f"exact must be finite, got {exact}")
    df = df.copy()
    if "method" not in df.columns:
        df["method"] = "hutchinson"
    for c in ("probes", "estimate", "stderr"):
        df[c] = numeric_column(df, c)
    dup = df.duplicated(["method", "probes"], keep=False)
    if dup.any():
        r = df.loc[dup].iloc[0]
        raise ValueError(f"convergence table has several rows for method={r['method']!r}, "
                         f"probes={r['probes']:g}; aggregate repeats first")
    if df.empty:
        raise ValueError("convergence table is empty")
    methods = list(dict.fromkeys(df["method"]))
    colors = dict(zip(methods, sns.color_palette("colorblind", len(methods)), strict=True))
    scale = abs(exact) if exact != 0 else 1.0
    with _style():
        fig = Figure(figsize=(PANEL[0] * (2 if relative else 1), PANEL[1]),
                     layout="constrained")
        axs = np.atleast_1d(fig.subplots(1, 2 if relative else 1, squeeze=False).ravel())
        ax = axs[0]
        for m in methods:
            d = df[df["method"] == m].sort_values("probes")
            p, e, s = d["probes"].to_numpy(), d["estimate"].to_numpy(), d["stderr"].to_numpy()
            ax.plot(p, e, marker="o", ms=3, color=colors[m], label=str(m))
            ax.fill_between(p, e - band * s, e + band * s, color=colors[m], alpha=0.2, lw=0)
        ax.axhline(exact, color="k", ls="--", lw=1, label="exact")
        if (df["probes"] > 0).all():
            ax.set_xscale("log")
        _tidy_log_ticks(ax)
        ax.set_xlabel("probes")
        ax.set_ylabel("trace estimate")
        ax.legend(title=f"band: ±{band:g} s.e.")
        if relative:
            ax = axs[1]
            for m in methods:
                d = df[df["method"] == m].sort_values("probes")
                p = d["probes"].to_numpy()
                err = np.abs(d["estimate"].to_numpy() - exact) / scale
                ax.plot(p, err, marker="o", ms=3, ls="", color=colors[m], label=f"{m} error")
                ax.plot(p, band * d["stderr"].to_numpy() / scale, color=colors[m], ls="--",
                        label=f"{m} ±{band:g} s.e.")
            pos = df["probes"] > 0
            if pos.all():
                ax.set_xscale("log")
            ax.set_yscale("log")
            _tidy_log_ticks(ax)
            ax.set_xlabel("probes")
            ax.set_ylabel("relative error" if exact != 0 else "absolute error")
            ax.legend()
        if title:
            fig.suptitle(title, fontsize=8)
        return _save(fig, out, dpi)


FALSE_FRIEND_COLUMNS = ("test_error", "m_hutchinson_trace", "m_conv_trace",
                        "m_conv_relative_flatness")


def plot_false_friend(
    runs: pd.DataFrame, out: str | os.PathLike, *, axis: str = "hp_weight_decay",
    columns: Sequence[str] | None = None, hue: str | None = None, ncols: int = 4,
    panel: tuple[float, float] = (2.6, 2.3), require_converged: bool = True,
    dpi: int = 300,
) -> list[Path]:
    """The "flatness is a false friend" figure (Granziol 2020, arXiv 2006.09091): test
    error and curvature measures against weight decay, one panel per column.

    ``columns`` default: those of ``test_error``, ``m_hutchinson_trace``, ``m_conv_trace``
    and ``m_conv_relative_flatness`` that the table has (at least ``test_error`` and one
    measure). Each panel shows the mean over runs at each value of ``axis`` (a line) with
    +- one standard deviation (a band) and every run as a faint dot; with seeds as the only
    other varying axis this is the spread over seeds. Runs that differ in other axes are
    pooled unless ``hue`` names one of them (then one line per value). The x axis is
    logarithmic (symmetric-log with a linear part below the smallest positive value when
    0 is among the values); a y axis is logarithmic when the column is positive and spans
    more than two orders of magnitude. What a given sweep shows (does test error rise or
    fall, which measures call the better-generalizing nets sharper) is
    :func:`false_friend_caption`, computed from the same runs.
    """
    require_columns(runs, [axis])
    if columns is None:
        columns = [c for c in FALSE_FRIEND_COLUMNS if c in runs.columns]
        if "test_error" not in columns or len(columns) < 2:
            raise ValueError(
                f"false-friend figure needs 'test_error' and one of {FALSE_FRIEND_COLUMNS[1:]};"
                f" the runs table has {[c for c in FALSE_FRIEND_COLUMNS if c in runs.columns]}")
    else:
        columns = list(columns)
        require_columns(runs, columns)
    if hue is not None:
        require_columns(runs, [hue])
    sel = _usable(runs, require_converged)
    use = sel.runs.copy()
    use[axis] = numeric_column(use, axis)
    x = use[axis].to_numpy()
    others = [a for a in axis_columns(use, nuisance=False, varying=True) if a not in (axis, hue)]
    with _style():
        fig, axs = _grid(len(columns), ncols, panel)
        for ax, col in zip(axs, columns, strict=True):
            use[col] = numeric_column(use, col)
            d = use[np.isfinite(use[col].to_numpy()) & np.isfinite(x)]
            _style_title(ax, col)
            if d.empty:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            color = OURS_COLOR if is_ours(col) else BASE_COLOR
            kw = {"hue": hue, "palette": "viridis"} if hue else {"color": color}
            sns.lineplot(d, x=axis, y=col, estimator="mean", errorbar="sd", marker="o",
                         ms=4, ax=ax, legend=bool(hue) and ax is axs[0], **kw)
            ax.scatter(d[axis], d[col], s=6, alpha=0.35,
                       color="0.3" if hue else color, linewidths=0)
            xs = d[axis].to_numpy()
            if (xs > 0).all():
                ax.set_xscale("log")
            elif (xs >= 0).all() and (xs > 0).any():
                ax.set_xscale("symlog", linthresh=float(xs[xs > 0].min()))
            if _wants_log(d[col].to_numpy()):
                ax.set_yscale("log")
            _tidy_log_ticks(ax)
            levels = np.unique(xs)  # every swept value labelled, no other tick
            ax.xaxis.set_major_locator(mticker.FixedLocator(levels))
            ax.xaxis.set_minor_locator(mticker.NullLocator())
            ax.set_xticklabels([_value_label(v) for v in levels], rotation=45, ha="right")
            ax.set_xlabel(short_name(axis))
            ax.set_ylabel(short_name(col))
        note = f"mean ± sd; {sel.summary()}"
        if others:
            note += "; pooled over " + ", ".join(short_name(a) for a in others)
        fig.suptitle(note, fontsize=7)
        return _save(fig, out, dpi)


#: What the false-friend caption calls each curvature column.
_FALSE_FRIEND_NAMES = {
    "m_hutchinson_trace": "the Hessian trace of the whole network (Hutchinson)",
    "m_conv_trace": "the exact Hessian trace of the last conv layer",
    "m_conv_relative_flatness": "the conv-layer relative flatness",
}


def _pct(v: float) -> str:
    return f"{100 * v:.1f} %"


def _welch(a: np.ndarray, b: np.ndarray, level: float) -> tuple[float, float, float]:
    """mean(a) - mean(b) with its Welch t interval (unequal variances), NaN ends when a
    side has fewer than 2 runs or both have no spread."""
    diff = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return diff, float("nan"), float("nan")
    ci = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(level)
    return diff, float(ci.low), float(ci.high)


def _direction(lo: float, hi: float) -> int:
    """+1 / -1 when the interval lies above / below 0, 0 when it contains 0 or is NaN."""
    return 1 if lo > 0 else -1 if hi < 0 else 0


def _ff_levels(runs: pd.DataFrame, axis: str, col: str) -> tuple[np.ndarray, np.ndarray]:
    """The finite ``col`` values at the smallest and at the largest value of ``axis``."""
    x, y = numeric_column(runs, axis), numeric_column(runs, col)
    ok = np.isfinite(x) & np.isfinite(y)
    lo, hi = np.min(x[ok]), np.max(x[ok])
    return y[ok & (x == lo)], y[ok & (x == hi)]


def _ff_epochs(use: pd.DataFrame, axis: str, lo_wd: float, hi_wd: float) -> str:
    if "epochs_run" not in use.columns:
        return ""
    lo, hi = _ff_levels(use, axis, "epochs_run")
    if not (lo.size and hi.size):
        return ""
    med_hi, med_lo = float(np.median(hi)), float(np.median(lo))
    longer = med_hi > 2 * med_lo or med_lo > 2 * med_hi
    text = (f"{'Training length is confounded with weight decay: t' if longer else 'T'}he "
            f"nets at {hi_wd:g} trained {hi.min():.0f}-{hi.max():.0f} epochs (median "
            f"{med_hi:.0f}), those at {lo_wd:g} {lo.min():.0f}-{lo.max():.0f} (median "
            f"{med_lo:.0f})")
    return text + (", so the effect is of weight decay and of longer training together."
                   if longer else ".")


def _ff_measure(use: pd.DataFrame, axis: str, col: str, err_dir: int, level: float) -> str:
    lo, hi = _ff_levels(use, axis, col)
    name = _FALSE_FRIEND_NAMES[col]
    name = name[0].upper() + name[1:]
    if lo.size == 0 or hi.size == 0:
        return f"{name}: no finite value at one end of the sweep."
    diff, a, b = _welch(hi, lo, level)
    moved = _direction(a, b)
    ci = (f"{level:.0%} CI [{a:+.3g}, {b:+.3g}]" if np.isfinite(a)
          else "no spread across seeds, no interval")
    text = f"{name} goes from {np.mean(lo):.3g} to {np.mean(hi):.3g} (difference {diff:+.3g}, {ci})"
    if moved == 0:
        return text + ": no change beyond seed noise."
    if err_dir == 0:
        return text + "."
    sharper = moved > 0  # the nets at the large weight decay measure sharper
    better = err_dir < 0  # the nets at the large weight decay generalize better
    if sharper == better:
        return text + ": it calls the better-generalizing nets sharper."
    return text + ": it calls the better-generalizing nets flatter."


def false_friend_caption(runs: pd.DataFrame, *, axis: str = "hp_weight_decay",
                         require_converged: bool = True, level: float = 0.95) -> str:
    """What the false-friend figure shows, in words computed from its usable runs, with
    the uncertainty across seeds: the mean test error at the smallest and at the largest
    weight decay and their difference with a Welch t interval at ``level`` (when it
    contains 0 the caption says the sweep cannot separate the effect from seed noise); the
    epochs each end trained (weight decay that slows training confounds the comparison);
    then for each curvature measure of :data:`FALSE_FRIEND_COLUMNS` the same difference and
    whether it calls the better-generalizing nets sharper (a larger value is sharper for
    every one of them, the relative flatness included: it is a sharpness)."""
    require_columns(runs, [axis, "test_error"])
    sel = _usable(runs, require_converged)
    use = sel.runs
    wd = numeric_column(use, axis)
    if np.isfinite(wd).sum() < 2 or len(np.unique(wd[np.isfinite(wd)])) < 2:
        return (f"Too few usable runs to say how test error moves with weight decay "
                f"({sel.summary()}).")
    lo_wd, hi_wd = float(np.nanmin(wd)), float(np.nanmax(wd))
    lo, hi = _ff_levels(use, axis, "test_error")
    diff, a, b = _welch(hi, lo, level)
    err_dir = _direction(a, b)
    verb = {1: "raises the test error", -1: "lowers the test error",
            0: "does not change the test error beyond seed noise"}[err_dir]
    text = [f"Weight decay {hi_wd:g} {verb}: {_pct(np.mean(hi))} ({hi.size} "
            f"runs) against {_pct(np.mean(lo))} at {lo_wd:g} ({lo.size} runs), a difference of "
            f"{100 * diff:+.1f} points ("
            + (f"{level:.0%} CI [{100 * a:+.1f}, {100 * b:+.1f}], Welch t interval across seeds)"
               if np.isfinite(a) else "too few runs per end for an interval)")
            + (": the sweep cannot separate the effect from seed noise." if err_dir == 0
               else ".")]
    text.append(_ff_epochs(use, axis, lo_wd, hi_wd))
    for col in FALSE_FRIEND_COLUMNS[1:]:
        if col in use.columns:
            text.append(_ff_measure(use, axis, col, err_dir, level))
    text.append(f"{sel.summary()}.")
    return " ".join(t for t in text if t)


# ------------------------------------------------------------ flatness over training

#: The per-epoch flatness keys of a ``train.json`` history that the figure draws (their one
#: definition is :data:`convflat.records.FLATNESS_KEYS`).
FLATNESS_KEYS = tuple(_RECORD_FLATNESS_KEYS)
_AUTO_LOSS_KEYS = ("train_loss_eval", "loss")


def load_histories(paths: Sequence[str | os.PathLike], *,
                   labels: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Read the ``history`` of each ``train.json`` in ``paths``: ``{label: history}``.

    ``labels`` default: each file's folder relative to the folder all of them share (the run
    id, e.g. ``width~8/seed~0``), or the folder's name for a single file. Raises
    FileNotFoundError naming a missing file and ValueError naming a file without a history.
    """
    paths = [Path(p) for p in paths]
    if labels is not None and len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels for {len(paths)} train.json files")
    if labels is None:
        parents = [p.parent.resolve() for p in paths]
        root = Path(os.path.commonpath(parents)) if len(parents) > 1 else None
        labels = [str(q.relative_to(root)) if root is not None and q != root else q.name
                  for q in parents]
    out: dict[str, list[dict]] = {}
    for label, path in zip(labels, paths, strict=True):
        if not path.is_file():
            raise FileNotFoundError(f"training record {path} does not exist")
        record = json.loads(path.read_text())
        history = record.get("history") if isinstance(record, Mapping) else None
        if not isinstance(history, list):
            raise ValueError(f"{path} has no 'history' list")
        if label in out:
            raise ValueError(f"two training records share the label {label!r}")
        out[str(label)] = history
    return out


def _histories(histories) -> dict[str, Sequence[Mapping]]:
    """``{label: [entry, ...]}`` from a mapping or a sequence of histories or records."""
    items = (list(histories.items()) if isinstance(histories, Mapping)
             else [(f"run {k}", h) for k, h in enumerate(histories)])
    if not items:
        raise ValueError("no histories to plot")
    out = {}
    for label, h in items:
        if isinstance(h, Mapping):  # a whole train.json record
            if "history" not in h:
                raise ValueError(f"record of run {label!r} has no 'history'")
            h = h["history"]
        if not isinstance(h, Sequence) or isinstance(h, (str, bytes)) or not len(h):
            raise ValueError(f"history of run {label!r} is empty or not a list of epochs")
        out[str(label)] = h
    return out


def _checked_history_keys(runs: Mapping[str, Sequence[Mapping]], measures: Sequence[str],
                          loss_key: str | None) -> str:
    """The loss key to draw against (``train_loss_eval`` where every epoch has a finite one,
    else ``loss``, unless given); raises naming the run and epoch that lacks a key."""
    if loss_key is None:
        loss_key = next((k for k in _AUTO_LOSS_KEYS if all(
            isinstance(e, Mapping) and np.isfinite(finite_or_nan(e.get(k)))
            for h in runs.values() for e in h)), "loss")
    need = [loss_key, *measures]
    for label, h in runs.items():
        for k, entry in enumerate(h):
            if not isinstance(entry, Mapping):
                raise ValueError(f"history of run {label!r}: entry {k} is not a dict")
            missing = [key for key in need if key not in entry]
            if missing:
                raise ValueError(
                    f"history of run {label!r}, epoch {entry.get('epoch', k + 1)}, lacks "
                    f"key(s) {missing} (has {sorted(map(str, entry))}); the flatness over "
                    "training needs the per-epoch measures in train.json's history")
    return loss_key


def plot_flatness_over_training(
    histories, out: str | os.PathLike, *, measures: Sequence[str] = FLATNESS_KEYS,
    loss_key: str | None = None, hue: Mapping[str, object] | None = None,
    hue_name: str = "", stop_loss: float | None = None, ncols: int = 2,
    panel: tuple[float, float] = PANEL, dpi: int = 300,
) -> list[Path]:
    """Flatness against training loss along training, one line per run, one panel per
    measure: are the nets compared on the same part of their trajectories?

    ``histories``: ``{run label: history}`` (e.g. from :func:`load_histories`), or a list of
    histories; a history is the list of per-epoch dicts of ``train.json`` (or the whole
    record, with its ``history``). Every epoch must carry ``loss_key`` and every key of
    ``measures`` (default ``conv_trace`` and ``conv_relative_flatness``); a value that is
    None or not finite (a measure not computed that epoch) is skipped. ``loss_key`` default:
    ``train_loss_eval`` (eval mode, full training split: the loss the stopping rule
    measures) when every epoch of every run has a finite one, else ``loss`` (the mean
    training loss over the epoch's steps).

    The x axis (training loss) runs from high to low, so training goes left to right; an
    axis is logarithmic when its values are positive and span more than one decade. The
    last epoch of each run (where it stopped) is a dot; ``stop_loss`` draws the target as a
    dashed line. Lines are coloured by ``hue`` (``{label: value}``, e.g. an axis of the
    grid, with a legend titled ``hue_name``) or all in one colour.

    Raises ValueError naming the run, the epoch and the missing keys when an epoch lacks
    one, and when no run has two finite points of any measure.
    """
    runs = _histories(histories)
    measures = list(measures)
    if not measures:
        raise ValueError("measures must name at least one history key")
    loss_key = _checked_history_keys(runs, measures, loss_key)
    if hue is not None:
        absent = [label for label in runs if label not in hue]
        if absent:
            raise ValueError(f"hue has no value for run(s) {absent[:5]}")
        levels = list(dict.fromkeys(_value_label(v) for v in _sorted_levels(
            pd.Series([hue[label] for label in runs], dtype=object))))
        palette = dict(zip(levels, sns.color_palette("viridis", len(levels)), strict=True))
    data = {label: (np.array([finite_or_nan(e[loss_key]) for e in h]),
                    {m: np.array([finite_or_nan(e[m]) for e in h]) for m in measures})
            for label, h in runs.items()}
    if not any(np.sum(np.isfinite(x) & np.isfinite(ys[m])) >= 2
               for x, ys in data.values() for m in measures):
        raise ValueError(f"no run has two epochs with a finite {loss_key} and one of "
                         f"{measures}: nothing to draw")
    with _style():
        fig, axs = _grid(len(measures), ncols, panel)
        for ax, m in zip(axs, measures, strict=True):
            col = "m_" + m
            _style_title(ax, col, f"{len(runs)} runs")
            xs_all, ys_all = [], []
            for label, (x, ys) in data.items():
                y = ys[m]
                ok = np.isfinite(x) & np.isfinite(y)
                if not ok.any():
                    continue
                color = (palette[_value_label(hue[label])] if hue is not None
                         else OURS_COLOR if is_ours(col) else BASE_COLOR)
                ax.plot(x[ok], y[ok], color=color, lw=0.9, alpha=0.7)
                ax.plot(x[ok][-1:], y[ok][-1:], marker="o", ms=3, color=color, ls="")
                xs_all.append(x[ok])
                ys_all.append(y[ok])
            if not xs_all:
                ax.text(0.5, 0.5, "no finite values", ha="center", va="center",
                        transform=ax.transAxes)
                continue
            if stop_loss is not None:
                ax.axvline(stop_loss, color="0.3", ls="--", lw=0.8)
                xs_all.append(np.array([stop_loss]))
            xv, yv = np.concatenate(xs_all), np.concatenate(ys_all)
            for values, setter in ((xv, ax.set_xscale), (yv, ax.set_yscale)):
                if values.size >= 2 and (values > 0).all() and values.max() > 10 * values.min():
                    setter("log")
            ax.invert_xaxis()
            _tidy_log_ticks(ax)
            ax.set_xlabel(f"training loss ({loss_key})")
            ax.set_ylabel(short_name(col))
        if hue is not None:
            handles = [Line2D([], [], color=c, label=lab) for lab, c in palette.items()]
            fig.legend(handles=handles, title=hue_name or None, loc="outside right upper")
        fig.suptitle("flatness over training (dot: where each run stopped)", fontsize=8)
        return _save(fig, out, dpi)
