"""`convflat measure`: a checkpoint and a prepared dataset in, measures.json out."""

from __future__ import annotations

import json

import pytest
import torch

from convflat.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from convflat.data import prepare
    from convflat.models import build_model, save_checkpoint

    root = tmp_path_factory.mktemp("run")
    data = prepare("sklearn-digits", root=root / "data", subset=120, download=False)
    spec = {"family": "gapcnn", "in_channels": 1, "num_classes": 10, "image_size": [8, 8],
            "width": 4, "depth": 2, "batchnorm": False}
    torch.manual_seed(0)
    init = build_model(spec)
    save_checkpoint(root / "init.pt", init)
    model = build_model(spec)
    save_checkpoint(root / "model.pt", model)
    return root, data


def test_measure_writes_measures_json(run_dir, capsys):
    root, data = run_dir
    names = "conv_trace,conv_relative_flatness,path_norm,distance_from_init,fisher_rao_norm"
    rc = main(["measure", "--checkpoint", str(root / "model.pt"), "--init",
               str(root / "init.pt"), "--data", str(data), "--measures", names, "--device",
               "cpu", "--params", '{"fisher_rao_norm": {"labels": "empirical"}}'])
    assert rc == 0
    doc = json.loads((root / "measures.json").read_text())
    assert list(doc["values"]) == names.split(",")
    assert all(doc["measures"][n]["status"] == "ok" for n in doc["values"])
    assert doc["status"] == "ok" and doc["n_samples"] == 120 and doc["seed"] == 0
    assert doc["measures"]["fisher_rao_norm"]["params"]["labels"] == "empirical"
    assert doc["spec"]["family"] == "gapcnn" and doc["checkpoint"].endswith("model.pt")
    assert "wrote" in capsys.readouterr().out


def test_measure_without_init_skips_what_needs_it(run_dir, tmp_path):
    root, data = run_dir
    out = tmp_path / "m.json"
    rc = main(["measure", "--checkpoint", str(root / "model.pt"), "--data", str(data),
               "--measures", "distance_from_init,frobenius_norm", "--out", str(out),
               "--device", "cpu"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["skipped"] == ["distance_from_init"] and doc["values"]["frobenius_norm"] > 0


def test_measure_reports_bad_input_in_one_line(run_dir, capsys):
    root, data = run_dir
    rc = main(["measure", "--checkpoint", str(root / "model.pt"), "--data", str(data),
               "--measures", "conv_trace,bogus"])
    assert rc == 2 and "bogus" in capsys.readouterr().err
    rc = main(["measure", "--checkpoint", str(root / "missing.pt"), "--data", str(data)])
    assert rc == 2 and "missing.pt" in capsys.readouterr().err
    rc = main(["measure", "--checkpoint", str(root / "model.pt"), "--data", str(data),
               "--params", "{not json"])
    assert rc == 2 and "--params" in capsys.readouterr().err
    assert main(["measure", "--list"]) == 0
    assert "hutchinson_trace" in capsys.readouterr().out
