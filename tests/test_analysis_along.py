"""Flatness along training: levels, log-log interpolation by hand, tau against scipy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from convflat.analysis.along import (
    along_markdown,
    along_sentence,
    loss_levels,
    tau_along_training,
    tracked_keys,
    values_at_levels,
)
from convflat.analysis.figures import plot_tau_along_training


def _history(losses, traces, extra=None):
    h = []
    for k, (loss, tr) in enumerate(zip(losses, traces, strict=True)):
        e = {"epoch": k + 1, "lr": 0.1, "loss": loss * 1.1, "train_loss_eval": loss,
             "conv_trace": tr, "conv_relative_flatness": 2 * tr, "seconds": 0.1}
        if extra is not None:
            e["frobenius_norm"] = extra[k]
        h.append(e)
    return h


def test_log_log_interpolation_by_hand():
    h = _history([1.0, 0.1, 0.02, 0.009], [10.0, 4.0, 2.0, 1.0])
    # 0.05 lies between epoch 2 (0.1, 4) and epoch 3 (0.02, 2): a power law between them
    t = (math.log(0.05) - math.log(0.1)) / (math.log(0.02) - math.log(0.1))
    ref = math.exp(math.log(4.0) + t * (math.log(2.0) - math.log(4.0)))
    got = values_at_levels(h, "conv_trace", [0.05, 0.1, 2.0, 0.001])
    assert got[0] == pytest.approx(ref)
    assert got[1] == pytest.approx(4.0)       # exactly at an epoch's loss
    assert np.isnan(got[2])                   # above the first epoch's loss: not observed
    assert np.isnan(got[3])                   # never reached
    # a measure missing at the crossing epoch: the nearest epochs that have it
    h[2]["conv_trace"] = None
    t2 = (math.log(0.05) - math.log(0.1)) / (math.log(0.009) - math.log(0.1))
    ref2 = math.exp(math.log(4.0) + t2 * (math.log(1.0) - math.log(4.0)))
    assert values_at_levels(h, "conv_trace", [0.05])[0] == pytest.approx(ref2)
    # a non-positive value falls back to linear interpolation in the value
    h[2]["conv_trace"] = -2.0
    assert values_at_levels(h, "conv_trace", [0.05])[0] == pytest.approx(4.0 + t * (-6.0))


def test_levels_span_the_common_range():
    hs = {"a": _history([1.0, 0.1, 0.01], [1, 1, 1]), "b": _history([0.5, 0.05, 0.008],
                                                                     [1, 1, 1])}
    lv = loss_levels(hs, n_levels=5, target=0.01)
    assert lv.top == 0.5 and lv.bottom == 0.01
    assert lv.levels == pytest.approx(np.geomspace(0.5, 0.01, 5))
    lv = loss_levels(hs, n_levels=4)
    assert lv.bottom == 0.01 and "no loss target" in lv.bottom_from
    with pytest.raises(ValueError, match="n_levels"):
        loss_levels(hs, n_levels=1)


def test_tau_at_each_level_matches_scipy_and_pairs_with_the_best_baseline():
    rng = np.random.default_rng(0)
    runs, hists = [], {}
    for k in range(12):
        gap = rng.uniform(0.1, 1.0)
        losses = np.geomspace(rng.uniform(1.5, 2.5), 0.009, 6 + k % 3)
        # early on the trace tracks the gap, at the end only noise
        traces = [gap * (1 + 0.2 * rng.normal()) * (loss > 0.05) + rng.uniform(0.5, 1.5)
                  * (loss <= 0.05) for loss in losses]
        norms = [gap + 3 + 0.01 * j for j in range(len(losses))]
        hists[f"r{k}"] = _history(list(losses), traces, norms)
        runs.append({"run_id": f"r{k}", "loss_gap": gap})
    runs = pd.DataFrame(runs)
    assert tracked_keys(hists) == ["conv_trace", "conv_relative_flatness", "frobenius_norm"]
    lv = loss_levels(hists, n_levels=4, target=0.01)
    table = tau_along_training(runs, hists, "loss_gap", levels=lv, n_boot=100)
    assert len(table) == 4 * 3
    for j, level in enumerate(lv.levels):
        x = [values_at_levels(hists[r], "conv_trace", [level])[0] for r in runs["run_id"]]
        ok = np.isfinite(x)
        row = table[(table["level_index"] == j) & (table["measure"] == "conv_trace")].iloc[0]
        assert row["n"] == ok.sum()
        if ok.sum() >= 2:
            ref = scipy.stats.kendalltau(np.array(x)[ok], runs["loss_gap"][ok])[0]
            assert row["tau"] == pytest.approx(ref)
        assert row["best_baseline"] == "frobenius_norm"
    md = along_markdown({"loss_gap": table}, lv, title="toy")
    assert "**conv_trace (ours)**" in md and "| frobenius_norm |" in md
    sentence = along_sentence(table, "loss_gap")
    assert sentence.startswith("Along training, ") and "best tracked baseline" in sentence


def test_figure(tmp_path):
    table = pd.DataFrame({
        "loss_level": [1.0, 0.1, 1.0, 0.1], "level_index": [0, 1, 0, 1],
        "measure": ["conv_trace", "conv_trace", "frobenius_norm", "frobenius_norm"],
        "ours": [True, True, False, False], "tau": [0.5, 0.2, 0.3, 0.3],
        "tau_lo": [0.3, 0.0, 0.1, 0.1], "tau_hi": [0.7, 0.4, 0.5, 0.5]})
    png, pdf = plot_tau_along_training({"loss_gap": table}, tmp_path / "t")
    assert png.read_bytes()[:4] == b"\x89PNG" and pdf.stat().st_size > 1000


def test_write_from_records_with_the_subset_note(tmp_path):
    rng = np.random.default_rng(3)
    runs, records = [], {}
    for k in range(8):
        gap = rng.uniform(0.1, 1.0)
        losses = list(np.geomspace(2.0, 0.009, 7))
        records[f"r{k}"] = {"history": _history(losses, [gap + 0.1 * j for j in range(7)]),
                            "flatness_tracking": {"n_samples": 1024},
                            "dataset": {"n_train": 300 if k % 2 else 1437}}
        runs.append({"run_id": f"r{k}", "status": "ok", "converged": True, "loss_gap": gap,
                     "acc_gap": gap / 2, "loss_target": 0.01, "train_loss": 0.009})
    from convflat.analysis.along import write_tau_along_training
    tables, levels, note = write_tau_along_training(
        pd.DataFrame(runs), records, tmp_path / "tau_along_training",
        targets=["loss_gap", "acc_gap"], n_levels=5, n_boot=50)
    assert levels.bottom == 0.01 and len(levels.levels) == 5
    assert set(tables) == {"loss_gap", "acc_gap"}
    csv = pd.read_csv(tmp_path / "tau_along_training.csv")
    assert set(csv["target"]) == {"loss_gap", "acc_gap"} and len(csv) == 2 * 5 * 2
    assert "in 4 of 8 runs it is smaller than the training split (1024 of 1437" in note
    assert note in (tmp_path / "tau_along_training.md").read_text()


def test_sentence_when_the_last_level_predicts_best():
    table = pd.DataFrame({
        "loss_level": [1.0, 0.01], "level_index": [0, 1], "measure": "conv_trace",
        "ours": True, "tau": [0.2, 0.6], "tau_lo": [0.0, 0.4], "tau_hi": [0.4, 0.8],
        "n": 10, "best_baseline": "", "diff": np.nan, "diff_lo": np.nan, "diff_hi": np.nan})
    assert along_sentence(table, "loss gap") == (
        "Along training, conv_trace predicts the loss gap best at the last level, training "
        "loss 0.01 (τ = 0.60 [0.40, 0.80], 10 runs): no earlier level predicts better.")
