r"""Tables of the statistics and of the runs, in CSV, Markdown and LaTeX (booktabs).

:func:`write_correlation_table` writes ``<prefix>.csv`` (every column of
:func:`~convflat.analysis.stats.correlation_table`, full precision), ``<prefix>.md`` (one
table per target, best value of each statistic in bold) and ``<prefix>.tex`` (one booktabs
``tabular`` with a column group per target, best value in ``\textbf``; it needs only
``\usepackage{booktabs}`` and is meant to be ``\input`` inside a ``table`` environment).
:func:`write_runs_summary` does the same for the runs themselves. Every output states how
many runs were used and how many were left out, and why. Files are written atomically.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from convflat.analysis.controls import is_control
from convflat.analysis.runs import (
    OURS,
    axis_columns,
    measure_columns,
    select_runs,
    short_name,
)
from convflat.io import atomic_write_text

__all__ = [
    "SETTING_COLUMNS",
    "TABLE_STATS",
    "correlation_latex",
    "correlation_markdown",
    "read_correlation_table",
    "runs_summary_table",
    "table_targets",
    "write_correlation_table",
    "write_runs_summary",
]

#: Statistics the Markdown and LaTeX correlation tables can show, in this order.
TABLE_STATS = ("tau", "spearman", "pearson", "psi", "psi_axes", "cmi")

_MD_HEAD = {"tau": "τ [CI]", "spearman": "ρ", "pearson": "r", "psi": "Ψ [CI]", "cmi": "CMI"}
_TEX_HEAD = {"tau": r"$\tau$", "spearman": r"$\rho$", "pearson": r"$r$", "psi": r"$\Psi$",
             "cmi": "CMI"}
_LEGEND = (
    "τ: Kendall's tau{variant} with {ci}; ρ: Spearman; r: Pearson (raw values); "
    "Ψ: granulated Kendall coefficient (Jiang et al. 2020) with a bootstrap CI over groups; "
    "ψ(axis): its value per hyperparameter axis; CMI: conditional mutual information of the "
    "orderings, minimum over conditioning sets of at most 2 axes (Jiang et al. 2020; PGDL). "
    "Positive values: the measure grows with the target. Best value of each column among the "
    "measures in bold. Rows control:<name> rank the runs by what is known without any "
    "measure (the stopped training loss, the epochs, the parameter count, a grid "
    "hyperparameter); a measure worth having beats them."
)


# ------------------------------------------------------------------------- helpers


def _write(path: Path, text: str) -> Path:
    return atomic_write_text(path, text if text.endswith("\n") else text + "\n")


def _prefix(prefix: str | os.PathLike) -> Path:
    """``results/x/correlation`` or ``.../correlation.csv`` -> ``results/x/correlation``."""
    p = Path(prefix)
    return p.with_suffix("") if p.suffix in (".csv", ".md", ".tex") else p


def _tex_escape(text: str) -> str:
    repl = {"\\": r"\textbackslash{}", "_": r"\_", "%": r"\%", "&": r"\&", "#": r"\#",
            "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
            "^": r"\textasciicircum{}", "<": r"\textless{}", ">": r"\textgreater{}",
            "|": r"\textbar{}"}  # < > | print as other glyphs in OT1 text mode
    return "".join(repl.get(ch, ch) for ch in str(text))


def _md_escape(text: str) -> str:
    return str(text).replace("|", r"\|")


def _num(v: float, digits: int) -> str:
    """Fixed-point text without a negative zero (-4e-18 shows as 0.00, not -0.00)."""
    r = round(float(v), digits)
    return f"{(0.0 if r == 0 else r):.{digits}f}"


def _fmt(v: float, digits: int) -> str:
    return "–" if v is None or not np.isfinite(v) else _num(v, digits)


def _tex_num(v: float, digits: int, bold: bool = False) -> str:
    """A number in text mode with a true minus sign, in ``\\textbf`` when ``bold``."""
    if v is None or not np.isfinite(v):
        return "--"
    s = _num(v, digits).replace("-", "$-$")
    return rf"\textbf{{{s}}}" if bold else s


def _best_mask(values: Sequence[float], digits: int) -> list[bool]:
    """True where the value, rounded as displayed, equals the column's largest."""
    vals = np.asarray(values, dtype=np.float64)
    if not np.isfinite(vals).any():
        return [False] * len(vals)
    best = round(float(np.nanmax(vals)), digits)
    return [bool(np.isfinite(v) and round(float(v), digits) == best) for v in vals]


