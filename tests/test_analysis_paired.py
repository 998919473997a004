"""Paired differences, sign errors, controls and the usable-run rule, against scipy on
expanded resamples and brute-force loops written here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from convflat.analysis import (
    add_controls,
    bootstrap_kendall,
    bootstrap_weights,
    one_axis_pairs,
    paired_psi_difference,
    paired_tau_difference,
    select_runs,
    sign_error_table,
)
from convflat.analysis.paired import PairedDifference
from convflat.usable import unusable_category, unusable_reason


def _grid(seed=0, seeds=3):
    rng = np.random.default_rng(seed)
    rows = []
    for a, b, s in itertools.product(range(3), range(4), range(seeds)):
        gap = 0.3 * a + 0.1 * b + 0.05 * rng.normal()
        rows.append({"status": "ok", "converged": True, "hp_a": a, "hp_b": b, "hp_seed": s,
                     "g": gap, "m_x": gap + 0.1 * rng.normal(), "m_y": rng.normal(),
                     "m_z": gap + 0.3 * rng.normal()})
    return pd.DataFrame(rows)


def test_paired_tau_difference_is_the_difference_of_scipy_taus_on_each_resample():
    runs = _grid()
    d = paired_tau_difference(runs, "m_x", "m_z", "g", n_boot=60, seed=5)
    w = bootstrap_weights(len(runs), 60, seed=5)
    samples = []
    for r in range(60):
        idx = np.repeat(np.arange(len(runs)), w[r].astype(int))
        sub = runs.iloc[idx]
        samples.append(scipy.stats.kendalltau(sub["m_x"], sub["g"])[0]
                       - scipy.stats.kendalltau(sub["m_z"], sub["g"])[0])
    lo, hi = np.quantile(samples, [0.025, 0.975])
    assert (d.lo, d.hi) == pytest.approx((lo, hi), abs=1e-12)
    full = (scipy.stats.kendalltau(runs["m_x"], runs["g"])[0]
            - scipy.stats.kendalltau(runs["m_z"], runs["g"])[0])
    assert d.diff == pytest.approx(full)
    assert d.n == len(runs) and d.verdict == ("wins" if lo > 0 else "ties" if hi >= 0 else
                                              "loses")


def test_paired_interval_is_narrower_than_the_marginal_ones_suggest():
    """Two measures with the same noise around the gap, one slightly better: the paired
    interval excludes 0 although the marginal intervals overlap."""
    runs = _grid(seeds=4)
    rng = np.random.default_rng(1)
    common = 0.1 * rng.normal(size=len(runs))
    runs["m_x"] = runs["g"] + common
    runs["m_z"] = runs["g"] + common + 0.1 * rng.normal(size=len(runs))
    d = paired_tau_difference(runs, "m_x", "m_z", "g", n_boot=400)
    assert d.lo > 0 and d.verdict == "wins"
    x = bootstrap_kendall(runs["m_x"], runs["g"], n_boot=400)
    z = bootstrap_kendall(runs["m_z"], runs["g"], n_boot=400)
    assert x.lo < z.hi  # the marginal intervals overlap


def test_orientation_uses_the_controls_better_direction():
    runs = _grid()
    runs["m_neg"] = -runs["m_z"]
    d = paired_tau_difference(runs, "m_x", "m_neg", "g", n_boot=50, orient_b=True)
    plain = paired_tau_difference(runs, "m_x", "m_z", "g", n_boot=50)
    assert d.orientation == -1.0
    assert (d.diff, d.lo, d.hi) == pytest.approx((plain.diff, plain.lo, plain.hi))


def test_paired_psi_difference_matches_a_loop_over_groups():
    runs = _grid()
    d = paired_psi_difference(runs, "m_x", "m_y", "g", n_boot=100, seed=3)
    psi = []
    for other in ("hp_b", "hp_a"):  # groups of one axis: the other axis and the seed fixed
        taus = []
        for _, grp in runs.groupby([other, "hp_seed"]):
            taus.append(scipy.stats.kendalltau(grp["m_x"], grp["g"])[0]
                        - scipy.stats.kendalltau(grp["m_y"], grp["g"])[0])
        psi.append(np.mean(taus))
    assert d.diff == pytest.approx(np.mean(psi))
    assert d.n == 4 * 3 + 3 * 3
    assert d.lo <= d.diff <= d.hi


def test_verdict_words():
    def pd_(lo, hi):
        return PairedDifference("a", "b", "g", "tau", 0.0, lo, hi, 0.95, 10)
    assert pd_(0.1, 0.3).verdict == "wins" and pd_(-0.3, -0.1).verdict == "loses"
    assert pd_(-0.1, 0.1).verdict == "ties" and pd_(np.nan, np.nan).verdict == "undecided"


def test_one_axis_pairs_and_noise_rule_by_hand():
    runs = _grid()
    pairs = one_axis_pairs(runs, "g", noise_z=0.0)
    # differ in exactly one of a, b (same seed): a-pairs 3 per (b, seed) -> 3*4*3 = 36,
    # b-pairs 6 per (a, seed) -> 6*3*3 = 54
    assert (pairs.family == "hp_a").sum() == 36 and (pairs.family == "hp_b").sum() == 54
    # the noise threshold is z * sqrt(2) * pooled within-configuration sd
    within = math.sqrt(sum(((grp["g"] - grp["g"].mean()) ** 2).sum()
                           for _, grp in runs.groupby(["hp_a", "hp_b"]))
                       / (len(runs) - 12))
    strict = one_axis_pairs(runs, "g", noise_z=2.0)
    assert strict.threshold == pytest.approx(2 * math.sqrt(2) * within)
    gi, gj = runs["g"].to_numpy()[strict.i], runs["g"].to_numpy()[strict.j]
    assert (np.abs(gi - gj) > strict.threshold).all()
    assert len(strict.i) + sum(strict.n_dropped.values()) == 90
    single = one_axis_pairs(runs[runs["hp_seed"] == 0], "g")
    assert math.isnan(single.threshold) and "every pair is kept" in single.note


def test_sign_error_ties_count_half():
    runs = pd.DataFrame({"hp_a": [0, 1, 2], "hp_seed": 0, "g": [0.1, 0.2, 0.3],
                         "m_flat": [1.0, 1.0, 1.0], "m_bad": [3.0, 2.0, 1.0]})
    se = sign_error_table(runs, ["m_flat", "m_bad"], "g")
    assert se.loc["m_flat", "a"] == 0.5 and se.loc["m_bad", "a"] == 1.0
    assert se.loc["m_bad", "worst_family"] == "a" and se.loc["m_bad", "pairs[a]"] == 3


def test_add_controls_skips_constant_and_categorical_columns():
    runs = _grid()
    runs["train_loss"] = np.linspace(0.008, 0.01, len(runs))
    runs["n_params"] = 1000  # one architecture: constant
    runs["hp_opt"] = "sgd"
    runs.loc[0, "hp_opt"] = "adam"
    out = add_controls(runs)
    assert [c for c in out.columns if c.startswith("c_")] == ["c_train_loss", "c_hp_a",
                                                               "c_hp_b"]
    assert (out["c_hp_a"] == runs["hp_a"]).all()


@pytest.mark.parametrize("row, category", [
    ({"status": "ok", "converged": True, "train_loss": 0.01, "initial_loss": 2.3}, None),
    ({"status": "ok", "converged": True, "train_loss": 7e18, "initial_loss": 2.3},
     "diverged (final loss >= initial loss)"),
    ({"status": "ok", "converged": True, "train_loss": float("inf")}, "training loss not finite"),
    ({"status": "ok", "converged": True, "train_loss": ""}, "training loss not finite"),
    ({"status": "ok", "converged": "False", "train_loss": 0.5}, "not converged"),
    ({"status": "diverged", "converged": False, "train_loss": 0.5}, "status=diverged"),
    # no initial loss recorded: the uniform prediction's ln(K) bounds it
    ({"status": "ok", "converged": True, "train_loss": 2.5, "num_classes": 10},
     "diverged (final loss >= initial loss)"),
    ({"status": "ok", "converged": True, "train_loss": 2.2, "num_classes": 10}, None),
    ({"status": "ok", "converged": "1.0"}, None),  # a hand-made table without losses
])
def test_usable_rule_on_hand_cases(row, category):
    assert unusable_category(row) == category
    reason = unusable_reason(row)
    assert (reason is None) == (category is None)
    if category and category.startswith("diverged"):
        assert reason.startswith("diverged: final training loss")


def test_select_runs_counts_each_run_once_by_first_rule():
    runs = pd.DataFrame({
        "status": ["ok", "ok", "failed", "ok", "ok"],
        "converged": [True, False, False, True, True],
        "train_loss": [0.01, 0.02, np.nan, 9.0, np.nan],
        "initial_loss": [2.3, 2.3, 2.3, 2.3, 2.3]})
    sel = select_runs(runs)
    assert sel.n_runs == 1
    assert sel.excluded == {"status=failed": 1, "training loss not finite": 1,
                            "diverged (final loss >= initial loss)": 1, "not converged": 1}


def test_an_old_record_without_initial_loss_is_bounded_by_ln_k():
    """A train.json from before initial_loss: the runs table carries the data's class count,
    so a run that ended at loss 7e18 is still left out as diverged (ln 10 < 7e18)."""
    from convflat.analysis.runs import build_runs_table

    base = {"status": "ok", "converged": True, "dataset": {"num_classes": 10},
            "stopping": {"target": None}}
    records = [{**base, "train_loss": 7e18}, {**base, "train_loss": 0.2}]
    measured = [{"status": "ok", "values": {"conv_trace": 1.0}}] * 2
    runs = build_runs_table("s", ["a", "b"], {"a": {}, "b": {}}, records, measured)
    assert runs["num_classes"].tolist() == [10, 10] and runs["initial_loss"].isna().all()
    sel = select_runs(runs)
    assert sel.runs["run_id"].tolist() == ["b"]
    assert sel.excluded == {"diverged (final loss >= initial loss)": 1}
