"""headline.md: the verdict from paired intervals, the per-axis and sign-error sections, the
controls, and no winner from too few or insane runs; numbers checked against scipy and
brute-force loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from convflat.analysis import (
    HeadlineSettings,
    correlation_table,
    headline_markdown,
    headline_rows,
    target_answer,
    write_correlation_table,
    write_headline,
)


def _runs(seed: int = 0) -> pd.DataFrame:
    """32 runs: width x depth x 2 seeds; the gap grows with width and depth."""
    rng = np.random.default_rng(seed)
    rows = []
    for k, (w, d, s) in enumerate(itertools.product([8, 16, 32, 64], [2, 3, 4, 5], [0, 1])):
        gap = 0.1 * math.log2(w) + 0.05 * d + 0.02 * rng.normal()
        rows.append({"run_id": f"r{k}", "status": "ok", "converged": True, "hp_width": w,
                     "hp_depth": d, "hp_seed": s, "loss_gap": gap, "acc_gap": gap / 10,
                     "train_loss": 0.010 if s else 0.008, "initial_loss": 2.3,
                     "loss_target": 0.01, "epochs_run": 10 + d + s, "lr_at_stop": 0.05})
    df = pd.DataFrame(rows)
    noise = np.random.default_rng(seed + 1)
    df["m_conv_trace"] = df["loss_gap"] + 0.05 * noise.normal(size=len(df))
    # right along depth, wrong along width
    df["m_conv_relative_flatness"] = df["hp_depth"] - 0.02 * df["hp_width"]
    df["m_sharpness"] = df["loss_gap"] + 0.005 * noise.normal(size=len(df))
    df["m_norm"] = -df["loss_gap"]
    return df


def _md(runs, **kw):
    table = correlation_table(runs, targets=["loss_gap", "acc_gap"], n_boot=200, cmi=False)
    return table, headline_markdown(table, runs, title="toy", **kw)


def test_rows_rank_measures_by_signed_tau_and_list_controls_after():
    runs = _runs()
    table = correlation_table(runs, targets=["loss_gap"], n_boot=50, cmi=False)
    rows = headline_rows(table, "loss_gap")
    measures = rows[rows["kind"] != "control"]
    tau = {m: scipy.stats.kendalltau(runs[f"m_{m}"], runs["loss_gap"])[0]
           for m in ("conv_trace", "conv_relative_flatness", "sharpness", "norm")}
    assert measures["measure"].tolist() == sorted(tau, key=lambda m: -tau[m])
    assert measures["rank"].tolist() == [1, 2, 3, 4]
    assert measures["tau"].to_numpy() == pytest.approx([tau[m] for m in measures["measure"]])
    controls = rows[rows["kind"] == "control"]
    assert set(controls["measure"]) == {"control:train_loss", "control:epochs_run",
                                        "control:width", "control:depth"}
    assert (controls["rank"] == 0).all()
    assert rows["kind"].tolist() == ["ours" if m in ("conv_trace", "conv_relative_flatness")
                                     else "baseline" for m in measures["measure"]] + [
        "control"] * len(controls)  # every control after every measure


def test_verdict_follows_the_paired_interval_not_the_marginal_overlap():
    """sharpness and conv_trace have overlapping marginal CIs on a small sample, but on the
    same runs the difference of their taus is clearly negative: the verdict is 'loses'."""
    runs = _runs()
    table, md = _md(runs)
    a = target_answer(table, runs, "loss_gap", HeadlineSettings(n_boot=200))
    assert (a.ours, a.baseline) == ("conv_trace", "sharpness")
    d = a.paired[("conv_trace", "sharpness")][0]
    ref = (scipy.stats.kendalltau(runs["m_conv_trace"], runs["loss_gap"])[0]
           - scipy.stats.kendalltau(runs["m_sharpness"], runs["loss_gap"])[0])
    assert d.diff == pytest.approx(ref)
    assert d.hi < 0 and a.outcome == "loses"
    first = md.splitlines()[2]
    assert first.startswith("**Verdict: our best conv-layer measure loses to the best baseline "
                            "on the loss gap and the accuracy gap and does not beat knowing the "
                            "training run: on the loss gap ranking the runs by the grid "
                            "hyperparameter width does as well")
    assert f"paired Δτ = {d.diff:.2f} [{d.lo:.2f}, {d.hi:.2f}], an interval that lies below 0" \
        in first
    assert "ours worse" in md


def test_per_axis_sentence_names_the_wrong_axis():
    runs = _runs()
    table, md = _md(runs)
    first = md.splitlines()[2]
    psi_w = table.loc["conv_relative_flatness", "loss_gap.psi[width]"]
    psi_d = table.loc["conv_relative_flatness", "loss_gap.psi[depth]"]
    assert psi_w < 0 < psi_d
    assert (f"conv_relative_flatness ranks the runs the wrong way along width (ψ {psi_w:.2f}) "
            f"and the right way only along depth (ψ {psi_d:.2f}), so its τ comes from those "
            "axes and it is not a reliable predictor across this grid") in first
    assert "| measure | ψ[depth] | ψ[width] |" in md


def test_sign_error_table_in_the_headline_matches_a_loop_over_pairs():
    runs = _runs()
    table = correlation_table(runs, targets=["loss_gap"], n_boot=50, cmi=False)
    a = target_answer(table, runs, "loss_gap", HeadlineSettings(targets=("loss_gap",),
                                                                n_boot=50, noise_z=0.0))
    errors = {"width": [], "depth": []}
    recs = runs.to_dict("records")
    for r, q in itertools.combinations(recs, 2):
        diff = [ax for ax in ("width", "depth", "seed") if r[f"hp_{ax}"] != q[f"hp_{ax}"]]
        if len(diff) != 1 or diff[0] == "seed":
            continue
        dm = np.sign(r["m_conv_trace"] - q["m_conv_trace"])
        dg = np.sign(r["loss_gap"] - q["loss_gap"])
        errors[diff[0]].append((1 - dm * dg) / 2)
    se = a.sign_error.loc["conv_trace"]
    assert se["width"] == pytest.approx(np.mean(errors["width"]))
    assert se["depth"] == pytest.approx(np.mean(errors["depth"]))
    assert se["mean"] == pytest.approx(np.mean(errors["width"] + errors["depth"]))
    assert se["pairs[width]"] == len(errors["width"]) == 48
    assert a.sign_error.loc["conv_relative_flatness", "worst_family"] == "width"


def test_controls_are_compared_in_their_better_direction():
    runs = _runs()
    runs["m_conv_trace"] = runs["epochs_run"] + 1e-3 * np.arange(len(runs))  # restates epochs
    table = correlation_table(runs, targets=["loss_gap"], n_boot=200, cmi=False)
    a = target_answer(table, runs, "loss_gap", HeadlineSettings(targets=("loss_gap",),
                                                                n_boot=200))
    d = a.paired[("conv_trace", "control:train_loss")][0]
    tau_loss = scipy.stats.kendalltau(runs["train_loss"], runs["loss_gap"])[0]
    tau_ours = scipy.stats.kendalltau(runs["m_conv_trace"], runs["loss_gap"])[0]
    assert d.orientation == np.sign(tau_loss)
    assert d.diff == pytest.approx(tau_ours - abs(tau_loss))
    md = headline_markdown(table, runs, targets=["loss_gap"])
    assert "The strongest control, " in md and "in its better direction" in md
    ref = scipy.stats.kendalltau(runs["m_conv_trace"], runs["train_loss"])[0]
    assert f"conv_trace against the stopped training loss: τ = {ref:.2f} [" in md


def test_two_runs_name_no_winner():
    runs = _runs().iloc[[0, 7]].reset_index(drop=True)
    table = correlation_table(runs, targets=["loss_gap"], n_boot=50, cmi=False)
    md = headline_markdown(table, runs, targets=["loss_gap"])
    first = md.splitlines()[2]
    assert first.startswith("**Insufficient evidence.** Only 2 usable run(s), fewer than the 10")
    body = md.split("τ: Kendall's rank correlation")[0]  # the legend explains the words
    assert "Verdict" not in body and "ours better" not in body and "ours worse" not in body
    assert "beats" not in first and "loses" not in first
    # the minimum is configurable
    md = headline_markdown(table, runs, targets=["loss_gap"], min_runs=2)
    assert md.splitlines()[2].startswith("**Verdict")


def test_diverged_runs_without_a_loss_target_are_excluded_and_no_target_is_claimed():
    runs = _runs()
    runs["loss_target"] = np.nan                     # a study without train.stop_loss
    runs.loc[:3, "train_loss"] = 7e18                # lr 50: ends far above its initial loss
    runs.loc[:3, "m_conv_trace"] = -6e36
    runs.loc[4, "train_loss"] = np.nan
    table, md = _md(runs)
    assert table["n_runs"].iloc[0] == 27
    assert ("27 runs used, 5 excluded (training loss not finite: 1; diverged (final loss >= "
            "initial loss): 4)") in md
    assert "reached the training-loss target" not in md
    assert "No training-loss target: this study sets no `train.stop_loss`" in md
    assert "compared at unmatched training losses" in md


def test_headline_from_files_written_by_the_pipeline(tmp_path):
    runs = _runs()
    runs.to_csv(tmp_path / "runs.csv", index=False)
    table = correlation_table(runs, targets=["loss_gap", "acc_gap"], n_boot=100, cmi=False)
    csv = write_correlation_table(table, tmp_path / "correlation")[0]
    md = write_headline(csv, tmp_path / "runs.csv", tmp_path / "headline.md",
                        title="toy").read_text()
    assert md == headline_markdown(table, runs, title="toy")
    assert "(100 resamples, seed 0)" in md
    with pytest.raises(ValueError, match="test_error"):
        headline_markdown(table, runs, targets=["test_error"])
    with pytest.raises(ValueError, match="m_sharpness"):
        headline_markdown(table, runs.drop(columns="m_sharpness"))


def test_one_usable_run_keeps_the_controls_of_the_whole_table():
    """The correlation table makes its controls over all runs; a headline whose usable runs
    leave a control constant must still find its column (a study with one usable run)."""
    runs = _runs()
    runs.loc[1:, "status"] = "failed"
    table = correlation_table(runs, targets=["loss_gap"], n_boot=20, cmi=False)
    md = headline_markdown(table, runs, targets=["loss_gap"])
    assert md.splitlines()[2].startswith("**Insufficient evidence.** Only 1 usable run(s)")


def test_the_along_training_sentence_is_added_per_target():
    runs = _runs()
    table = correlation_table(runs, targets=["loss_gap"], n_boot=20, cmi=False)
    along = pd.DataFrame({
        "target": "loss_gap", "loss_level": [1.0, 0.1, 1.0, 0.1], "level_index": [0, 1, 0, 1],
        "measure": ["conv_trace", "conv_trace", "path_norm", "path_norm"],
        "ours": [True, True, False, False], "tau": [0.6, 0.3, 0.2, 0.4],
        "tau_lo": [0.4, 0.1, 0.0, 0.2], "tau_hi": [0.8, 0.5, 0.4, 0.6], "n": 32,
        "best_baseline": "path_norm", "diff": [0.4, -0.1, np.nan, np.nan],
        "diff_lo": [0.1, -0.3, np.nan, np.nan], "diff_hi": [0.6, 0.1, np.nan, np.nan]})
    md = headline_markdown(table, runs, targets=["loss_gap"], along=along)
    assert ("Along training, conv_trace predicts the loss gap best at training loss 1 (τ = 0.60 "
            "[0.40, 0.80], 32 runs), against τ = 0.30 at the last level (0.1); there it is ahead "
            "of the best tracked baseline path_norm") in md
