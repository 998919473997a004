"""Issue 21 item 1: a checkpoint knows the data it was trained on. ``convflat curvature`` and
``convflat measure`` measure a run on its own data by default, refuse other data in one line
(exit 2) unless ``--data-mismatch ok``, check shape and classes before any computation, and
write nothing under ``--root``."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from convflat.cli import main
from convflat.curvature import find_head
from convflat.data import load_prepared, prepare
from convflat.models import build_model, checkpoint_data, load_checkpoint, save_checkpoint
from convflat.reference import autograd_kernel_hessian

pytestmark = pytest.mark.usefixtures("one_thread")

SUBSET = 150


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run trained for 3 epochs on a 150-image subset of the digits."""
    from convflat.train import TrainConfig, train

    root = tmp_path_factory.mktemp("identity")
    data = prepare("sklearn-digits", root=root / "data", subset=SUBSET, download=False)
    train({"family": "gapcnn", "width": 4, "depth": 2, "batchnorm": False}, data,
          TrainConfig(epochs=3, batch_size=50, lr=0.05, device="cpu"), root / "run")
    return root / "run", data


def _call(argv, capsys):
    code = main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _dense_trace(checkpoint, prepared) -> float:
    """Tr of the float64 autograd Hessian of the mean cross-entropy in the kernel of the
    conv that feeds the pooling, on every training image of ``prepared``."""
    model, _ = load_checkpoint(checkpoint)
    model = model.double()
    x, y = prepared.tensors("train", dtype=torch.float64)
    H = autograd_kernel_hessian(model, find_head(model).conv_name, x, y)
    return float(H.diagonal().sum())


def test_checkpoint_records_the_training_data(run):
    run_dir, data = run
    prepared = load_prepared(data)
    _, ckpt = load_checkpoint(run_dir / "model.pt")
    ident = checkpoint_data(ckpt, run_dir / "model.pt")
    h = hashlib.sha256(prepared.x_train.numpy().tobytes())
    h.update(prepared.y_train.numpy().astype("<i8").tobytes())
    h.update(repr(tuple(prepared.x_train.shape)).encode())
    assert ident["train_hash"] == h.hexdigest()
    assert ident["image_shape"] == [1, 8, 8] and ident["classes"] == 10
    assert ident["n_train"] == SUBSET and ident["subset"] == SUBSET
    assert ident["source"] == "sklearn:load_digits" and ident["label_noise"] == 0.0
    assert ident["seed"] == 0 and ident["path"] == str(data.resolve())
    _, init = load_checkpoint(run_dir / "init.pt")
    assert checkpoint_data(init) == ident


