"""convflat.analysis tables and figures, written as the workflow's analysis jobs write them
(convflat.pipeline): files written, readable, marked."""

from __future__ import annotations

import itertools
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from convflat.analysis import (
    combine_runs,
    correlation_table,
    figure_paths,
    plot_false_friend,
    plot_hutchinson_convergence,
    read_correlation_table,
    runs_summary_table,
    write_correlation_table,
    write_runs_summary,
)
from convflat.pipeline.analysis import draw_figure, read_runs_tables

#: What the correlation, runs_summary and (non-optional) figure jobs of a study write.
STUDY_TABLES = tuple(f"{name}.{ext}" for name in ("correlation", "runs_summary")
                     for ext in ("csv", "md", "tex"))
STUDY_FIGURES = tuple(f"{name}.{ext}" for name in ("measure_vs_gap", "tau_psi", "psi_heatmap")
                      for ext in ("png", "pdf"))


def analyse(runs_csv, tables, figures, *, title, targets=("loss_gap", "acc_gap", "test_error"),
            n_boot=200):
    """A study's tables and figures, each written as its workflow job writes it:
    ``{file stem: [paths]}`` and ``"paths"``: all of them."""
    analysis = {"targets": list(targets), "require_converged": True}
    runs = read_runs_tables(runs_csv)
    table = correlation_table(runs, targets=list(targets), n_boot=n_boot, seed=0,
                              require_converged=True)
    out = {"correlation": write_correlation_table(table, tables / "correlation", title=title),
           "runs_summary": write_runs_summary(runs, tables / "runs_summary",
                                              require_converged=True)}
    inputs = {"runs": str(runs_csv), "correlation": str(tables / "correlation.csv")}
    for name in ("measure_vs_gap", "tau_psi", "psi_heatmap"):
        out[name] = draw_figure(name, inputs, figures / name, analysis)
    out["paths"] = [p for paths in list(out.values()) for p in paths]
    return out


def _runs(seed: int = 0, study: str = "toy") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for w, wd, s in itertools.product([8, 16, 32], [0.0, 1e-4, 1e-3], [0, 1]):
        gap = 0.05 * math.log2(w) - 20 * wd + 0.02 * rng.normal()
        trace = 1e3 * math.exp(4 * gap) / (1 + 1e3 * wd)
        rows.append({
            "run_id": f"width~{w}/wd~{wd:g}/seed~{s}", "study": study, "status": "ok",
            "converged": True, "hp_width": w, "hp_weight_decay": wd, "hp_seed": s,
            "train_loss": 0.01, "test_loss": 0.01 + gap, "train_acc": 1.0,
            "test_acc": 0.9 - gap / 4, "loss_gap": gap, "acc_gap": 0.1 + gap / 4,
            "test_error": 0.1 + gap / 4,
            "m_conv_trace": trace, "m_conv_relative_flatness": trace * rng.lognormal(0, 0.3),
            "m_hutchinson_trace": trace * 3 * rng.lognormal(0, 0.1),
            "m_param_norm": 10 + rng.normal(),
        })
    df = pd.DataFrame(rows)
    df.loc[0, "status"] = "diverged"
    df.loc[1, "converged"] = False
    return df


def _check_figure(paths, min_png_kb: float = 10.0):
    png, pdf = paths
    assert png.suffix == ".png" and pdf.suffix == ".pdf"
    assert png.stat().st_size > min_png_kb * 1024
    assert pdf.stat().st_size > 3 * 1024
    assert pdf.read_bytes()[:5] == b"%PDF-"
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image[..., :3].std() > 0.01  # not blank


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    csv = root / "tables" / "toy" / "runs.csv"
    csv.parent.mkdir(parents=True)
    _runs().to_csv(csv, index=False)
    out = analyse(csv, root / "tables" / "toy", root / "figures" / "toy", title="toy")
    return root, out


