"""Training as a run object (issue 22 item 2) and divergence as a status (issue 21 item 2):
the weights of a short run are those recorded before the refactor, train.json's
``initial_loss`` and ``n_params`` match hand computations, and the divergence rule stops a
run that blows up or never gets below its initial loss, and no other."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from convflat.cli import main
from convflat.records import DIVERGED_REASONS
from convflat.train import TrainConfig, divergence_reason, train, watched_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"family": "gapcnn", "width": 8, "depth": 3}
FAST = TrainConfig(epochs=3, batch_size=64, lr=0.1, device="cpu")


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


# ---- same weights as before the refactor -----------------------------------------------------


def test_weights_match_the_value_recorded_before_the_refactor(tmp_path, digits):
    """The reference numbers were produced on main at b897406 (before training became a run
    object), with one torch thread, by this same run (dropout, crops and flips draw random
    numbers; BatchNorm keeps running statistics) and these same two sums over model.pt's
    floating-point tensors: the L1 norm, and sum_i w_i ((i mod 7) - 3) over each tensor's
    flattened entries, tensors in sorted-name order. A change in the order of the random
    numbers or of the steps moves them at the percent level; other CPUs' kernels round
    differently, hence the tolerance."""
    spec = {**SMALL, "dropout": 0.2}
    cfg = dataclasses.replace(FAST, crop_padding=1, flip=True)
    record = train(spec, digits, cfg, tmp_path)
    sd = _weights(tmp_path / "model.pt")
    l1 = sum(float(v.double().abs().sum()) for v in sd.values() if v.is_floating_point())
    signed = 0.0
    for name in sorted(sd):
        v = sd[name]
        if v.is_floating_point():
            w = (torch.arange(v.numel(), dtype=torch.float64) % 7) - 3
            signed += float((v.double().flatten() * w).sum())
    assert l1 == pytest.approx(784.7900137619099, rel=1e-5)
    assert signed == pytest.approx(-59.31986522209809, rel=1e-4, abs=1e-3)
    assert record["train_loss"] == pytest.approx(1.9674920275784644, rel=1e-5)
    assert [h["loss"] for h in record["history"]] == pytest.approx(
        [2.297617554664612, 2.1953169974413784, 2.1128119988874956], rel=1e-5)


# ---- initial_loss and n_params ---------------------------------------------------------------


def test_initial_loss_and_n_params(tmp_path, digits):
    """initial_loss: cross-entropy of init.pt's weights in eval mode over the whole
    un-augmented training split, recomputed here with a float64 log-softmax and one
    forward pass; n_params: counted by hand from the architecture (3 x 3 convs 1->8->16->32
    without bias, BatchNorm's scale and shift, a 32 -> 10 classifier with bias)."""
    from convflat.models import load_checkpoint

    cfg = dataclasses.replace(FAST, epochs=1, crop_padding=1, flip=True)
    record = train(SMALL, digits, cfg, tmp_path)
    model, _ = load_checkpoint(tmp_path / "init.pt")
    model.eval()
    x, y = digits.tensors("train")
    with torch.no_grad():
        logits = model(x).double()
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    reference = float(-logp[torch.arange(y.numel()), y].mean())
    assert record["initial_loss"] == pytest.approx(reference, rel=1e-6)
    assert 2.0 < record["initial_loss"] < 3.0  # near ln 10 for a fresh net
    assert record["n_params"] == 9 * (1 * 8 + 8 * 16 + 16 * 32) + 2 * (8 + 16 + 32) + 32 * 10 + 10


def test_initial_loss_survives_a_resume(tmp_path, digits, monkeypatch):
    """A run that fails after its last epoch and is started again resumes from its
    checkpoint (no epoch trained twice) and records the initial loss of the uninterrupted
    run, measured on the same scale as the history's train_loss_eval."""
    from convflat import train as cftrain

    cfg = dataclasses.replace(FAST, epochs=2, stop_loss=1e-9)
    ref = train(SMALL, digits, cfg, tmp_path / "ref")
    assert ref["history"][0]["train_loss_eval"] < ref["initial_loss"]

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(cftrain, "_final_metrics", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        train(SMALL, digits, cfg, tmp_path / "run")
    monkeypatch.undo()
    resumed = train(SMALL, digits, cfg, tmp_path / "run")
    assert resumed["resumes"] == 1
    assert resumed["initial_loss"] == ref["initial_loss"]
    assert resumed["n_params"] == ref["n_params"]


# ---- the divergence rule ---------------------------------------------------------------------


@pytest.mark.parametrize("losses, factor, patience, expected", [
    ([2.0, 1.0], 10.0, 3, None),
    ([2.0, math.nan], 10.0, 3, "diverged_non_finite"),
    ([math.inf], 0.0, 0, "diverged_non_finite"),
    ([23.1], 10.0, 3, "diverged_factor"),  # 23.1 > 10 x 2.3
    ([22.9], 10.0, 3, None),
    ([23.1], 0.0, 3, None),  # factor off
    ([2.4, 2.5], 10.0, 3, None),  # above 2.3 twice: patience 3 not reached
    ([2.4, 2.5, 2.31], 10.0, 3, "diverged_patience"),
    ([2.4, 2.2, 2.5, 2.31], 10.0, 3, None),  # the run of epochs above was broken
    ([2.4, 2.5, 2.31], 10.0, 0, None),  # patience off
    ([2.4, 2.5, 2.31], 10.0, None, None),
])
def test_divergence_rule(losses, factor, patience, expected):
    cfg = dataclasses.replace(FAST, divergence_factor=factor, divergence_patience=patience)
    assert divergence_reason(losses, 2.3, cfg) == expected


def test_divergence_rule_without_a_finite_initial_loss_checks_finiteness_only():
    assert divergence_reason([1e30, 1e30, 1e30], math.nan, FAST) is None
    assert divergence_reason([math.nan], None, FAST) == "diverged_non_finite"


def test_watched_loss_is_the_eval_loss_when_measured():
    entry = {"loss": 3.0, "train_loss_eval": None}
    assert watched_loss(entry) == 3.0
    assert watched_loss({**entry, "train_loss_eval": 2.0}) == 2.0
    assert math.isnan(watched_loss({"loss": None, "train_loss_eval": None}))


@pytest.mark.parametrize("bad", [0.5, 1.0, -2.0, math.inf, True, "high"])
def test_divergence_factor_must_exceed_one(bad):
    with pytest.raises(ValueError, match="TrainConfig.divergence_factor"):
        TrainConfig(divergence_factor=bad)


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_divergence_patience_must_be_a_count(bad):
    with pytest.raises(ValueError, match="TrainConfig.divergence_patience"):
        TrainConfig(divergence_patience=bad)


def _cli_train(prepared_path, out, *extra):
    return ["train", "--data", str(prepared_path), "--family", "gapcnn", "--width", "8",
            "--depth", "3", "--batch-size", "64", "--device", "cpu", "--threads", "1",
            "--no-progress", "--out", str(out), *extra]


def test_cli_lr_50_without_batchnorm_ends_diverged_quickly(tmp_path, digits, capsys):
    """Issue 21's case: ``convflat train --lr 50 --no-batchnorm`` ends diverged in its first
    epochs, with the rule named, no metrics, not converged (exit 0: a diverged run is a
    result, not an error)."""
    out = tmp_path / "run"
    assert main(_cli_train(digits.path, out, "--lr", "50", "--no-batchnorm")) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["status"] == "diverged" and record["stop_reason"] in DIVERGED_REASONS
    assert record["converged"] is False and record["epochs_run"] <= 2
    assert record["train_loss"] is None and record["test_acc"] is None
    assert capsys.readouterr().out.startswith(f"diverged: {record['epochs_run']} epochs (")


def test_batchnorm_lr_50_sitting_far_above_its_initial_loss_is_diverged(tmp_path, digits):
    """With BatchNorm the losses stay finite: at lr 50 the eval loss of the first epoch is
    orders of magnitude above the initial loss (main ran such a run to its cap as "ok").
    The factor rule stops it after one epoch; with the factor off, the patience rule stops
    it after ``divergence_patience`` epochs each above the initial loss."""
    out = tmp_path / "factor"
    assert main(_cli_train(digits.path, out, "--lr", "50", "--stop-loss", "0.01",
                           "--epochs", "15", "--schedule", "constant")) == 0
    record = json.loads((out / "train.json").read_text())
    first = record["history"][0]["train_loss_eval"]
    assert first > 10 * record["initial_loss"]
    assert record["status"] == "diverged" and record["stop_reason"] == "diverged_factor"
    assert record["epochs_run"] == 1 and not record["converged"]
    assert not (out / "checkpoint.pt").exists() and (out / "model.pt").is_file()

    cfg = TrainConfig(lr=50, stop_loss=0.01, epochs=15, batch_size=64, schedule="constant",
                      divergence_factor=0, divergence_patience=2, device="cpu")
    record = train(SMALL, digits, cfg, tmp_path / "patience")
    assert record["status"] == "diverged" and record["stop_reason"] == "diverged_patience"
    assert record["epochs_run"] == 2
    assert all(h["train_loss_eval"] > record["initial_loss"] for h in record["history"])


def test_a_normal_run_is_not_flagged(tmp_path, digits):
    """The defaults leave a sane run alone: lr 0.1 with and without a stop loss, also
    without BatchNorm, ends ok, its losses below the initial loss."""
    for name, spec, cfg in [
        ("epochs", SMALL, FAST),
        ("target", {**SMALL, "batchnorm": False},
         dataclasses.replace(FAST, epochs=30, stop_loss=0.3, schedule="constant")),
    ]:
        record = train(spec, digits, cfg, tmp_path / name)
        assert record["status"] == "ok" and record["stop_reason"] in ("epochs", "target_loss")
        assert record["converged"] and record["train_loss"] < record["initial_loss"]
