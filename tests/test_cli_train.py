"""Issue 16 items 3 and 4: `convflat train` refuses, before the first epoch, a model that
`convflat curvature` would refuse (naming the op), and a run directory is never silently
retrained or mixed: the same finished run is skipped, other settings refused unless
--overwrite, which clears the run's files."""

from __future__ import annotations

import json

import pytest

from convflat.cli import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from convflat.data import prepare

    return prepare("sklearn-digits", root=tmp_path_factory.mktemp("train"), download=False)


def _train(data, out, *extra):
    return ["train", "--data", str(data), "--family", "gapcnn", "--width", "4", "--depth", "2",
            "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--out", str(out),
            "--no-progress", *extra]


@pytest.mark.parametrize("arch,op", [("vgg11", "MaxPool2d module 'features.20'"),
                                     ("squeezenet1_1", "function 'flatten'")])
def test_out_of_class_torchvision_arch_is_refused_before_training(data, tmp_path, arch, op,
                                                                  capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--family", "torchvision", "--arch", arch,
            "--epochs", "1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and op in err[0] and "--no-check-head" in err[0], err
    assert not (out / "init.pt").exists()  # refused before anything was built or written


def test_no_check_head_trains_what_the_check_refuses(data, tmp_path, monkeypatch, capsys):
    import convflat.models
    from convflat.curvature import OutOfClassError

    def refuse(spec):
        raise OutOfClassError("conv layer 'x' is not in the class measured exactly: test op")

    monkeypatch.setattr(convflat.models, "check_head", refuse)
    out = tmp_path / "run"
    assert main(_train(data, out)) == 2
    assert "test op" in capsys.readouterr().err
    assert main(_train(data, out, "--no-check-head")) == 0
    assert json.loads((out / "train.json").read_text())["status"] == "ok"


def test_finished_run_is_skipped_other_settings_refused_overwrite_clears(data, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    assert main(_train(data, out)) == 0
    capsys.readouterr()
    first = {n: (out / n).read_bytes() for n in ("model.pt", "init.pt", "train.json")}
    mtimes = {n: (out / n).stat().st_mtime_ns for n in first}

    # the same settings: skipped, nothing rewritten (device is not a setting of the result)
    assert main(_train(data, out)) == 0
    assert "skipped" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in first} == mtimes

    # other settings: refused, the directory untouched
    assert main(_train(data, out, "--lr", "0.01")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another run" in err[0] and "config.lr" in err[0], err
    assert {n: (out / n).read_bytes() for n in first} == first
    assert main(_train(data, out, "--width", "8")) == 2
    assert "spec.width" in capsys.readouterr().err

    # --overwrite: the old files go first, then the new run writes its own
    (out / "measures.json").write_text("{}")  # a stale measure of the old model
    assert main(_train(data, out, "--lr", "0.01", "--overwrite")) == 0
    assert "removed" in capsys.readouterr().out
    rec = json.loads((out / "train.json").read_text())
    assert rec["config"]["lr"] == 0.01 and rec["status"] == "ok"
    assert not (out / "measures.json").exists()
    assert (out / "init.pt").read_bytes() == first["init.pt"]  # same seed, same init
    assert (out / "model.pt").read_bytes() != first["model.pt"]


def test_unfinished_run_with_other_settings_is_refused(data, tmp_path, capsys):
    """A checkpoint.pt of another run (killed mid-way) is refused before init.pt is
    overwritten, naming the first difference."""
    import torch

    from convflat.train import CHECKPOINT_FILE

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"train_state": {"identity": {"spec": {"width": 99}, "config": {},
                                             "data": {}}}}, out / CHECKPOINT_FILE)
    assert main(_train(data, out)) == 2
    assert "holds another run" in capsys.readouterr().err
    assert not (out / "init.pt").exists()


def test_the_documented_torchvision_families_are_what_check_head_says():
    """docs/training.md and README.md: resnet, mobilenet_v2, efficientnet, densenet in the
    class; vgg, squeezenet, mobilenet_v3 out of it."""
    from convflat.curvature import OutOfClassError
    from convflat.models import check_head

    def spec(arch):
        return {"family": "torchvision", "arch": arch, "in_channels": 3, "num_classes": 10}

    for arch in ("resnet18", "resnext50_32x4d", "mobilenet_v2", "efficientnet_b0",
                 "shufflenet_v2_x0_5", "mnasnet0_5", "densenet121"):
        assert check_head(spec(arch)).linear_name, arch
    for arch in ("vgg11", "alexnet", "squeezenet1_0", "mobilenet_v3_small"):
        with pytest.raises(OutOfClassError):
            check_head(spec(arch))
