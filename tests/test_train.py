"""convflat.train: learning, determinism, stopping, divergence, resume, files, CLI, bench."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from convflat import train as cftrain
from convflat.data import load_prepared, prepare
from convflat.models import build_model, load_checkpoint
from convflat.train import DeviceData, TrainConfig, evaluate, lr_factor, train

SMALL = {"family": "gapcnn", "width": 8, "depth": 3}
FAST = TrainConfig(epochs=3, batch_size=64, lr=0.1, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")

def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- learning --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, epochs", [
    ({"family": "gapcnn", "width": 8, "depth": 3}, 6),
    ({"family": "gapcnn", "width": 8, "depth": 3, "batchnorm": False, "activation": "gelu",
      "dropout": 0.1}, 6),
    ({"family": "resnet", "depth": 8, "width": 4}, 6),
    ({"family": "resnet", "depth": 8, "width": 4, "preact": True, "activation": "silu"}, 6),
    # 3 epochs: after 2 it passed 0.8 on the Intel CPU of earlier sessions but reached 0.78 on
    # an AMD EPYC (the kernels round differently, so the seeded runs part); after 3, 0.90 there
    pytest.param({"family": "torchvision", "arch": "resnet18"}, 3, marks=pytest.mark.slow),
], ids=["gapcnn", "gapcnn-nobn-gelu-dropout", "resnet", "preact-resnet-silu", "tv-resnet18"])
def test_every_family_learns_digits(tmp_path, digits, spec, epochs):
    cfg = dataclasses.replace(FAST, epochs=epochs)
    record = train(spec, digits, cfg, tmp_path)
    assert record["status"] == "ok" and record["epochs_run"] == epochs
    assert record["test_acc"] > 0.8, record["test_acc"]  # chance is 0.1


# ---- reproducibility --------------------------------------------------------------------------


def test_same_seed_same_weights_bit_for_bit(tmp_path, digits):
    spec = {**SMALL, "dropout": 0.2}  # dropout, crop and flip all draw random numbers
    cfg = dataclasses.replace(FAST, crop_padding=1, flip=True)
    before = torch.get_rng_state()
    a = train(spec, digits, cfg, tmp_path / "a")
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    b = train(spec, digits, cfg, tmp_path / "b")
    assert _same(_weights(tmp_path / "a/model.pt"), _weights(tmp_path / "b/model.pt"))
    assert _same(_weights(tmp_path / "a/init.pt"), _weights(tmp_path / "b/init.pt"))
    for key in ("train_loss", "test_loss", "train_acc", "test_acc", "history"):
        if key == "history":
            assert [h["loss"] for h in a[key]] == [h["loss"] for h in b[key]]
        else:
            assert a[key] == b[key]
    assert a["run_hash"] == b["run_hash"]
    c = train(spec, digits, dataclasses.replace(cfg, seed=1), tmp_path / "c")
    assert not _same(_weights(tmp_path / "a/model.pt"), _weights(tmp_path / "c/model.pt"))
    assert c["run_hash"] != a["run_hash"]


# ---- files and train.json ---------------------------------------------------------------------


def test_outputs_and_train_json(tmp_path, digits):
    record = train(SMALL, digits, FAST, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init.pt", "model.pt", "train.json"]
    assert json.loads((tmp_path / "train.json").read_text()) == record
    for key in ("spec", "config", "run_hash", "dataset", "stopping", "epochs_run", "stop_reason",
                "converged", "steps", "train_loss", "train_acc", "test_loss", "test_acc",
                "loss_gap", "acc_gap", "test_error", "train_loss_clean", "train_acc_clean",
                "history", "resumes", "files", "error", "seconds", "device", "seed", "status",
                "convflat_version", "torch_version", "torchvision_version", "format"):
        assert key in record, key
    assert record["status"] == "ok" and record["stop_reason"] == "epochs" and record["converged"]
    assert record["config"]["crop_padding"] == 0 and record["config"]["flip"] is False
    assert record["spec"]["in_channels"] == 1 and record["spec"]["image_size"] == [8, 8]
    assert record["steps"] == 3 * (digits.x_train.shape[0] // 64) and len(record["history"]) == 3
    assert record["loss_gap"] == pytest.approx(record["test_loss"] - record["train_loss"])
    assert record["acc_gap"] == pytest.approx(record["train_acc"] - record["test_acc"])
    assert record["test_error"] == pytest.approx(1 - record["test_acc"])
    # the checkpoint, rebuilt from its spec alone, reproduces the recorded metrics
    model, ckpt = load_checkpoint(tmp_path / "model.pt")
    assert ckpt["spec"] == record["spec"]
    loss, acc = evaluate(model, digits.tensors("train"), batch_size=500)
    assert loss == pytest.approx(record["train_loss"], rel=1e-6) and acc == record["train_acc"]
    loss, acc = evaluate(model, digits.tensors("test"))
    assert loss == pytest.approx(record["test_loss"], rel=1e-6) and acc == record["test_acc"]
    # init.pt holds the weights built right after manual_seed(seed)
    torch.manual_seed(FAST.seed)
    fresh = build_model(record["spec"])
    assert _same(_weights(tmp_path / "init.pt"),
                 {k: v for k, v in fresh.state_dict().items()})
    assert not _same(_weights(tmp_path / "init.pt"), _weights(tmp_path / "model.pt"))


def test_stop_on_target_loss_and_cap(tmp_path, digits):
    cfg = dataclasses.replace(FAST, epochs=30, stop_loss=0.3, schedule="constant")
    record = train(SMALL, digits, cfg, tmp_path / "target")
    assert record["stop_reason"] == "target_loss" and record["converged"]
    assert record["epochs_run"] < 30 and record["stopping"] == {
        "criterion": "train_loss", "target": 0.3, "cap": 30}
    evals = [h["train_loss_eval"] for h in record["history"]]
    assert evals[-1] < 0.3 and all(e >= 0.3 for e in evals[:-1])
    assert record["train_loss"] == pytest.approx(evals[-1], rel=1e-9)
    capped = train(SMALL, digits, dataclasses.replace(cfg, epochs=2, stop_loss=1e-6),
                   tmp_path / "cap")
    assert capped["stop_reason"] == "cap" and not capped["converged"]
    assert capped["epochs_run"] == 2 and capped["status"] == "ok"


def test_divergence_is_recorded_not_raised(tmp_path, digits):
    record = train(SMALL, digits, dataclasses.replace(FAST, lr=1e6, schedule="constant"),
                   tmp_path)
    assert record["status"] == "diverged" and record["stop_reason"] == "diverged_non_finite"
    assert not record["converged"] and record["train_loss"] is None
    assert record["test_acc"] is None and record["history"][-1]["loss"] is None
    assert (tmp_path / "model.pt").is_file() and not (tmp_path / "checkpoint.pt").exists()
    on_disk = json.loads((tmp_path / "train.json").read_text())
    assert on_disk["status"] == "diverged"


def test_label_noise_run(tmp_path):
    noisy = load_prepared(prepare("sklearn-digits", root=tmp_path, label_noise=0.3))
    record = train(SMALL, noisy, FAST, tmp_path / "run")
    assert record["dataset"]["label_noise"] == 0.3
    assert record["train_acc_clean"] != record["train_acc"]
    assert record["train_acc_clean"] > record["train_acc"]  # fits the true labels first


def test_spec_must_fit_the_data(tmp_path, digits):
    with pytest.raises(ValueError, match="'num_classes' is 3 but dataset sklearn-digits has 10"):
        train({**SMALL, "num_classes": 3}, digits, FAST, tmp_path)
    with pytest.raises(ValueError, match="'image_size'"):
        train({**SMALL, "image_size": 32}, digits, FAST, tmp_path)


# ---- resume -----------------------------------------------------------------------------------


def test_failure_recorded_then_resume_in_process(tmp_path, digits, monkeypatch):
    """A run that fails after its last epoch leaves checkpoint.pt; starting it again resumes
    (no epoch is trained twice) and ends with the weights of an uninterrupted run."""
    spec = {**SMALL, "dropout": 0.2}
    cfg = dataclasses.replace(FAST, crop_padding=1, flip=True)
    ref = train(spec, digits, cfg, tmp_path / "ref")

    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cftrain, "_final_metrics", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(spec, digits, cfg, tmp_path / "run")
    failed = json.loads((tmp_path / "run/train.json").read_text())
    assert failed["status"] == "failed" and "disk on fire" in failed["error"]
    assert (tmp_path / "run/checkpoint.pt").is_file()
    monkeypatch.undo()

    with pytest.raises(ValueError, match=r"config.lr: 0.1 in the checkpoint, 0.2 now"):
        train(spec, digits, dataclasses.replace(cfg, lr=0.2), tmp_path / "run")
    stale = tmp_path / "run" / ".checkpoint.pt.k1ll3d.tmp"  # as a kill mid-write leaves it
    stale.write_bytes(b"half a checkpoint")
    resumed = train(spec, digits, cfg, tmp_path / "run")
    assert not stale.exists()
    assert resumed["resumes"] == 1 and resumed["epochs_run"] == 3
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in ref["history"]]
    assert _same(_weights(tmp_path / "ref/model.pt"), _weights(tmp_path / "run/model.pt"))
    assert not (tmp_path / "run/checkpoint.pt").exists()


def _cli(out, prepared_path, epochs):
    return [sys.executable, "-m", "convflat", "train", "--dataset", str(prepared_path),
            "--family", "gapcnn", "--width", "8", "--depth", "3", "--dropout", "0.1",
            "--epochs", str(epochs), "--batch-size", "48", "--crop-padding", "1", "--flip",
            "--threads", "1", "--device", "cpu", "--no-progress", "--out", str(out)]


def _checkpoint_epoch(path):
    try:
        return torch.load(path, weights_only=True)["train_state"]["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path, digits):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    epochs = 12
    ref = subprocess.Popen(_cli(tmp_path / "ref", digits.path, epochs), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path / "run"
    victim = subprocess.Popen(_cli(run, digits.path, epochs), env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _checkpoint_epoch(run / "checkpoint.pt") < 2:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = _checkpoint_epoch(run / "checkpoint.pt")
    assert 2 <= killed_at < epochs and not (run / "model.pt").exists()

    done = subprocess.run(_cli(run, digits.path, epochs), env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    assert ref.wait(timeout=600) == 0
    record = json.loads((run / "train.json").read_text())
    assert record["resumes"] == 1 and record["epochs_run"] == epochs
    assert sorted(p.name for p in run.iterdir()) == ["init.pt", "model.pt", "train.json"]
    assert _same(_weights(tmp_path / "ref/model.pt"), _weights(run / "model.pt"))
    ref_record = json.loads((tmp_path / "ref/train.json").read_text())
    assert record["train_loss"] == ref_record["train_loss"]
    assert [h["loss"] for h in record["history"]] == [h["loss"] for h in ref_record["history"]]


# ---- pipeline pieces --------------------------------------------------------------------------


def test_device_data_crop_and_flip_match_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 5, 6), generator=g, dtype=torch.uint8)
    y = torch.arange(10)
    mean, std = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.2, 0.3, 0.4])
    dd = DeviceData(x, y, mean, std, crop_padding=2, flip=True)
    idx = torch.tensor([3, 0, 7])
    off = torch.tensor([[0, 4], [2, 2], [4, 1]])
    flips = torch.tensor([True, False, True])
    xb, yb = dd.batch(idx, off, flips)
    padded = F.pad(x, (2, 2, 2, 2))
    for b in range(3):
        ref = padded[idx[b], :, off[b, 0] : off[b, 0] + 5, off[b, 1] : off[b, 1] + 6]
        ref = ref.flip(2) if flips[b] else ref
        ref = (ref.float() / 255 - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
        assert torch.equal(xb[b], ref)
    assert torch.equal(yb, idx)
    # no augmentation: exactly the evaluation tensors
    plain = DeviceData(x, y, mean, std)
    xb, _ = plain.batch(torch.arange(10))
    ev = torch.cat([b for b, _ in plain.eval_batches(4)])
    assert torch.equal(xb, ev) and torch.equal(xb, (x.float() / 255 - mean.view(1, -1, 1, 1))
                                               / std.view(1, -1, 1, 1))
    # an epoch: full batches only, a permutation, every crop a window of the padded image
    batches = list(dd.epoch(torch.Generator().manual_seed(1), 4))
    assert len(batches) == dd.steps_per_epoch(4) == 2
    labels = torch.cat([b for _, b in batches])
    assert len(set(labels.tolist())) == 8


def test_lr_schedules():
    cos = TrainConfig(epochs=10, warmup_epochs=2)
    assert lr_factor(0, cos, 5) == pytest.approx(0.1) and lr_factor(9, cos, 5) == 1.0
    assert lr_factor(10, cos, 5) == 1.0 and lr_factor(49, cos, 5) < 0.01
    assert lr_factor(30, cos, 5) == pytest.approx(0.5)  # half-way through the decay
    step = TrainConfig(epochs=10, schedule="step", step_milestones=(0.5, 0.8), step_gamma=0.5)
    assert [lr_factor(s, step, 3) for s in (0, 14, 15, 23, 24, 29)] == [1, 1, .5, .5, .25, .25]
    assert lr_factor(123, TrainConfig(schedule="constant"), 7) == 1.0


@pytest.mark.parametrize("kwargs, key", [
    ({"epochs": 0}, "epochs"), ({"optimizer": "lbfgs"}, "optimizer"), ({"lr": -1.0}, "lr"),
    ({"schedule": "linear"}, "schedule"), ({"momentum": 1.0}, "momentum"),
    ({"stop_loss": 0.0}, "stop_loss"), ({"crop_padding": -1}, "crop_padding"),
    ({"warmup_epochs": 50.0}, "warmup_epochs"), ({"step_milestones": (1.5,)}, "step_milestones"),
    ({"nesterov": True, "optimizer": "adam"}, "nesterov"),
])
def test_config_validation(kwargs, key):
    with pytest.raises(ValueError, match=f"TrainConfig.{key}"):
        TrainConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = TrainConfig(optimizer="adam", lr=1e-3, step_milestones=(0.3,), flip=True)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown training option 'label_smoothing'"):
        TrainConfig.from_dict({"label_smoothing": 0.1})


def test_adam_and_step_schedule_train(tmp_path, digits):
    cfg = dataclasses.replace(FAST, optimizer="adam", lr=3e-3, schedule="step", warmup_epochs=1)
    record = train(SMALL, digits, cfg, tmp_path)
    assert record["status"] == "ok" and record["test_acc"] > 0.5
    assert record["history"][0]["lr"] < 3e-3  # warming up


# ---- CLI and benchmark ------------------------------------------------------------------------


def test_cli_prepare_and_train(tmp_path, capsys):
    from convflat.cli import main

    # (every TrainConfig field's flag and default: tests/test_cli_vocabulary.py)
    assert main(["prepare", "--dataset", "sklearn-digits", "--root", str(tmp_path),
                 "--subset", "600", "--label-noise", "0.1"]) == 0
    prepared = tmp_path / "prepared" / "sklearn-digits_n600_noise0.1.pt"
    assert str(prepared) in capsys.readouterr().out
    out = tmp_path / "run"
    assert main(["train", "--dataset", "sklearn-digits", "--root", str(tmp_path), "--subset",
                 "600", "--label-noise", "0.1", "--family", "resnet", "--depth", "8",
                 "--width", "4", "--preact", "--epochs", "2", "--batch-size", "50", "--lr",
                 "0.05", "--schedule", "step", "--step-milestones", "0.5", "--no-flip",
                 "--seed", "3", "--no-progress", "--out", str(out)]) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["spec"]["preact"] and record["spec"]["depth"] == 8
    assert record["config"]["step_milestones"] == [0.5] and record["config"]["seed"] == 3
    assert record["dataset"]["n_train"] == 600 and record["dataset"]["label_noise"] == 0.1
    assert "ok: 2 epochs (epochs)" in capsys.readouterr().out
    # --spec JSON, flags override it; a bad spec is a one-line error with exit status 2
    spec = '{"family": "gapcnn", "width": 2, "depth": 2}'
    assert main(["train", "--dataset", str(prepared), "--spec", spec, "--width", "4",
                 "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run2")]) == 0
    assert json.loads((tmp_path / "run2/train.json").read_text())["spec"]["width"] == 4
    assert main(["train", "--dataset", str(prepared), "--family", "gapcnn", "--depth", "0",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--depth: must be a positive integer, got 0" in capsys.readouterr().err
    assert main(["train", "--dataset", str(prepared), "--family", "gapcnn", "--subset", "5",
                 "--out", str(tmp_path / "bad")]) == 2


def test_bench_train_runs(capsys):
    from convflat.bench.train import main

    assert main(["--datasets", "digits", "--repeats", "1", "--steps", "2", "--warmup", "1",
                 "--workers", "0", "--batch-size", "32"]) == 0
    out = capsys.readouterr().out
    for row in ("resident", "loader/tensor/w0", "loader/pil/w0"):
        assert row in out


# ---- the workflow's failure policy -----------------------------------------------------------


def test_train_or_record_failure_records_an_unbuildable_run(tmp_path, digits):
    """A spec that cannot be built is recorded, not raised: status failed, the error, the
    run id, null metrics, and stand-ins for model.pt / init.pt that say so."""
    from convflat.io import METRICS

    spec = {"family": "resnet", "width": 4, "depth": 9}  # not 6n+2
    cfg = {**FAST.to_dict(), "epochs": 1}
    rec = cftrain.train_or_record_failure(spec, digits, cfg, tmp_path, run_id="depth~9")
    assert rec["status"] == "failed" and rec["run_id"] == "depth~9"
    assert rec["error"].startswith("OptionError: ") and "depth" in rec["error"]
    assert all(rec[k] is None for k in METRICS) and rec["epochs_run"] == 0
    assert json.loads((tmp_path / "train.json").read_text()) == rec
    for name in ("model.pt", "init.pt"):
        stub = torch.load(tmp_path / name, weights_only=True)
        assert stub["format"] == cftrain.FAILED_FORMAT and stub["error"] == rec["error"]


def test_train_or_record_failure_sets_a_foreign_checkpoint_aside(tmp_path, digits, monkeypatch):
    """A checkpoint of another run (here: another lr) is moved to checkpoint.stale.pt and
    the run starts from scratch, ending with the weights of a clean run."""
    cfg = dataclasses.replace(FAST, epochs=2)
    train(SMALL, digits, cfg, tmp_path / "ref")

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(cftrain, "_final_metrics", killed)  # leaves checkpoint.pt behind
    with pytest.raises(RuntimeError):
        train(SMALL, digits, dataclasses.replace(cfg, lr=0.05), tmp_path / "other")
    monkeypatch.undo()
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "other/checkpoint.pt").replace(run / "checkpoint.pt")
    rec = cftrain.train_or_record_failure(SMALL, digits, cfg.to_dict(), run, run_id="r")
    assert rec["status"] == "ok" and rec["resumes"] == 0
    assert (run / cftrain.STALE_CHECKPOINT_FILE).is_file()
    assert _same(_weights(tmp_path / "ref/model.pt"), _weights(run / "model.pt"))


def test_null_metrics_are_io_metrics():
    from convflat.io import METRICS

    assert set(cftrain._null_metrics()) == {*METRICS, "train_loss_clean", "train_acc_clean"}
    assert all(v is None for v in cftrain._null_metrics().values())


def test_every_trainconfig_field_has_help():
    for f in dataclasses.fields(TrainConfig):
        assert isinstance(f.metadata.get("help"), str) and len(f.metadata["help"]) > 10, f.name
    assert dataclasses.fields(TrainConfig)[0].metadata["help"].startswith("epochs")
