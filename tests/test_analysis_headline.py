"""headline.md: the rows chosen, their numbers, and the sentence that answers the question,
on a correlation table written by hand (not by correlation_table) and a constructed runs
table."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from convflat.analysis import (
    correlation_table,
    headline_markdown,
    headline_rows,
    headline_verdicts,
    write_correlation_table,
    write_headline,
)

NAN = float("nan")

# measure: (ours, loss_gap (tau, lo, hi, psi, pearson, n), acc_gap (tau, lo, hi, psi, r, n))
WIN = {
    "conv_trace": (True, (0.20, 0.05, 0.35, 0.15, 0.22, 30), (0.10, -0.10, 0.30, 0.05, 0.1, 30)),
    "conv_relative_flatness": (True, (0.55, 0.40, 0.70, 0.50, 0.61, 30),
                               (0.12, -0.05, 0.29, 0.08, 0.2, 30)),
    "sharpness": (False, (0.40, 0.25, 0.55, 0.31, 0.35, 30), (0.30, 0.20, 0.40, 0.25, 0.3, 30)),
    "param_norm": (False, (0.45, 0.31, 0.59, 0.20, 0.52, 28), (0.05, -0.1, 0.2, 0.02, 0.0, 28)),
    "pacbayes_bound": (False, (0.10, -0.05, 0.25, 0.02, 0.09, 30),
                       (0.31, 0.19, 0.43, 0.29, 0.4, 30)),
    "random": (False, (-0.05, -0.2, 0.1, 0.0, -0.04, 30), (-0.02, -0.2, 0.2, 0.0, 0.0, 30)),
    # largest |tau| but negative: a measure that calls the better nets worse, not "best"
    "inverse_margin": (False, (-0.70, -0.8, -0.6, -0.65, -0.72, 30),
                       (-0.60, -0.7, -0.5, -0.5, -0.6, 30)),
}


def _table(spec) -> pd.DataFrame:
    rows = []
    for name, (ours, *per_target) in spec.items():
        row = {"measure": name, "ours": ours}
        for t, vals in zip(("loss_gap", "acc_gap"), per_target, strict=True):
            for key, v in zip(("tau", "tau_lo", "tau_hi", "psi", "pearson", "n"), vals,
                              strict=True):
                row[f"{t}.{key}"] = v
        row.update(n_runs=30, n_excluded=2, n_boot=500, level=0.9, seed=4, variant="b")
        rows.append(row)
    return pd.DataFrame(rows).set_index("measure")


def _runs() -> pd.DataFrame:
    """32 runs: 16 configurations x 2 seeds, one diverged and one capped."""
    rows = []
    for k, (w, d, s) in enumerate(itertools.product([8, 16, 32, 64], [2, 3, 4, 5], [0, 1])):
        gap = 0.1 * math.log2(w) + 0.05 * d + (0.01 if s else -0.01)
        rows.append({"run_id": f"r{k}", "status": "ok", "converged": True, "hp_width": w,
                     "hp_depth": d, "hp_seed": s, "loss_gap": gap, "acc_gap": gap / 10,
                     "train_loss": 0.010 if s else 0.008, "lr_at_stop": 0.05})
    df = pd.DataFrame(rows)
    df.loc[0, ["status", "converged"]] = ["diverged", False]
    df.loc[1, "converged"] = False
    return df


def test_rows_are_ours_and_the_three_best_baselines_by_signed_tau():
    rows = headline_rows(_table(WIN), "loss_gap")
    assert rows["measure"].tolist() == ["conv_relative_flatness", "param_norm", "sharpness",
                                        "conv_trace", "pacbayes_bound"]
    assert rows["rank"].tolist() == [1, 2, 3, 4, 5]
    assert (rows["n_measures"] == 7).all()
    assert rows["ours"].tolist() == [True, False, False, True, False]
    r = rows.set_index("measure")
    assert r.loc["param_norm", "tau"] == 0.45 and r.loc["param_norm", "tau_lo"] == 0.31
    assert r.loc["param_norm", "psi"] == 0.20 and r.loc["param_norm", "pearson"] == 0.52
    # used: runs with a finite measure and target; excluded: the rest of the 32 runs
    assert (r.loc["param_norm", "n_used"], r.loc["param_norm", "n_excluded"]) == (28, 4)
    assert (r.loc["sharpness", "n_used"], r.loc["sharpness", "n_excluded"]) == (30, 2)
    acc = headline_rows(_table(WIN), "acc_gap", n_baselines=1)
    assert acc["measure"].tolist() == ["pacbayes_bound", "conv_relative_flatness",
                                       "conv_trace"]
    assert acc["rank"].tolist() == [1, 3, 4]


def test_equal_tau_shares_a_rank_and_undefined_ranks_last():
    spec = dict(WIN)
    spec["sharpness"] = (False, (0.45, 0.3, 0.6, 0.2, 0.5, 30), WIN["sharpness"][2])
    spec["conv_trace"] = (True, (NAN, NAN, NAN, NAN, NAN, 30), WIN["conv_trace"][2])
    rows = headline_rows(_table(spec), "loss_gap").set_index("measure")
    assert rows.loc["param_norm", "rank"] == rows.loc["sharpness", "rank"] == 2
    assert rows.loc["conv_trace", "rank"] == 7


def test_sentence_when_ours_wins_on_one_target_and_loses_on_the_other():
    md = headline_markdown(_table(WIN), _runs(), title="digits")
    lines = md.splitlines()
    assert lines[0] == "# digits"
    answer = lines[2]
    assert answer.startswith("Our conv-layer measures rank the runs best on the loss gap, "
                             "and lose to a baseline on the accuracy gap")
    assert ("On the loss gap, our conv_relative_flatness (τ = 0.55, CI [0.40, 0.70]) ranks "
            "best, ahead of the baseline param_norm (τ = 0.45, CI [0.31, 0.59])") in answer
    # 0.40-0.70 and 0.31-0.59 overlap, and so do 0.19-0.43 and -0.05-0.29: said twice
    assert answer.count("overlap") == 2
    assert ("On the accuracy gap, the baseline pacbayes_bound (τ = 0.31, CI [0.19, 0.43]) "
            "ranks best; our best measure is conv_relative_flatness "
            "(τ = 0.12, CI [-0.05, 0.29])") in answer
    # the table rows, in rank order, with tau, CI, psi, r, used, excluded
    assert "| τ [90% CI] | Ψ | r | runs used | excluded |" in md
    assert "| 1 of 7 | **conv_relative_flatness (ours)** | 0.55 [0.40, 0.70] | 0.50 | 0.61 " \
           "| 30 | 2 |" in md
    assert "| 2 of 7 | param_norm | 0.45 [0.31, 0.59] | 0.20 | 0.52 | 28 | 4 |" in md
    assert "inverse_margin" not in md and "random" not in md
    assert "(500 resamples, seed 4)" in md
    # runs, spread ratio and convergence from the runs table
    assert "Runs: 30 runs used, 2 excluded (status=diverged: 1; not converged: 1)." in md
    assert "Spread of loss_gap: between / within configurations = " in md
    assert "Convergence: 30 of 32 runs (94%)" in md and "learning rate at the stop 0.05" in md
    assert "**Warning" not in md


def test_sentence_when_ours_loses_everywhere(tmp_path):
    spec = dict(WIN)
    spec["conv_relative_flatness"] = (True, (0.30, 0.2, 0.4, 0.3, 0.3, 30),
                                      WIN["conv_relative_flatness"][2])
    v = {x.target: x for x in headline_verdicts(_table(spec))}
    assert v["loss_gap"].outcome == "loses" and v["acc_gap"].outcome == "loses"
    assert (v["loss_gap"].ours, v["loss_gap"].baseline) == ("conv_relative_flatness",
                                                            "param_norm")
    assert v["loss_gap"].overlap is True  # [0.2, 0.4] and [0.31, 0.59] overlap
    path = write_headline(_table(spec), _runs(), tmp_path / "t" / "headline.md")
    md = path.read_text()
    assert md.splitlines()[2].startswith(
        "Ours loses: a baseline ranks the runs better than both of our conv-layer measures "
        "on the loss gap and the accuracy gap (Kendall's τ).")


def test_ours_wins_everywhere_and_no_positive_measure():
    spec = {k: v for k, v in WIN.items() if k != "pacbayes_bound"}
    spec["conv_trace"] = (True, WIN["conv_trace"][1], (0.50, 0.45, 0.55, 0.4, 0.5, 30))
    md = headline_markdown(_table(spec), _runs())
    assert md.splitlines()[2].startswith(
        "Ours wins: one of our conv-layer measures ranks the runs better than every baseline "
        "on the loss gap and the accuracy gap (Kendall's τ).")
    assert "ahead of the baseline sharpness (τ = 0.30, CI [0.20, 0.40])." in md  # no overlap
    neg = {k: (o, tuple(-abs(x) if i < 5 else x for i, x in enumerate(a)), b)
           for k, (o, a, b) in WIN.items()}
    md = headline_markdown(_table(neg), _runs(), targets=["loss_gap"])
    assert "no measure correlates positively with the loss gap" in md


def test_headline_warns_and_rejects_bad_input():
    runs = _runs()
    runs.loc[2:12, "converged"] = False            # 19 of 32 converged: under 80 %
    runs.loc[20, "train_loss"] = 0.05              # a factor 6.25 over 0.008
    md = headline_markdown(_table(WIN), runs)
    assert "**Warning: only 19 of 32 runs (59%)" in md
    assert "a factor 6.25 > 2" in md
    with pytest.raises(ValueError, match="test_error"):
        headline_markdown(_table(WIN), runs, targets=["test_error"])
    with pytest.raises(ValueError, match="train_loss"):
        headline_markdown(_table(WIN), runs.drop(columns="train_loss"))


def test_headline_from_files_written_by_the_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    runs = _runs()
    runs["m_conv_trace"] = runs["loss_gap"] + 0.05 * rng.normal(size=len(runs))
    runs["m_conv_relative_flatness"] = rng.normal(size=len(runs))
    runs["m_sharpness"] = runs["loss_gap"] + 0.01 * rng.normal(size=len(runs))
    runs["m_norm"] = -runs["loss_gap"]
    runs.to_csv(tmp_path / "runs.csv", index=False)
    table = correlation_table(runs, targets=["loss_gap", "acc_gap"], n_boot=100, cmi=False)
    csv = write_correlation_table(table, tmp_path / "correlation")[0]
    md = write_headline(csv, tmp_path / "runs.csv", tmp_path / "headline.md").read_text()
    # sharpness (noise 0.01) orders the runs more like the gap than conv_trace (noise 0.05)
    assert table.loc["sharpness", "loss_gap.tau"] > table.loc["conv_trace", "loss_gap.tau"]
    assert md.splitlines()[2].startswith("Ours loses")
    tau = table.loc["sharpness", "loss_gap.tau"]
    assert f"| 1 of 4 | sharpness | {tau:.2f} [" in md
    assert "| 30 | 2 |" in md
