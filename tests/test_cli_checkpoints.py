"""Issue 16 item 8: a file that is not a torch checkpoint gets one clear line, whatever is
wrong with it (truncated, text, random bytes, empty, a directory)."""

from __future__ import annotations

import os

import pytest
import torch

from convflat.cli import main
from convflat.models import build_model, load_checkpoint, save_checkpoint

SPEC = {"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1, "num_classes": 10}


@pytest.fixture()
def bad_files(tmp_path):
    torch.manual_seed(0)
    good = save_checkpoint(tmp_path / "good.pt", build_model(SPEC))
    raw = good.read_bytes()
    files = {
        "truncated": raw[: len(raw) // 2],
        "truncated_tail": raw[:-10],
        "text": b"101 epochs, loss 0.01\n",
        "garbage": bytes(range(256)) * 4 + os.urandom(100),
        "empty": b"",
    }
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    (tmp_path / "adir.pt").mkdir()
    return tmp_path, [*files, "adir"]


def test_load_checkpoint_names_the_file_for_every_kind_of_non_checkpoint(bad_files):
    root, names = bad_files
    for name in names:
        path = root / f"{name}.pt"
        with pytest.raises(ValueError) as info:
            load_checkpoint(path)
        msg = str(info.value)
        assert msg.startswith(f"not a convflat or torch checkpoint: {path}"), (name, msg)
        assert "weights_only=False" not in msg and "Errno" not in msg
    load_checkpoint(root / "good.pt")  # the intact file still loads


def test_pickled_model_is_refused_without_unpickling_it(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(ValueError, match="holds Python objects besides tensors"):
        load_checkpoint(tmp_path / "whole.pt")


def test_failed_run_stand_in_says_the_run_failed(tmp_path):
    torch.save({"format": "convflat-failed/1", "status": "failed",
                "error": "RuntimeError: boom", "spec": SPEC}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="failed run: RuntimeError: boom"):
        load_checkpoint(tmp_path / "model.pt")


@pytest.mark.parametrize("command", ["curvature", "measure", "curvature-arch"])
def test_cli_prints_one_line_and_exits_2(bad_files, command, capsys):
    root, _ = bad_files
    ckpt = root / "truncated.pt"
    args = ["--checkpoint", str(ckpt), "--data", "sklearn-digits", "--root", str(root),
            "--no-download", "--out", str(root / "out.json")]
    if command == "curvature-arch":
        args = ["curvature", *args, "--arch", "resnet18"]
    else:
        args = [command, *args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"convflat {args[0]}: error: not a convflat or torch checkpoint: {ckpt}"]
