"""convflat.analysis statistics: against scipy, by hand, and on the edge cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from convflat.analysis import (
    bootstrap_kendall,
    bootstrap_weights,
    conditional_mutual_information,
    correlation_table,
    granulated_kendall,
    kendall_tau,
    pearson,
    select_runs,
    spearman,
)

X = np.array([3.1, 0.2, 5.5, 2.2, 2.2, 9.0, 4.4, 0.9, 7.3, 6.1, 1.5, 3.3])
Y = np.array([1.0, 0.5, 2.0, 1.5, 0.7, 3.0, 1.5, 0.1, 2.2, 2.5, 0.4, 1.0])  # ties in x and y


def _grid(levels=(3, 2, 3), seeds=2, noise=0.02, seed=0):
    """A complete grid over hp_a, hp_b, hp_c and hp_seed with a gap driven by a and b."""
    rng = np.random.default_rng(seed)
    rows = []
    values = [range(k) for k in levels]
    for (a, b, c), s in itertools.product(itertools.product(*values), range(seeds)):
        gap = 0.1 * a + 0.05 * b + 0.01 * c + noise * rng.normal()
        rows.append({
            "run_id": f"a~{a}/b~{b}/c~{c}/seed~{s}", "study": "toy", "status": "ok",
            "converged": True, "hp_a": a, "hp_b": b, "hp_c": c, "hp_seed": s,
            "loss_gap": gap, "acc_gap": gap / 2, "test_error": 0.1 + gap / 2,
            "m_conv_trace": math.exp(3 * gap),          # orders every pair like the gap
            "m_random": rng.normal(),                   # independent of everything
        })
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------ vs scipy


@pytest.mark.parametrize("x, y", [(X, Y), (X, -Y), (np.arange(7.0), np.arange(7.0) ** 2)])
def test_kendall_spearman_pearson_match_scipy(x, y):
    assert kendall_tau(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)


def test_tau_a_by_hand_and_equal_to_tau_b_without_ties():
    # pairs of (1,2,2) vs (1,2,3): (1,2) +, (1,3) +, (2,3) tie in x -> 0; tau_a = 2/3.
    assert kendall_tau([1, 2, 2], [1, 2, 3], variant="a") == pytest.approx(2 / 3)
    # tau_b = 2 / sqrt(2 * 3)
    assert kendall_tau([1, 2, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(6))
    x, y = np.arange(6.0), np.array([0, 2, 1, 5, 3, 4.0])
    assert kendall_tau(x, y, variant="a") == pytest.approx(kendall_tau(x, y, variant="b"))
    with pytest.raises(ValueError, match="variant"):
        kendall_tau(x, y, variant="c")


def test_bootstrap_resamples_are_scipy_taus_of_resampled_runs():
    ci = bootstrap_kendall(X, Y, n_boot=50, seed=7)
    weights = bootstrap_weights(X.size, 50, seed=7)
    for b in (0, 13, 49):
        idx = np.repeat(np.arange(X.size), weights[b].astype(int))
        ref = scipy.stats.kendalltau(X[idx], Y[idx]).statistic
        assert ci.samples[b] == pytest.approx(ref, abs=1e-12) or (
            np.isnan(ref) and np.isnan(ci.samples[b]))
    finite = ci.samples[np.isfinite(ci.samples)]
    assert (ci.lo, ci.hi) == pytest.approx(tuple(np.quantile(finite, [0.025, 0.975])))
    again = bootstrap_kendall(X, Y, n_boot=50, seed=7)
    assert (again.lo, again.hi) == (ci.lo, ci.hi)  # seeded
    assert ci.lo <= kendall_tau(X, Y) <= ci.hi


def test_correlation_table_matches_scipy_per_cell():
    runs = _grid()
    runs["m_random"] = np.random.default_rng(3).normal(size=len(runs))
    table = correlation_table(runs, n_boot=100)
    for t in ("loss_gap", "acc_gap", "test_error"):
        for m in ("conv_trace", "random"):
            x, y = runs[f"m_{m}"].to_numpy(), runs[t].to_numpy()
            assert table.loc[m, f"{t}.tau"] == pytest.approx(scipy.stats.kendalltau(x, y)[0])
            assert table.loc[m, f"{t}.spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0])
            assert table.loc[m, f"{t}.pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0])
            assert table.loc[m, f"{t}.n"] == len(runs)
    assert table.loc["conv_trace", "loss_gap.tau"] == pytest.approx(1.0)
    assert table.loc["conv_trace", "ours"] and not table.loc["random", "ours"]
    # the measures, then a control per varying numeric grid axis (the seed is not one)
    assert list(table.index) == ["conv_trace", "random", "control:a", "control:b", "control:c"]
    assert list(table["kind"]) == ["ours", "baseline", "control", "control", "control"]
    for axis in ("a", "b", "c"):
        for t in ("loss_gap", "test_error"):
            ref = scipy.stats.kendalltau(runs[f"hp_{axis}"], runs[t])[0]
            assert table.loc[f"control:{axis}", f"{t}.tau"] == pytest.approx(ref)
        assert np.isnan(table.loc[f"control:{axis}", "loss_gap.psi"])  # +-1 by construction
    assert list(correlation_table(runs, n_boot=10, controls=False).index) == [
        "conv_trace", "random"]
    assert (table["n_runs"] == len(runs)).all() and (table["n_excluded"] == 0).all()


# ----------------------------------------------------------------------------- Psi


def _hand_grid(seed1_concordant: bool = False) -> pd.DataFrame:
    """Axes a in {1,2,3}, b in {1,2}; gap = a + 10 b. See test_psi_by_hand for the taus."""
    mu = {(1, 1): 1, (2, 1): 3, (3, 1): 2, (1, 2): 30, (2, 2): 20, (3, 2): 10}
    rows = []
    for seed in (0, 1) if seed1_concordant else (0,):
        for (a, b), m in mu.items():
            rows.append({"status": "ok", "converged": True, "hp_a": a, "hp_b": b,
                         "hp_seed": seed, "loss_gap": a + 10 * b,
                         "m_x": m if seed == 0 else a + 10 * b})
    return pd.DataFrame(rows)


def test_psi_by_hand():
    # Axis a (b fixed): b=1: mu 1,3,2 against gap 11,12,13 -> (+, +, -) -> tau = 1/3;
    #                   b=2: mu 30,20,10 against 21,22,23 -> all discordant -> tau = -1.
    #   psi_a = (1/3 - 1) / 2 = -1/3.
    # Axis b (a fixed): a=1: (1, 30) vs (11, 21) -> +1; a=2 -> +1; a=3 -> +1. psi_b = 1.
    # Psi = (-1/3 + 1) / 2 = 1/3.
    res = granulated_kendall(_hand_grid(), "m_x", "loss_gap", n_boot=0)
    assert res.per_axis == pytest.approx({"hp_a": -1 / 3, "hp_b": 1.0})
    assert res.n_groups == {"hp_a": 2, "hp_b": 3}
    assert res.psi == pytest.approx(1 / 3)
    assert res.note == ""


def test_psi_seed_is_held_fixed_not_an_axis():
    # Seed 1 is concordant everywhere: its two a-groups give tau = 1 and its three b-groups 1.
    # psi_a = (1/3 - 1 + 1 + 1) / 4 = 1/3, psi_b = 1, Psi = 2/3; hp_seed is not an axis.
    res = granulated_kendall(_hand_grid(seed1_concordant=True), "m_x", "loss_gap", n_boot=200)
    assert set(res.per_axis) == {"hp_a", "hp_b"}
    assert res.per_axis["hp_a"] == pytest.approx(1 / 3)
    assert res.n_groups == {"hp_a": 4, "hp_b": 6}
    assert res.psi == pytest.approx(2 / 3)
    assert res.lo <= res.psi <= res.hi


def test_psi_incomplete_grid_is_reported():
    runs = _hand_grid().query("not (hp_a == 3 and hp_b == 2)")
    res = granulated_kendall(runs, "m_x", "loss_gap", n_boot=0)
    # b=2 group is now (1, 30), (2, 20) against 21, 22 -> -1: psi_a unchanged; a=3 has 1 run.
    assert res.per_axis == pytest.approx({"hp_a": -1 / 3, "hp_b": 1.0})
    assert res.n_groups == {"hp_a": 2, "hp_b": 2}
    assert "< 2 runs" in res.note and "b 1" in res.note
    # No pair differs only in b: psi_b is undefined, Psi is psi_a, and the note says so.
    full = _hand_grid()
    cells = list(zip(full["hp_a"], full["hp_b"], strict=True))
    diag = full[[c in {(1, 1), (2, 2), (3, 1)} for c in cells]]
    res = granulated_kendall(diag, "m_x", "loss_gap", n_boot=100)
    assert math.isnan(res.per_axis["hp_b"]) and res.n_groups["hp_b"] == 0
    assert res.psi == pytest.approx(res.per_axis["hp_a"])
    assert "1 of 2 axes" in res.note and "CI needs" in res.note


# ----------------------------------------------------------------------------- CMI


def test_cmi_is_one_for_a_measure_that_orders_pairs_like_the_gap():
    runs = _grid()
    res = conditional_mutual_information(runs, "m_conv_trace", "loss_gap")
    assert res.value == pytest.approx(1.0, abs=1e-12)
    assert set(res.per_set) >= {(), ("hp_a",), ("hp_a", "hp_b")}
    assert not any("hp_seed" in s for s in res.per_set)  # seed is never conditioned on
    runs["m_reversed"] = -runs["m_conv_trace"]  # sign-blind: read CMI beside tau
    assert conditional_mutual_information(runs, "m_reversed", "loss_gap").value == (
        pytest.approx(1.0))


def test_cmi_near_zero_for_an_independent_measure():
    runs = _grid(levels=(4, 4, 4), seeds=2, seed=1)
    res = conditional_mutual_information(runs, "m_random", "loss_gap")
    assert 0.0 <= res.value < 0.02
    assert res.per_set[()] < 0.01


def _cmi_reference(mu, g, strata):
    """Brute force over ordered pairs with dictionaries, straight from the definition."""
    joint = {}
    for i, j in itertools.permutations(range(len(mu)), 2):
        if g[i] == g[j]:
            continue
        key = (strata[i], strata[j])
        cell = (key, np.sign(mu[i] - mu[j]), np.sign(g[i] - g[j]))
        joint[cell] = joint.get(cell, 0) + 1
    total = sum(joint.values())
    def marg(f):
        out = {}
        for c, n in joint.items():
            out[f(c)] = out.get(f(c), 0) + n / total
        return out
    pu = marg(lambda c: c[0])
    pua, pub = marg(lambda c: (c[0], c[1])), marg(lambda c: (c[0], c[2]))
    mi = sum(n / total * math.log((n / total) * pu[c[0]] / (pua[c[0], c[1]] * pub[c[0], c[2]]))
             for c, n in joint.items())
    h = -sum(p * math.log(p / pu[k[0]]) for k, p in pub.items())
    return mi / h


def test_cmi_matches_a_brute_force_reference():
    runs = _grid(levels=(3, 2, 2), seeds=1, noise=0.05, seed=4)
    rng = np.random.default_rng(5)
    runs["m_noisy"] = runs["loss_gap"] + 0.05 * rng.normal(size=len(runs))
    runs.loc[:3, "m_noisy"] = 0.1  # ties in the measure
    res = conditional_mutual_information(runs, "m_noisy", "loss_gap", axes=["hp_a", "hp_b"])
    mu, g = runs["m_noisy"].to_numpy(), runs["loss_gap"].to_numpy()
    a, b = runs["hp_a"].to_numpy(), runs["hp_b"].to_numpy()
    assert res.per_set[()] == pytest.approx(_cmi_reference(mu, g, [0] * len(mu)))
    assert res.per_set[("hp_a",)] == pytest.approx(_cmi_reference(mu, g, list(a)))
    assert res.per_set[("hp_a", "hp_b")] == pytest.approx(
        _cmi_reference(mu, g, list(zip(a, b, strict=True))))
    assert res.value == pytest.approx(min(res.per_set.values()))


def test_cmi_skips_sets_that_fix_the_gap_order():
    runs = _grid(noise=0.0)
    runs["loss_gap"] = runs["hp_a"] * 1.0  # a alone decides every untied pair's order
    res = conditional_mutual_information(runs, "m_random", "loss_gap")
    assert math.isnan(res.per_set[("hp_a",)])
    assert res.argmin is not None and "hp_a" not in res.argmin
    assert "skipped" in res.note


# ----------------------------------------------------------------------- edge cases


def test_exclusions_are_counted():
    runs = _grid()
    runs.loc[0, "status"] = "diverged"
    runs.loc[1, "status"] = "failed"
    runs.loc[2, "converged"] = False
    runs["converged"] = runs["converged"].map({True: "True", False: "False"})  # as from a CSV
    sel = select_runs(runs)
    assert sel.n_excluded == 3 and sel.n_runs == len(runs) - 3
    assert sel.excluded == {"status=diverged": 1, "status=failed": 1, "not converged": 1}
    table = correlation_table(runs, n_boot=50)
    assert (table["n_excluded"] == 3).all() and table.attrs["n_excluded"] == 3
    assert "status=diverged: 1" in table.attrs["selection"]
    assert select_runs(runs, require_converged=False).n_runs == len(runs) - 2


def test_single_run_gives_nan_with_a_reason():
    table = correlation_table(_grid().iloc[:1], n_boot=50)
    row = table.loc["conv_trace"]
    for stat in ("tau", "tau_lo", "spearman", "pearson", "psi", "cmi"):
        assert math.isnan(row[f"loss_gap.{stat}"])
    assert "1 usable run" in row["loss_gap.note"]


def test_constant_measure_and_ties():
    runs = _grid()
    runs["m_const"] = 2.0
    runs["m_tied"] = np.round(runs["loss_gap"], 1)  # few distinct values
    table = correlation_table(runs, n_boot=50)
    assert math.isnan(table.loc["const", "loss_gap.tau"])
    assert math.isnan(table.loc["const", "loss_gap.psi"])
    assert "measure is constant" in table.loc["const", "loss_gap.note"]
    x, y = runs["m_tied"], runs["loss_gap"]
    assert table.loc["tied", "loss_gap.tau"] == pytest.approx(scipy.stats.kendalltau(x, y)[0])
    assert 0.5 < table.loc["tied", "loss_gap.tau"] < 1.0


def test_missing_values_are_left_out_per_measure():
    runs = _grid()
    runs.loc[:4, "m_random"] = np.nan
    runs.loc[5, "m_random"] = np.inf
    table = correlation_table(runs, n_boot=50)
    assert table.loc["random", "loss_gap.n"] == len(runs) - 6
    assert "6 run(s) without a finite" in table.loc["random", "loss_gap.note"]
    assert table.loc["conv_trace", "loss_gap.n"] == len(runs)


def test_bad_input_raises_naming_the_column():
    runs = _grid()
    with pytest.raises(ValueError, match="'acc_gap'"):
        correlation_table(runs.drop(columns="acc_gap"))
    bad = runs.astype({"m_random": object})
    bad.loc[3, "m_random"] = "oops"
    with pytest.raises(ValueError, match="m_random"):
        correlation_table(bad)
    with pytest.raises(ValueError, match="converged"):
        correlation_table(runs.assign(converged="maybe"))
    with pytest.raises(ValueError, match="no usable runs"):
        correlation_table(runs.assign(status="failed"))
    with pytest.raises(ValueError, match="no measure column"):
        correlation_table(runs.drop(columns=["m_conv_trace", "m_random"]))
