"""Spread ratio, convergence accounting and the correlation table's recorded CI settings."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from convflat.analysis import (
    convergence_summary,
    correlation_markdown,
    correlation_table,
    read_correlation_table,
    spread_ratio,
    write_correlation_table,
)

# ------------------------------------------------------------------ spread ratio


def _spread_runs() -> pd.DataFrame:
    """Three configurations (width x depth) with 2, 3 and 1 seeds, one diverged run and
    one run that did not converge, both of which must be left out."""
    rows = [
        # width 8, depth 2: gaps 0.10, 0.14
        (8, 2, 0, 0.10), (8, 2, 1, 0.14),
        # width 8, depth 3: gaps 0.30, 0.33, 0.36
        (8, 3, 0, 0.30), (8, 3, 1, 0.33), (8, 3, 2, 0.36),
        # width 16, depth 2: one seed, gap 0.50
        (16, 2, 0, 0.50),
    ]
    df = pd.DataFrame(rows, columns=["hp_width", "hp_depth", "hp_seed", "loss_gap"])
    df["status"], df["converged"] = "ok", True
    extra = pd.DataFrame([
        {"hp_width": 16, "hp_depth": 2, "hp_seed": 1, "loss_gap": 9.0, "status": "diverged",
         "converged": False},
        {"hp_width": 8, "hp_depth": 2, "hp_seed": 2, "loss_gap": -5.0, "status": "ok",
         "converged": False},
    ])
    return pd.concat([df, extra], ignore_index=True)


def test_spread_ratio_by_hand():
    r = spread_ratio(_spread_runs())
    # configuration means: 0.12, 0.33, 0.50; their mean 0.95/3; sample sd (ddof = 1):
    means = [0.12, 0.33, 0.50]
    mbar = sum(means) / 3
    between = math.sqrt(sum((m - mbar) ** 2 for m in means) / 2)
    # within: squares 0.02^2 * 2 + (0.03^2 * 2 + 0) = 0.0008 + 0.0018 = 0.0026 over
    # dof (2 - 1) + (3 - 1) + (1 - 1) = 3
    within = math.sqrt(0.0026 / 3)
    assert r.between == pytest.approx(between, rel=1e-12)
    assert r.within == pytest.approx(within, rel=1e-12)
    assert r.ratio == pytest.approx(between / within, rel=1e-12)
    assert r.ratio == pytest.approx(6.4659, abs=1e-3)  # the same, as a number
    assert (r.n_configs, r.n_replicated, r.n_runs, r.dof) == (3, 2, 6, 3)
    assert set(r.axes) == {"hp_width", "hp_depth"} and r.note == ""
    assert "6.47" in r.line()


def test_spread_ratio_is_one_over_sqrt_seeds_without_effect():
    # 200 configurations, 4 seeds each, pure noise: between ~ within / 2.
    rng = np.random.default_rng(1)
    rows = [{"hp_a": a, "hp_seed": s, "loss_gap": rng.normal(), "status": "ok",
             "converged": True} for a, s in itertools.product(range(200), range(4))]
    r = spread_ratio(pd.DataFrame(rows))
    assert r.ratio == pytest.approx(0.5, abs=0.06)


def test_spread_ratio_combined_table_separates_studies():
    a = _spread_runs().assign(study="a")
    b = _spread_runs().assign(study="b")
    b["loss_gap"] = b["loss_gap"] + 1.0
    r = spread_ratio(pd.concat([a, b], ignore_index=True))
    assert r.n_configs == 6 and "study" in r.axes
    assert r.within == pytest.approx(math.sqrt(0.0052 / 6), rel=1e-12)


def test_spread_ratio_undefined_cases():
    runs = _spread_runs()
    one_seed = runs[runs["hp_seed"] == 0]
    r = spread_ratio(one_seed)
    assert math.isnan(r.ratio) and "no configuration has >= 2 runs" in r.note
    assert "undefined" in r.line()
    one_config = runs[(runs["hp_width"] == 8) & (runs["hp_depth"] == 3)]
    r = spread_ratio(one_config)
    assert math.isnan(r.ratio) and "1 configuration(s)" in r.note
    same = runs.copy()
    same["loss_gap"] = same["hp_depth"] * 1.0
    r = spread_ratio(same)
    assert math.isinf(r.ratio) and "within sd = 0" in r.note
    with pytest.raises(ValueError, match="acc_gap"):
        spread_ratio(runs, target="acc_gap")
    with pytest.raises(ValueError, match="no usable runs"):
        spread_ratio(runs.assign(status="failed"))


# -------------------------------------------------------------- convergence summary


def _conv_runs(n_ok: int, n_capped: int, losses, lr=None) -> pd.DataFrame:
    rows = [{"status": "ok", "converged": True, "train_loss": loss} for loss in losses]
    assert len(rows) == n_ok
    rows += [{"status": "ok", "converged": False, "train_loss": 0.4}] * n_capped
    df = pd.DataFrame(rows)
    if lr is not None:
        df["lr_at_stop"] = list(lr) + [0.1] * n_capped
    return df


def test_convergence_all_good():
    runs = _conv_runs(9, 1, [0.009, 0.0095, 0.0099, 0.0081, 0.0060, 0.0090, 0.0070,
                             0.0099, 0.0098], lr=[0.05] * 4 + [0.1] * 5)
    c = convergence_summary(runs)
    assert (c.n_total, c.n_converged) == (10, 9) and c.share == pytest.approx(0.9)
    assert c.loss_min == pytest.approx(0.006) and c.loss_max == pytest.approx(0.0099)
    assert c.loss_ratio == pytest.approx(0.0099 / 0.006) and c.within_factor
    assert (c.lr_column, c.lr_min, c.lr_max) == ("lr_at_stop", 0.05, 0.1)
    assert c.warnings == () and c.excluded == {"not converged": 1}
    md = c.markdown()
    assert "9 of 10 runs (90%)" in md and "**" not in md
    assert "0.05-0.1" in md and "1.65" in md


def test_convergence_warns_in_bold():
    # 7 of 10 converged (70 % < 80 %), and their losses span 0.002-0.009 (factor 4.5)
    runs = _conv_runs(7, 2, [0.002, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009])
    runs = pd.concat([runs, pd.DataFrame([{"status": "diverged", "converged": False,
                                           "train_loss": float("nan")}])], ignore_index=True)
    c = convergence_summary(runs)
    assert c.share == pytest.approx(0.7) and not c.within_factor
    assert c.loss_ratio == pytest.approx(4.5)
    assert c.lr_column is None and c.lr_min is None
    md = c.markdown()
    assert "**Warning: only 7 of 10 runs (70%)" in md
    assert "a factor 4.5 > 2" in md and md.count("**Warning") == 2
    assert "learning rate" not in md
    assert "status=diverged: 1" in md and "not converged: 2" in md
    # at exactly 80 % and a factor of exactly 2: no warning
    ok = _conv_runs(8, 2, [0.005, 0.01] * 4)
    assert convergence_summary(ok).warnings == ()


def test_convergence_needs_its_columns():
    runs = _conv_runs(2, 0, [0.01, 0.01])
    with pytest.raises(ValueError, match="train_loss"):
        convergence_summary(runs.drop(columns="train_loss"))
    with pytest.raises(ValueError, match="converged"):
        convergence_summary(runs.drop(columns="converged"))
    with pytest.raises(ValueError, match="no rows"):
        convergence_summary(runs.iloc[:0])
    c = convergence_summary(runs.assign(converged=False))
    assert c.share == 0 and any("no included run" in w for w in c.warnings)


# ------------------------------------------- CI settings survive the CSV (issue 16)


def _small_runs() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"status": "ok", "converged": True, "hp_a": a, "hp_seed": s,
             "loss_gap": a + rng.normal(), "m_conv_trace": a + rng.normal(),
             "m_other": rng.normal()} for a, s in itertools.product(range(4), range(2))]
    return pd.DataFrame(rows)


def test_correlation_csv_keeps_ci_settings_and_legend(tmp_path):
    table = correlation_table(_small_runs(), targets=["loss_gap"], n_boot=123, seed=7,
                              level=0.9, cmi=False)
    assert (table["n_boot"] == 123).all() and (table["seed"] == 7).all()
    assert (table["level"] == 0.9).all() and (table["variant"] == "b").all()
    paths = write_correlation_table(table, tmp_path / "correlation")
    md = paths[1].read_text()
    assert "90% percentile bootstrap CI over runs (123 resamples, seed 7)" in md
    back = read_correlation_table(paths[0])
    assert back.attrs["n_boot"] == 123 and back.attrs["seed"] == 7
    assert back.attrs["level"] == 0.9 and back.attrs["variant"] == "b"
    again = correlation_markdown(back)
    assert "(123 resamples, seed 7)" in again and "?" not in again


def test_table_without_settings_columns(tmp_path):
    table = correlation_table(_small_runs(), targets=["loss_gap"], n_boot=50, seed=3,
                              cmi=False)
    # a table from before the setting columns: only attrs know them; the CSV must keep them
    old = table.drop(columns=["n_boot", "level", "seed", "variant"])
    old.attrs = dict(table.attrs)
    csv = write_correlation_table(old, tmp_path / "c")[0]
    assert read_correlation_table(csv).attrs["n_boot"] == 50
    # a hand-made table with no record at all says so, with no "?" placeholders
    bare = old.copy()
    bare.attrs = {}
    text = correlation_markdown(bare)
    assert "resamples and seed not recorded" in text and "?" not in text
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_correlation_table(tmp_path / "nothere.csv")