def test_a_study_writes_every_file(study):
    root, out = study
    names = sorted(p.name for p in out["paths"])
    assert names == sorted(STUDY_TABLES + STUDY_FIGURES)
    assert all(p.is_file() and p.stat().st_size > 0 for p in out["paths"])
    assert {p.name for p in out["correlation"]} == {"correlation.csv", "correlation.md",
                                                    "correlation.tex"}
    for key in ("measure_vs_gap", "tau_psi", "psi_heatmap"):
        _check_figure(out[key])
    # no temporary file left behind by the atomic writes
    assert not [p for p in root.rglob("*.tmp")]


def test_correlation_csv_round_trip_and_counts(study):
    root, _ = study
    table = read_correlation_table(root / "tables" / "toy" / "correlation.csv")
    assert list(table.index)[:2] == ["conv_trace", "conv_relative_flatness"]
    assert (table["n_runs"] == 16).all() and (table["n_excluded"] == 2).all()
    for t in ("loss_gap", "acc_gap", "test_error"):
        for col in ("tau", "tau_lo", "tau_hi", "spearman", "pearson", "psi", "psi_lo",
                    "psi_hi", "psi[width]", "psi[weight_decay]", "psi_groups[width]", "cmi",
                    "cmi_set", "n", "note"):
            assert f"{t}.{col}" in table.columns
        assert "psi[seed]" not in " ".join(table.columns)
    assert table.loc["conv_trace", "loss_gap.tau"] > 0.5


def test_markdown_and_latex_mark_the_best_and_report_exclusions(study):
    root, _ = study
    md = (root / "tables" / "toy" / "correlation.md").read_text()
    tex = (root / "tables" / "toy" / "correlation.tex").read_text()
    table = read_correlation_table(root / "tables" / "toy" / "correlation.csv")
    measures = table[table["kind"] != "control"]
    best = measures["loss_gap.spearman"].idxmax()
    best_text = f"**{table.loc[best, 'loss_gap.spearman']:.2f}**"
    row = next(line for line in md.splitlines() if line.startswith(f"| {best}"))
    assert best_text in row
    # a control is never marked best, even where it ranks the runs better
    controls = [line for line in md.splitlines() if line.startswith("| control:")]
    assert controls and not any("**" in line for line in controls)
    assert "16 runs used, 2 excluded" in md and "status=diverged: 1" in md
    assert "not converged: 1" in md and "(ours)" in md
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex
    assert r"\textbf{" in tex and r"\cmidrule(lr)" in tex
    assert "16 runs used, 2 excluded" in tex and r"conv\_trace$^\dagger$" in tex
    assert tex.count(r"\begin{tabular}") == tex.count(r"\end{tabular}") == 1
    # every body row has as many cells as the header
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    spec = tex.splitlines()[1]
    assert spec.startswith(r"\begin{tabular}{l")
    n_cols = len(spec[len(r"\begin{tabular}{") : -1])
    assert all(line.count(" & ") == n_cols - 1 for line in body)


def test_write_correlation_table_subset_of_stats(tmp_path):
    table = correlation_table(_runs(), n_boot=50, targets=("loss_gap",))
    paths = write_correlation_table(table, tmp_path / "corr.csv", stats=("tau", "cmi"))
    assert [p.name for p in paths] == ["corr.csv", "corr.md", "corr.tex"]
    md = paths[1].read_text()
    header = next(line for line in md.splitlines() if line.startswith("| measure"))
    assert header.count("|") == 4  # measure, tau, CMI
    with pytest.raises(ValueError, match="unknown statistic"):
        write_correlation_table(table, tmp_path / "corr", stats=("kappa",))


def test_runs_summary(study):
    root, _ = study
    summary = runs_summary_table(_runs())
    assert list(summary.columns[:3]) == ["run_id", "hp_width", "hp_weight_decay"]
    assert summary["used"].sum() == 16 and len(summary) == 18
    assert {"m_conv_trace", "m_conv_relative_flatness", "acc_gap", "loss_gap"} <= set(
        summary.columns)
    assert summary["hp_weight_decay"].is_monotonic_increasing or summary[
        "hp_width"].is_monotonic_increasing
    md = (root / "tables" / "toy" / "runs_summary.md").read_text()
    assert "16 runs used, 2 excluded" in md and "run_id" not in md
    tex = (root / "tables" / "toy" / "runs_summary.tex").read_text()
    assert r"\toprule" in tex and "weight\\_decay" in tex


