"""convflat.train: flatness over training (TrainConfig.track_flatness) and the learning rate
at the stop (train.json's lr_at_stop)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest
import torch

from convflat import train as cftrain
from convflat.analysis.runs import build_runs_table
from convflat.curvature import exact_curvature
from convflat.models import build_model, load_checkpoint
from convflat.train import TrainConfig, train
from convflat.train_config import TRACK_CHEAP

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"family": "gapcnn", "width": 8, "depth": 3}
FAST = TrainConfig(epochs=3, batch_size=64, lr=0.1, device="cpu", track_flatness=0)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _subset(prepared, n):
    """The tracked subset, rebuilt here: the first n of randperm(N) under seed 0, normalized
    in float32 as (x / 255 - mean) / std."""
    idx = torch.randperm(prepared.x_train.shape[0],
                         generator=torch.Generator().manual_seed(0))[:n]
    x = prepared.x_train[idx].float() / 255
    x = (x - prepared.mean.view(1, -1, 1, 1)) / prepared.std.view(1, -1, 1, 1)
    return x, prepared.y_train[idx]


def test_default_is_on_with_1024_images():
    assert TrainConfig().track_flatness == 1024
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="track_flatness"):
            TrainConfig(track_flatness=bad)


@pytest.mark.parametrize("spec", [SMALL, {**SMALL, "batchnorm": False, "activation": "gelu"}],
                         ids=["relu-bn", "gelu-nobn"])
def test_each_epochs_flatness_is_exact_curvature_of_that_epochs_weights(
        tmp_path, digits, monkeypatch, spec):
    """The weights after each epoch are taken from the checkpoint written at that epoch's end;
    exact_curvature on them, over the subset rebuilt independently, gives the recorded values
    to 1e-6 relative (float64 products on both sides). The stopping rule's evaluation runs
    too (stop_loss below reach), and the last epoch's values are those of model.pt."""
    saved = []
    real_save = cftrain._save_state

    def keep(run):
        saved.append(copy.deepcopy({k: v.detach().clone() for k, v in
                                    run.model.state_dict().items()}))
        return real_save(run)

    monkeypatch.setattr(cftrain, "_save_state", keep)
    n = 300
    cfg = dataclasses.replace(FAST, track_flatness=n, stop_loss=1e-9, eval_batch_size=128)
    record = train(spec, digits, cfg, tmp_path)
    assert record["status"] == "ok" and record["epochs_run"] == 3 == len(saved)
    assert record["flatness_tracking"] == {"n_samples": n, "subset_seed": 0,
                                           "keys": ["conv_trace", "conv_relative_flatness",
                                                    *TRACK_CHEAP],
                                           "error": None, "measure_errors": {}}
    x, y = _subset(digits, n)
    model = build_model(record["spec"])
    for entry, state in zip(record["history"], saved, strict=True):
        assert entry["train_loss_eval"] is not None
        model.load_state_dict(state)
        ref = exact_curvature(model, (x, y), device="cpu", batch_size=100)
        assert entry["conv_trace"] == pytest.approx(ref.trace, rel=1e-6)
        assert entry["conv_relative_flatness"] == pytest.approx(ref.relative_flatness, rel=1e-6)
    # the values move as the net trains: the test would notice a frozen model
    traces = [e["conv_trace"] for e in record["history"]]
    assert len(set(traces)) == 3
    final, _ = load_checkpoint(tmp_path / "model.pt")
    ref = exact_curvature(final, (x, y), device="cpu")
    assert record["history"][-1]["conv_trace"] == pytest.approx(ref.trace, rel=1e-6)


