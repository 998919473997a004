"""Issue 16 item 11 and issue 14: one CLI vocabulary, fast --help, flags made from
TrainConfig, the seeded subset of --max-samples, and a progress bar with a total."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from convflat.cli import build_parser, main
from convflat.models import build_model, save_checkpoint

COMMANDS = ("curvature", "measure", "prepare", "train")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings}


@pytest.mark.parametrize("argv", [[], *[[c] for c in COMMANDS]])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom convflat.cli import main\n"
            f"rc = main({[*argv, '--help']!r})\n"
            "assert rc == 0, rc\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "print('NO_TORCH')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.rstrip().endswith("NO_TORCH") and "usage: convflat" in res.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_data_and_dataset_are_one_option_on_every_subcommand(command):
    opts = _options(_subparser(command))
    assert opts["--data"] is opts["--dataset"] and opts["--data"].dest == "data"


def test_measure_accepts_the_data_arguments_of_curvature():
    curv, meas = _options(_subparser("curvature")), _options(_subparser("measure"))
    data_flags = {"--data", "--dataset", "--root", "--no-download", "--split",
                  "--max-samples", "--subset-seed"}
    assert data_flags <= set(curv) and data_flags <= set(meas)
    for flag in data_flags:
        assert curv[flag].choices == meas[flag].choices, flag
        assert curv[flag].type == meas[flag].type, flag


def test_train_flags_are_the_trainconfig_fields_with_their_defaults():
    from convflat.train import TrainConfig

    parser = _subparser("train")
    by_dest = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(TrainConfig):
        action = by_dest.get(f"cfg_{field.name}")
        assert action is not None, f"no flag for TrainConfig.{field.name}"
        assert action.option_strings == ["--" + field.name.replace("_", "-")] or \
            action.option_strings[0] == "--" + field.name.replace("_", "-")
        assert action.default == field.default, field.name
        assert field.metadata["help"].replace("%", "%%") in action.help, field.name
        if field.metadata.get("choices"):
            assert list(action.choices) == list(field.metadata["choices"]), field.name
    # convflat.train's TrainConfig is the torch-free module's, so --help and training agree
    from convflat import train_config

    assert TrainConfig is train_config.TrainConfig
    # and the parsed defaults build the default TrainConfig
    from convflat.cli.train import build_config

    args = parser.parse_args(["--data", "sklearn-digits", "--family", "gapcnn", "--out", "x"])
    assert build_config(args) == TrainConfig()


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from convflat.data import prepare

    root = tmp_path_factory.mktemp("vocab")
    data = prepare("sklearn-digits", root=root, download=False)
    torch.manual_seed(0)
    model = build_model({"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1,
                         "num_classes": 10})
    save_checkpoint(root / "model.pt", model)
    return root, data


def test_measure_takes_a_dataset_name_and_the_seeded_subset(digits_ckpt, capsys):
    from convflat.data import load_prepared

    root, data = digits_ckpt
    out = root / "m.json"
    assert main(["measure", "--checkpoint", str(root / "model.pt"), "--dataset",
                 "sklearn-digits", "--root", str(root), "--no-download", "--max-samples", "30",
                 "--subset-seed", "5", "--measures", "conv_trace", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["n_samples"] == 30
    # the value is the conv trace of exactly that subset: compare with convflat curvature on
    # the same subset, computed by the exact closed form from the other entry point
    cout = root / "c.json"
    assert main(["curvature", "--checkpoint", str(root / "model.pt"), "--data", str(data),
                 "--max-samples", "30", "--subset-seed", "5", "--out", str(cout)]) == 0
    curv = json.loads(cout.read_text())["measures"]
    value = rec["measures"]["conv_trace"]["value"]
    assert value == pytest.approx(curv["trace"], rel=1e-6)
    x, _ = load_prepared(data).tensors("train")
    assert curv["n_samples"] == 30 < x.shape[0]


def test_curvature_progress_bar_shows_the_total(digits_ckpt, capsys):
    root, data = digits_ckpt
    assert main(["curvature", "--checkpoint", str(root / "model.pt"), "--data", str(data),
                 "--max-samples", "50", "--batch-size", "16", "--progress",
                 "--out", str(root / "p.json")]) == 0
    err = capsys.readouterr().err
    # ceil(50 / 16) = 4 batches, and the bar knows it from the start (without a total,
    # tqdm draws "0batch [...]", no fraction)
    assert "| 0/4 [" in err
