"""Issue 16 item 6: a user's mistakes are one line on stderr and exit status 2, output paths
are checked before any work, Ctrl-C exits 130 without a traceback, and `convflat measure`
exits 1 when a measure failed (0 with --allow-failed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from convflat.cli import main
from convflat.models import build_model, save_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from convflat.data import prepare

    root = tmp_path_factory.mktemp("errors")
    data = prepare("sklearn-digits", root=root, download=False)
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", build_model(
        {"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1, "num_classes": 10}))
    (root / "afile").write_text("x")
    return root, data


def _argv(command: str, root: Path, data: Path, out: str) -> list[str]:
    ckpt = str(root / "model.pt")
    return {
        "curvature": ["curvature", "--checkpoint", ckpt, "--data", str(data), "--out", out],
        "measure": ["measure", "--checkpoint", ckpt, "--data", str(data), "--measures",
                    "conv_trace", "--out", out],
        "train": ["train", "--data", str(data), "--family", "gapcnn", "--width", "4",
                  "--depth", "2", "--epochs", "1", "--out", out],
        "prepare": ["prepare", "--data", "sklearn-digits", "--root", str(root), "--out", out],
    }[command]


@pytest.fixture()
def no_work(monkeypatch):
    """Every command's work fails loudly if it starts: the checks must come first."""
    import convflat.cli.curvature
    import convflat.curvature
    import convflat.data
    import convflat.measures
    import convflat.train

    def work(*a, **k):
        raise AssertionError("the work started before the output path was checked")

    monkeypatch.setattr(convflat.curvature, "exact_curvature", work)
    monkeypatch.setattr(convflat.measures, "compute_measures", work)
    monkeypatch.setattr(convflat.train, "train", work)
    monkeypatch.setattr(convflat.data, "prepare", work)


def _readonly_dir(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through permission bits: use a read-only mount
        return Path("/sys")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d


@pytest.mark.parametrize("command", ["curvature", "measure", "train", "prepare"])
@pytest.mark.parametrize("case", ["directory", "under_file", "read_only"])
def test_bad_output_path_is_one_line_before_the_work(setup, command, case, tmp_path,
                                                     no_work, capsys):
    root, data = setup
    out = {
        "directory": str(tmp_path),  # an existing directory where a file is expected
        "under_file": str(root / "afile" / "sub" / "o.json"),
        "read_only": str(_readonly_dir(tmp_path) / "sub" / "o.json"),
    }[case]
    if command == "train" and case == "directory":
        out = str(root / "afile")  # train's --out is a directory: a file is the mistake
    assert main(_argv(command, root, data, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"convflat {command}: error: --out "), err
    assert "Traceback" not in err[0]


@pytest.mark.parametrize("command,flag,value,expect", [
    ("train", "--device", "gpu0", "'gpu0' is not a device"),
    ("curvature", "--device", "gpu0", "'gpu0' is not a device"),
    ("measure", "--device", "gpu0", "'gpu0' is not a device"),
    ("train", "--threads", "-1", "--threads: must be a positive integer, got -1"),
    ("train", "--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("curvature", "--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("measure", "--batch-size", "0", "--batch-size: must be a positive integer, got 0"),
    ("train", "--epochs", "zero", "--epochs: 'zero' is not an integer"),
    ("prepare", "--subset", "0", "--subset: must be a positive integer, got 0"),
])
def test_bad_values_are_one_line_with_status_2(setup, command, flag, value, expect, tmp_path,
                                               no_work, capsys):
    root, data = setup
    argv = [*_argv(command, root, data, str(tmp_path / "o")), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err


def test_ctrl_c_is_status_130_without_traceback(setup, monkeypatch, capsys):
    import convflat.measures

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convflat.measures, "compute_measures", interrupted)
    root, data = setup
    assert main(_argv("measure", root, data, str(root / "ki.json"))) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_sigint_to_a_training_process_exits_130(setup, tmp_path):
    root, data = setup
    cmd = [sys.executable, "-m", "convflat", *_argv("train", root, data, str(tmp_path / "r"))]
    cmd[cmd.index("--epochs") + 1] = "100000"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "r" / "init.pt").exists() and time.time() < deadline:
        time.sleep(0.1)  # wait until it trains: the interrupt lands inside the work
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err


def test_measure_exit_status_says_a_measure_failed(setup, monkeypatch, capsys):
    from convflat.measures import MEASURES

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(MEASURES["frobenius_norm"], "func", boom)
    root, data = setup
    out = root / "failed.json"
    argv = ["measure", "--checkpoint", str(root / "model.pt"), "--data", str(data),
            "--measures", "frobenius_norm,conv_trace", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "measure frobenius_norm failed: RuntimeError: boom" in err and "Traceback" not in err
    rec = json.loads(out.read_text())  # written all the same
    assert rec["measures"]["frobenius_norm"]["status"] == "failed"
    assert rec["measures"]["conv_trace"]["status"] == "ok"
    assert main([*argv, "--allow-failed"]) == 0