def test_tracking_does_not_change_training(tmp_path, digits):
    """Dropout, crops and flips draw random numbers and BatchNorm keeps running statistics:
    with tracking on and off the weights (and buffers) are bit-identical, the histories agree
    key by key, and the caller's RNG is left alone."""
    spec = {**SMALL, "dropout": 0.2}
    cfg = dataclasses.replace(FAST, crop_padding=1, flip=True, stop_loss=0.05)
    before = torch.get_rng_state()
    off = train(spec, digits, cfg, tmp_path / "off")
    assert off["flatness_tracking"] is None
    on = train(spec, digits, dataclasses.replace(cfg, track_flatness=512), tmp_path / "on")
    assert torch.equal(torch.get_rng_state(), before)
    for name in ("model.pt", "init.pt"):
        a, b = _weights(tmp_path / "off" / name), _weights(tmp_path / "on" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for key in ("train_loss", "test_loss", "stop_reason", "epochs_run", "lr_at_stop"):
        assert on[key] == off[key], key
    assert off["flatness_tracking"] is None
    for e_off, e_on in zip(off["history"], on["history"], strict=True):
        assert "conv_trace" not in e_off
        assert e_on["conv_trace"] > 0 and e_on["conv_relative_flatness"] > 0
        for key in ("lr", "lr_end", "loss", "acc", "train_loss_eval", "train_acc_eval"):
            assert e_on[key] == e_off[key], key


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_at_stop_is_the_last_steps_lr(tmp_path, digits, schedule):
    """lr_at_stop is the last history entry's lr_end; both equal lr * lr_factor(last step),
    written out here: 1 for constant, (1 + cos(pi t)) / 2 with t = (S - 1) / T for cosine
    over T = epochs x steps per epoch, S steps taken. A stop before the cap (cosine) leaves
    the net at a learning rate well above 0; the runs table carries the value."""
    cfg = dataclasses.replace(FAST, epochs=8, schedule=schedule, stop_loss=0.5)
    record = train(SMALL, digits, cfg, tmp_path / "run")
    assert record["stop_reason"] == "target_loss" and record["epochs_run"] < 8
    steps = record["steps"]
    assert steps == record["epochs_run"] * (digits.x_train.shape[0] // 64)
    if schedule == "constant":
        expected = 0.1
        assert record["history"][-1]["lr"] == 0.1
    else:
        t = (steps - 1) / (8 * (steps // record["epochs_run"]))
        expected = 0.1 * 0.5 * (1 + math.cos(math.pi * t))
        assert record["history"][-1]["lr"] > expected  # the epoch's first step, earlier
    assert record["lr_at_stop"] == record["history"][-1]["lr_end"]
    assert record["lr_at_stop"] == pytest.approx(expected, rel=1e-12)
    table = build_runs_table("s", ["r"], {"r": {}}, [record],
                             [{"status": "ok", "measures": {}, "values": {}}])
    assert table["lr_at_stop"].tolist() == [record["lr_at_stop"]]


def test_model_outside_the_class_trains_and_records_no_flatness(tmp_path, digits, caplog):
    """torchvision's mobilenet_v3_small (an MLP classifier with Hardswish after the pooled
    features) is outside the measured class: training runs as without tracking, the log says
    why once, and every epoch's flatness is None."""
    spec = {"family": "torchvision", "arch": "mobilenet_v3_small"}
    cfg = dataclasses.replace(FAST, epochs=2, lr=0.01)
    off = train(spec, digits, cfg, tmp_path / "off")
    assert off["flatness_tracking"] is None
    with caplog.at_level(logging.WARNING, logger="convflat.train"):
        on = train(spec, digits, dataclasses.replace(cfg, track_flatness=256), tmp_path / "on")
    assert on["status"] == "ok" and on["epochs_run"] == 2
    warnings = [r for r in caplog.records if "flatness over training is off" in r.message]
    assert len(warnings) == 1 and "Hardswish" in warnings[0].message
    assert "not in the measured class" in on["flatness_tracking"]["error"]
    assert [(e["conv_trace"], e["conv_relative_flatness"]) for e in on["history"]] == \
        [(None, None)] * 2
    a, b = _weights(tmp_path / "off" / "model.pt"), _weights(tmp_path / "on" / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_flatness_row(capsys):
    """``bench train --flatness`` prints one row per model; evaluation + flatness takes
    longer than evaluation alone (on the digits the flatness subset is 1,024 of 1,438
    images and costs several evaluation passes); the projection is for CIFAR rows only."""
    from convflat.bench import train as bench

    assert bench.main(["--flatness", "--models", "gapcnn-w8-d2-bn", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| digits |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == "gapcnn-w8-d2-bn" and int(cells[2]) == 1438
    assert float(cells[4]) > float(cells[3]) > 0 and float(cells[5]) > 1
    assert cells[6] == "-"
    with pytest.raises(SystemExit, match="unknown --models"):
        bench.main(["--flatness", "--models", "vgg"])