def _measures_only(table: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    """``values`` with the control rows blanked: a control is never marked best."""
    control = np.array([is_control(m) for m in table.index], dtype=bool)
    return np.where(control, np.nan, np.asarray(values, dtype=np.float64))


def table_targets(table: pd.DataFrame) -> list[str]:
    """The targets of a correlation table, from its ``<target>.tau`` columns, in order."""
    return [c[: -len(".tau")] for c in table.columns if str(c).endswith(".tau")]


def _table_axes(table: pd.DataFrame, target: str) -> list[str]:
    pat = re.compile(re.escape(target) + r"\.psi\[(.+)\]$")
    return [m.group(1) for c in table.columns if (m := pat.match(str(c)))]


#: Per-table settings kept as constant columns of the CSV (CSV has no ``attrs``).
SETTING_COLUMNS = ("n_runs", "n_excluded", "n_boot", "level", "seed", "variant")


def _with_settings(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with a column for every setting of :data:`SETTING_COLUMNS` that is only in
    its ``attrs`` (a table built before those columns existed), so that its CSV keeps it."""
    missing = {c: table.attrs[c] for c in SETTING_COLUMNS
               if c not in table.columns and c in table.attrs}
    if not missing:
        return table
    out = table.assign(**missing)
    out.attrs = dict(table.attrs)
    return out


def read_correlation_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``correlation.csv`` back (index ``measure``).

    CSV has no ``attrs``: the settings stored as constant columns (:data:`SETTING_COLUMNS`:
    ``n_runs``, ``n_excluded``, ``n_boot``, ``level``, ``seed``, ``variant``) are copied back
    into ``attrs`` from the first row, so the legend of a re-rendered table still says how
    the CIs were made."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"correlation table {path} does not exist")
    table = pd.read_csv(path, index_col="measure", keep_default_na=True)
    for c in table.columns:
        if str(c).endswith((".note", ".cmi_set")):
            table[c] = table[c].fillna("").astype(str)
    if len(table):
        for c in SETTING_COLUMNS:
            if c in table.columns and pd.notna(table[c].iloc[0]):
                v = table[c].iloc[0]
                table.attrs[c] = (str(v) if c == "variant"
                                  else float(v) if c == "level" else int(v))
    return table


def _is_ours(table: pd.DataFrame, measure: str) -> bool:
    if "ours" in table.columns:
        return bool(table.loc[measure, "ours"])
    return "m_" + measure in OURS


def _selection_line(table: pd.DataFrame) -> str:
    sel = table.attrs.get("selection")
    if sel:
        return f"Runs: {sel}."
    if "n_runs" in table.columns and len(table):
        return (f"Runs: {int(table['n_runs'].iloc[0])} used, "
                f"{int(table['n_excluded'].iloc[0])} excluded.")
    return "Runs: counts not recorded."


def _setting(table: pd.DataFrame, key: str):
    """A table setting from ``attrs``, else from its constant column, else None."""
    if key in table.attrs:
        return table.attrs[key]
    if key in table.columns and len(table) and pd.notna(table[key].iloc[0]):
        return table[key].iloc[0]
    return None


def _legend(table: pd.DataFrame) -> str:
    """The legend of the statistics. The CI's level, resamples and seed come from the table
    (``attrs`` or the columns :data:`SETTING_COLUMNS`); a table that records none of them
    (made by hand) gets a legend that says so instead of printing placeholders."""
    variant, level = _setting(table, "variant"), _setting(table, "level")
    n_boot, seed = _setting(table, "n_boot"), _setting(table, "seed")
    if n_boot is None or seed is None or level is None:
        ci = "a percentile bootstrap CI over runs (level, resamples and seed not recorded)"
    else:
        ci = (f"a {float(level):.0%} percentile bootstrap CI over runs ({int(n_boot)} "
              f"resamples, seed {int(seed)})")
    return _LEGEND.format(variant="_" + str(variant or "b"), ci=ci)


def _footer_lines(table: pd.DataFrame, targets: Sequence[str]) -> list[str]:
    """Plain-text footer: runs used / left out, legend, psi groups, and every note."""
    lines = [_selection_line(table), _legend(table)]
    for t in targets:
        parts = []
        for ax in _table_axes(table, t):
            col = f"{t}.psi_groups[{ax}]"
            if col not in table.columns:
                continue
            # Count only measures with a defined psi_i (a constant measure uses 0 groups).
            counts = table.loc[np.isfinite(table[f"{t}.psi[{ax}]"].astype(float)), col]
            if len(counts):
                lo, hi = int(counts.min()), int(counts.max())
                parts.append(f"{ax} {lo}" if lo == hi else f"{ax} {lo}-{hi}")
        if parts:
            lines.append(f"Ψ groups used per axis ({t}): " + ", ".join(parts) + ".")
    return lines + _note_lines(table, targets)


def _note_lines(table: pd.DataFrame, targets: Sequence[str]) -> list[str]:
    """Every note of the table once, with the measures and targets it applies to."""
    where: dict[str, list[tuple[str, str]]] = {}
    for t in targets:
        col = f"{t}.note"
        if col not in table.columns:
            continue
        for measure, note in table[col].items():
            if isinstance(note, str) and note:
                for atom in note.split("; "):
                    where.setdefault(atom, []).append((str(measure), t))
    lines = []
    for atom, pairs in where.items():
        ms = list(dict.fromkeys(m for m, _ in pairs))
        ts = list(dict.fromkeys(t for _, t in pairs))
        m_text = "all measures" if len(ms) == len(table.index) else ", ".join(ms)
        t_text = "all targets" if len(ts) == len(targets) else ", ".join(ts)
        lines.append(f"Note ({m_text}; {t_text}): {atom}.")
    return lines


def _cells(table: pd.DataFrame, target: str, stats: Sequence[str]):
    """Column specs for one target: list of (key, header-key, values, CI-or-None)."""
    cols = []
    for s in stats:
        if s in ("tau", "psi"):
            ci = (table.get(f"{target}.{s}_lo"), table.get(f"{target}.{s}_hi"))
            cols.append((s, s, table[f"{target}.{s}"].to_numpy(dtype=float), ci))
        elif s == "psi_axes":
            for ax in _table_axes(table, target):
                cols.append((f"psi[{ax}]", ax, table[f"{target}.psi[{ax}]"].to_numpy(float),
                             None))
        elif f"{target}.{s}" in table.columns:
            cols.append((s, s, table[f"{target}.{s}"].to_numpy(dtype=float), None))
    return cols


def _check_stats(stats: Sequence[str] | None) -> list[str]:
    stats = list(TABLE_STATS if stats is None else stats)
    bad = [s for s in stats if s not in TABLE_STATS]
    if bad:
        raise ValueError(f"unknown statistic(s) {bad}; choose from {TABLE_STATS}")
    return stats


# ----------------------------------------------------------------- correlation table


def correlation_markdown(table: pd.DataFrame, *, stats: Sequence[str] | None = None,
                         digits: int = 2, title: str | None = None) -> str:
    """The correlation table as Markdown: one section and table per target, rows measures
    (ours marked "(ours)"), the best value of each column in bold, then the footer."""
    stats = _check_stats(stats)
    targets = table_targets(table)
    out = [f"# {title}", ""] if title else []
    for t in targets:
        cols = _cells(table, t, stats)
        head = ["measure"] + [_MD_HEAD.get(k, f"ψ({h})") for k, h, _, _ in cols]
        out += [f"## {t}", "", "| " + " | ".join(head) + " |",
                "|" + "|".join([":---"] + ["---:"] * len(cols)) + "|"]
        best = [_best_mask(_measures_only(table, v), digits) for _, _, v, _ in cols]
        for r, measure in enumerate(table.index):
            name = _md_escape(measure) + (" (ours)" if _is_ours(table, measure) else "")
            row = [name]
            for c, (_, _, v, ci) in enumerate(cols):
                cell = _fmt(v[r], digits)
                if best[c][r]:
                    cell = f"**{cell}**"
                if ci is not None and ci[0] is not None and np.isfinite(v[r]):
                    cell += f" [{_fmt(ci[0].iloc[r], digits)}, {_fmt(ci[1].iloc[r], digits)}]"
                row.append(cell)
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    out += [line + "  " for line in _footer_lines(table, targets)]
    return "\n".join(out).rstrip() + "\n"


def correlation_latex(table: pd.DataFrame, *, stats: Sequence[str] | None = None,
                      digits: int = 2) -> str:
    r"""The correlation table as a booktabs ``tabular``: a ``\multicolumn`` group and
    ``\cmidrule`` per target, best value per column in ``\textbf``, ours marked with a
    dagger, the footer as a ``\footnotesize`` paragraph after the tabular."""
    stats = _check_stats(stats)
    targets = table_targets(table)
    per_t = [_cells(table, t, stats) for t in targets]
    lines = ["% written by convflat.analysis.tables.correlation_latex; needs booktabs",
             r"\begin{tabular}{l" + "".join("r" * len(c) for c in per_t) + "}", r"\toprule"]
    group, rules, start = [""], [], 2
    for t, cols in zip(targets, per_t, strict=True):
        group.append(rf"\multicolumn{{{len(cols)}}}{{c}}{{{_tex_escape(t)}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + len(cols) - 1}}}")
        start += len(cols)
    lines += [" & ".join(group) + r" \\", " ".join(rules)]
    head = ["Measure"]
    for cols in per_t:
        head += [_TEX_HEAD.get(k, rf"$\psi_{{\mathrm{{{_tex_escape(h)}}}}}$")
                 for k, h, _, _ in cols]
    lines += [" & ".join(head) + r" \\", r"\midrule"]
    best = [[_best_mask(_measures_only(table, v), digits) for _, _, v, _ in cols]
            for cols in per_t]
    for r, measure in enumerate(table.index):
        row = [_tex_escape(measure) + (r"$^\dagger$" if _is_ours(table, measure) else "")]
        for cols, bmask in zip(per_t, best, strict=True):
            for c, (_, _, v, ci) in enumerate(cols):
                cell = _tex_num(v[r], digits, bold=bmask[c][r])
                if ci is not None and ci[0] is not None and np.isfinite(v[r]):
                    lo, hi = ci[0].iloc[r], ci[1].iloc[r]
                    if np.isfinite(lo) and np.isfinite(hi):
                        cell += (rf" {{\scriptsize [{_tex_num(lo, digits)}, "
                                 rf"{_tex_num(hi, digits)}]}}")
                row.append(cell)
        lines.append(" & ".join(row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip",
              r"{\footnotesize $^\dagger$ours (arXiv 2603.09016). "]
    footer = _footer_lines(table, targets)
    lines += [_tex_escape(line).replace("τ", r"$\tau$").replace("ρ", r"$\rho$")
              .replace("Ψ", r"$\Psi$").replace("ψ", r"$\psi$") for line in footer]
    lines.append(r"\par}")
    return "\n".join(lines) + "\n"


def write_correlation_table(
    table: pd.DataFrame, prefix: str | os.PathLike, *, stats: Sequence[str] | None = None,
    digits: int = 2, title: str | None = None,
) -> list[Path]:
    """Write ``<prefix>.csv``, ``<prefix>.md`` and ``<prefix>.tex``; return their paths.

    ``prefix`` may carry one of those suffixes (it is dropped). ``stats`` picks the columns
    of the Markdown and LaTeX versions (default all of :data:`TABLE_STATS`); the CSV always
    has every column.
    """
    base = _prefix(prefix)
    table = _with_settings(table)
    csv = table.to_csv(float_format="%.10g")
    return [
        _write(base.with_name(base.name + ".csv"), csv),
        _write(base.with_name(base.name + ".md"),
               correlation_markdown(table, stats=stats, digits=digits, title=title)),
        _write(base.with_name(base.name + ".tex"),
               correlation_latex(table, stats=stats, digits=digits)),
    ]


# ------------------------------------------------------------------------ runs table

_RUN_METRICS = ("train_acc", "test_acc", "acc_gap", "train_loss", "test_loss", "loss_gap",
                "test_error")


def runs_summary_table(
    runs: pd.DataFrame, *, measures: Sequence[str] | None = None,
    metrics: Sequence[str] = ("train_acc", "test_acc", "acc_gap", "loss_gap"),
    require_converged: bool = True,
) -> pd.DataFrame:
    """One row per run: ``run_id``, the ``hp_`` axes, ``status``, ``used`` (kept by the
    analysis), the ``metrics`` present and the main ``measures`` (default: ours where
    present, else every ``m_`` column). All runs are listed, left-out ones too, sorted by
    study and axes. ``attrs["selection"]`` says how many runs were used and left out."""
    sel = select_runs(runs, require_converged=require_converged)
    if measures is None:
        measures = [m for m in OURS if m in runs.columns] or measure_columns(runs)
    else:
        missing = [m for m in measures if m not in runs.columns]
        if missing:
            raise ValueError(f"runs table lacks measure column(s) {missing}")
    # Mark the kept runs by position: select_runs keeps a marker column along.
    kept = select_runs(runs.assign(_row=np.arange(len(runs))),
                       require_converged=require_converged).runs["_row"].to_numpy()
    used = np.isin(np.arange(len(runs)), kept)
    front = [c for c in ("study", "run_id") if c in runs.columns]
    if "study" in front and runs["study"].nunique(dropna=False) < 2:
        front.remove("study")
    axes = axis_columns(runs)
    flags = ["status"] + (["converged"] if "converged" in runs.columns else [])
    cols = front + axes + flags + [m for m in metrics if m in runs.columns] + list(measures)
    out = runs[cols].copy()
    out.insert(len(front) + len(axes) + len(flags), "used", used)
    order = [c for c in front if c == "study"] + axes
    if order:  # numeric axes sort as numbers; the run id (a string) would not
        out = out.sort_values(order, kind="stable")
    out = out.reset_index(drop=True)
    out.attrs["selection"] = sel.summary()
    return out


def _numeric(col: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def _run_cell(col: str, v, tex: bool) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "--" if tex else "–"
    if isinstance(v, (int, np.integer)):
        return str(v)
    if isinstance(v, (float, np.floating)):
        if col.startswith("m_"):
            s = f"{v:.3g}"
            if tex and "e" in s:
                mant, exp = s.split("e")
                return f"${mant}\\times 10^{{{int(exp)}}}$"
            return f"${s}$" if tex else s
        if col.startswith("hp_"):
            return f"{v:g}"
        return f"${v:.3f}$" if tex else f"{v:.3f}"
    return _tex_escape(v) if tex else _md_escape(v)


def write_runs_summary(
    runs: pd.DataFrame, prefix: str | os.PathLike, *, measures: Sequence[str] | None = None,
    require_converged: bool = True,
) -> list[Path]:
    """Write the runs summary (:func:`runs_summary_table`) as ``<prefix>.csv``, ``.md`` and
    ``.tex`` (booktabs); the Markdown and LaTeX versions leave out ``run_id`` (the axes say
    the same) and end with the count of runs used and left out."""
    table = runs_summary_table(runs, measures=measures, require_converged=require_converged)
    base = _prefix(prefix)
    shown = [c for c in table.columns if c != "run_id"]
    names = [short_name(c) for c in shown]
    footer = f"Runs: {table.attrs['selection']}. 'used' = kept by the analysis."
    md = ["| " + " | ".join(_md_escape(n) for n in names) + " |",
          "|" + "|".join("---:" if _numeric(table[c]) else ":---"
                         for c in shown) + "|"]
    for _, row in table.iterrows():
        md.append("| " + " | ".join(_run_cell(c, row[c], False) for c in shown) + " |")
    md += ["", footer]
    tex = ["% written by convflat.analysis.tables.write_runs_summary; needs booktabs",
           r"\begin{tabular}{" + "".join(
               "r" if _numeric(table[c]) else "l" for c in shown) + "}",
           r"\toprule", " & ".join(_tex_escape(n) for n in names) + r" \\", r"\midrule"]
    for _, row in table.iterrows():
        tex.append(" & ".join(_run_cell(c, row[c], True) for c in shown) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip",
            r"{\footnotesize " + _tex_escape(footer) + r"\par}"]
    return [
        _write(base.with_name(base.name + ".csv"), table.to_csv(index=False,
                                                                float_format="%.10g")),
        _write(base.with_name(base.name + ".md"), "\n".join(md)),
        _write(base.with_name(base.name + ".tex"), "\n".join(tex)),
    ]