def test_overall_table_from_several_studies(tmp_path):
    paths = []
    for k, name in enumerate(("a", "b")):
        csv = tmp_path / name / "runs.csv"
        csv.parent.mkdir()
        _runs(seed=k, study=name).drop(columns="study").to_csv(csv, index=False)
        paths.append(csv)
    both = combine_runs(paths)
    assert set(both["study"]) == {"a", "b"} and len(both) == 36
    table = correlation_table(both, n_boot=50, targets=("loss_gap",))
    # study is held fixed inside Psi groups: each study contributes its own groups
    single = correlation_table(_runs(), n_boot=50, targets=("loss_gap",))
    assert table.loc["conv_trace", "loss_gap.psi_groups[width]"] == pytest.approx(
        2 * single.loc["conv_trace", "loss_gap.psi_groups[width]"], abs=1)
    assert "study" in table.attrs["conditioning"]
    with pytest.raises(ValueError, match="more than once"):
        combine_runs([paths[0], paths[0]])


def test_single_run_study_still_writes_its_outputs(tmp_path):
    # A single usable run: every file is still written, statistics are NaN with a reason.
    csv = tmp_path / "one" / "runs.csv"
    csv.parent.mkdir()
    _runs().iloc[:3].to_csv(csv, index=False)  # run 0 diverged, run 1 did not converge
    out = analyse(csv, tmp_path / "t", tmp_path / "f", title="overall", n_boot=20,
                  targets=("loss_gap",))
    assert sorted(p.name for p in out["paths"]) == sorted(STUDY_TABLES + STUDY_FIGURES)
    assert all(p.is_file() and p.stat().st_size > 0 for p in out["paths"])
    table = read_correlation_table(tmp_path / "t" / "correlation.csv")
    assert table["loss_gap.tau"].isna().all()
    assert (table["n_runs"] == 1).all() and (table["n_excluded"] == 2).all()
    md = (tmp_path / "t" / "correlation.md").read_text()
    assert md.startswith("# overall") and "1 usable run" in md


def test_figure_paths_accept_suffix_or_none(tmp_path):
    assert figure_paths(tmp_path / "x.png") == (tmp_path / "x.png", tmp_path / "x.pdf")
    assert figure_paths(tmp_path / "x.pdf") == (tmp_path / "x.png", tmp_path / "x.pdf")
    assert figure_paths(tmp_path / "fig.v2") == (tmp_path / "fig.v2.png",
                                                 tmp_path / "fig.v2.pdf")


def test_hutchinson_convergence_figure(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"method": meth, "probes": m, "stderr": f / math.sqrt(m),
             "estimate": 100 + f / math.sqrt(m) * rng.normal()}
            for meth, f in (("hutchinson", 10.0), ("hutchpp", 3.0))
            for m in (1, 2, 4, 8, 16, 32, 64)]
    df = pd.DataFrame(rows)
    _check_figure(plot_hutchinson_convergence(df, 100.0, tmp_path / "hutch.pdf"))
    assert (tmp_path / "hutch.png").is_file()
    no_method = df[df["method"] == "hutchinson"].drop(columns="method")
    _check_figure(plot_hutchinson_convergence(no_method, 100.0, tmp_path / "h2",
                                              relative=False, dpi=150), min_png_kb=5)
    with pytest.raises(ValueError, match="stderr"):
        plot_hutchinson_convergence(df.drop(columns="stderr"), 100.0, tmp_path / "bad")
    with pytest.raises(ValueError, match="several rows"):
        plot_hutchinson_convergence(pd.concat([df, df]), 100.0, tmp_path / "bad")


def test_false_friend_figure(tmp_path):
    runs = _runs()
    paths = plot_false_friend(runs, tmp_path / "false_friend")
    _check_figure(paths)
    with pytest.raises(ValueError, match="hp_lr"):
        plot_false_friend(runs, tmp_path / "bad", axis="hp_lr")
    with pytest.raises(ValueError, match="test_error"):
        plot_false_friend(runs.drop(columns="test_error"), tmp_path / "bad")