@pytest.mark.parametrize("command", ["curvature", "measure"])
def test_other_data_is_refused_in_one_line(run, digits, tmp_path, capsys, command):
    """The README's example: a run on 150 images given all 1438 of the digits."""
    run_dir, _ = run
    root = tmp_path / "data"
    out = tmp_path / "out.json"
    for data in ("sklearn-digits", str(digits.path)):
        code, _, err = _call([command, "--checkpoint", str(run_dir / "model.pt"), "--data",
                              data, "--root", str(root), "--device", "cpu", "--out",
                              str(out)], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        assert f"{SUBSET} train images" in lines[0] and "1438 train images" in lines[0]
        assert f"{SUBSET} vs 1438 training images" in lines[0]
        assert "--data-mismatch ok" in lines[0]
    assert not out.exists()
    assert not root.exists()  # preparing the digits wrote nothing under --root


def test_own_data_by_default_gives_the_runs_number(run, capsys):
    """curvature and measure without --data: the trace of the Hessian on the run's own
    training images (dense float64 autograd), and the same number in both."""
    run_dir, data = run
    ref = _dense_trace(run_dir / "model.pt", load_prepared(data))
    code, out, err = _call(["curvature", "--checkpoint", str(run_dir / "model.pt"),
                            "--device", "cpu"], capsys)
    assert code == 0 and "the prepared file it trained on" in err and str(data) in err
    doc = json.loads(out)
    assert doc["data"]["n_measured"] == SUBSET
    trace = doc["measures"]["trace"]  # float32 forward pass, float64 sums
    assert trace == pytest.approx(ref, rel=1e-5)
    code, _, err = _call(["measure", "--checkpoint", str(run_dir / "model.pt"), "--measures",
                          "conv_trace", "--device", "cpu"], capsys)
    assert code == 0, err
    values = json.loads((run_dir / "measures.json").read_text())["values"]
    assert values["conv_trace"] == pytest.approx(trace, rel=1e-12)
    # the same file named explicitly: accepted without a word
    code, out, err = _call(["curvature", "--checkpoint", str(run_dir / "model.pt"), "--data",
                            str(data), "--device", "cpu"], capsys)
    assert code == 0 and err == ""
    assert json.loads(out)["measures"]["trace"] == pytest.approx(trace, rel=1e-12)
    # the whole digits training split gives another number, well outside the tolerance
    # above: a command that measured on it would fail this test
    full = _dense_trace(run_dir / "model.pt", load_prepared(prepare(
        "sklearn-digits", root=run_dir.parent / "data", download=False)))
    assert trace != pytest.approx(full, rel=1e-4)


def test_mismatch_ok_measures_the_given_data(run, digits, capsys):
    run_dir, _ = run
    code, out, err = _call(["curvature", "--checkpoint", str(run_dir / "model.pt"), "--data",
                            str(digits.path), "--data-mismatch", "ok", "--device", "cpu",
                            "--max-samples", "400"], capsys)
    assert code == 0 and len(err.strip().splitlines()) == 1 and "notice" in err
    doc = json.loads(out)
    assert doc["data"]["n_measured"] == 400 and doc["data"]["n_train"] == 1438


def test_gone_prepared_file_is_prepared_again_in_memory(run, tmp_path, capsys):
    run_dir, data = run
    ref = _dense_trace(run_dir / "model.pt", load_prepared(data))
    moved = tmp_path / "moved.pt"
    shutil.move(data, moved)
    root = tmp_path / "data"
    try:
        code, out, err = _call(["curvature", "--checkpoint", str(run_dir / "model.pt"),
                                "--root", str(root), "--device", "cpu"], capsys)
    finally:
        shutil.move(moved, data)
    assert code == 0 and "prepared again from the checkpoint's data identity" in err
    assert json.loads(out)["measures"]["trace"] == pytest.approx(ref, rel=1e-5)
    assert not root.exists()


def test_shape_and_classes_are_checked_before_any_computation(run, tmp_path, capsys,
                                                              monkeypatch):
    import convflat.curvature as curvature

    def never(*a, **k):
        raise AssertionError("measured before the data were checked")

    monkeypatch.setattr(curvature, "exact_curvature", never)
    run_dir, _ = run
    rng = np.random.default_rng(0)
    for shape, k, phrase in [((1, 16, 16), 10, "image shape 1x8x8 vs 1x16x16"),
                             ((1, 8, 8), 4, "10 vs 4 classes")]:
        path = tmp_path / f"d{shape[1]}_{k}.npz"
        np.savez(path, x=rng.integers(0, 256, (60, *shape), dtype=np.uint8),
                 y=np.arange(60) % k)
        code, _, err = _call(["curvature", "--checkpoint", str(run_dir / "model.pt"), "--data",
                              f"npz:{path}", "--root", str(tmp_path / "data"), "--device",
                              "cpu"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and phrase in err


def test_checkpoint_without_identity_still_works_with_a_notice(digits, tmp_path, capsys):
    torch.manual_seed(0)
    path = tmp_path / "old.pt"
    save_checkpoint(path, build_model({"family": "gapcnn", "width": 4, "depth": 2,
                                       "in_channels": 1, "num_classes": 10}))
    code, out, err = _call(["curvature", "--checkpoint", str(path), "--data",
                            str(digits.path), "--max-samples", "50", "--device", "cpu"], capsys)
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and "records no data identity" in lines[0]
    assert json.loads(out)["data"]["n_measured"] == 50
    code, _, err = _call(["curvature", "--checkpoint", str(path), "--device", "cpu"], capsys)
    assert code == 2 and "--data is required" in err


def test_prepared_out_writes_the_prepared_data_where_asked(run, tmp_path, capsys):
    run_dir, _ = run
    out = tmp_path / "asked" / "digits.pt"
    code, _, err = _call(["curvature", "--checkpoint", str(run_dir / "model.pt"), "--data",
                          "sklearn-digits", "--root", str(tmp_path / "data"), "--prepared-out",
                          str(out), "--data-mismatch", "ok", "--max-samples", "20", "--device",
                          "cpu"], capsys)
    assert code == 0, err
    assert load_prepared(out).x_train.shape[0] == 1438 and not (tmp_path / "data").exists()
