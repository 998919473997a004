"""Issue 21 item 5: a full disk (or quota) is one line naming the path and "no space left on
device", exit status 1, no traceback; the commands check free space against a lower bound of
their output's size before the work. Classification is tested with injected errors; one real
full filesystem (a 64 KiB tmpfs) where this process may mount one."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

import convflat
from convflat import io
from convflat.cli import main
from convflat.models import build_model, save_checkpoint

SRC = str(Path(convflat.__file__).resolve().parents[1])  # the convflat this session imports


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from convflat.data import data_identity, load_prepared, prepare

    root = tmp_path_factory.mktemp("disk")
    data = prepare("sklearn-digits", root=root, download=False)
    torch.manual_seed(0)
    save_checkpoint(root / "model.pt", build_model(
        {"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1, "num_classes": 10}),
        data=data_identity(load_prepared(data)))
    return root, data


def _one_line_error(capsys, path) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert "no space left on device" in lines[0] and str(path) in lines[0], err
    return lines[0]


# ------------------------------------------------------------------ classification


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_atomic_write_names_the_path_however_the_writer_reports_a_full_disk(tmp_path, code):
    """torch.save reports a full disk as a RuntimeError about stream positions with the
    OSError only in its context: the error becomes DiskFullError naming the target, the
    temporary file is removed and an existing target is untouched."""
    target = tmp_path / "out.pt"
    target.write_bytes(b"old")

    def write(fh):
        fh.write(b"partial")
        try:
            raise OSError(code, os.strerror(code))
        except OSError:
            raise RuntimeError("unexpected pos 105408 vs 105344") from None

    with pytest.raises(io.DiskFullError) as info:
        io.atomic_write(target, write)
    assert str(info.value) == f"no space left on device writing {target}"
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


def test_other_write_errors_are_not_called_a_full_disk(tmp_path):
    def write(fh):
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:
        io.atomic_write(tmp_path / "x.json", write)
    assert not isinstance(info.value, io.DiskFullError)
    assert io.disk_full_cause(info.value) is None


def test_cli_turns_a_full_disk_during_the_write_into_one_line_and_status_1(
        setup, tmp_path, monkeypatch, capsys):
    root, _ = setup
    out = tmp_path / "d.pt"

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", fsync)
    rc = main(["prepare", "--data", "sklearn-digits", "--root", str(root), "--out", str(out)])
    assert rc == 1
    _one_line_error(capsys, out)
    assert not out.exists()


# ------------------------------------------------------------------ free space, before the work

Usage = namedtuple("Usage", "total used free")


@pytest.fixture()
def tiny_disk(monkeypatch):
    """Every filesystem reports 100 bytes free; the work fails loudly if it starts."""
    import convflat.curvature
    import convflat.data
    import convflat.measures

    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 100, 100))

    def work(*a, **k):
        raise AssertionError("the work started before the free space was checked")

    monkeypatch.setattr(convflat.curvature, "exact_curvature", work)
    monkeypatch.setattr(convflat.measures, "compute_measures", work)
    monkeypatch.setattr(convflat.data, "prepare", work)


def test_prepare_checks_free_space_before_loading(setup, tmp_path, tiny_disk, capsys):
    root, _ = setup
    out = tmp_path / "new" / "d.pt"
    rc = main(["prepare", "--data", "sklearn-digits", "--subset", "500", "--root", str(root),
               "--out", str(out)])
    assert rc == 1
    line = _one_line_error(capsys, out)
    assert "500 images of sklearn-digits" in line and "at least 31.2 KiB" in line  # 500 x 64 B
    assert "100 bytes free" in line


@pytest.mark.parametrize("command", ["curvature", "measure"])
def test_curvature_and_measure_check_free_space_before_the_work(setup, tmp_path, tiny_disk,
                                                                 capsys, command):
    root, data = setup
    out = tmp_path / "r.json"
    argv = [command, "--checkpoint", str(root / "model.pt"), "--data", str(data),
            "--out", str(out)] + (["--measures", "conv_trace"] if command == "measure" else [])
    assert main(argv) == 1
    _one_line_error(capsys, out)


def test_enough_free_space_passes_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 0, 10**6))
    io.check_free_space(tmp_path / "a" / "b.pt", 10**6)  # exactly enough: no error
    with pytest.raises(io.DiskFullError):
        io.check_free_space(tmp_path / "a" / "b.pt", 10**6 + 1)


# ------------------------------------------------------------------ a real full filesystem


@pytest.fixture()
def full_fs(tmp_path):
    """A 64 KiB tmpfs, mounted here if this process may (root on Linux), else skipped."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root on Linux")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_prepare_on_a_full_filesystem_is_one_line_and_status_1(setup, full_fs):
    """The real thing: 1000 of the 1437 training digits pass the free-space check (64 000
    bytes of images, 65 536 free) but the prepared file with its test split does not fit."""
    root, _ = setup
    out = full_fs / "digits.pt"
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", "import sys; from convflat.cli import main; "
                        "sys.exit(main(sys.argv[1:]))", "prepare", "--data", "sklearn-digits",
                        "--subset", "1000", "--root", str(root), "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines == [f"convflat prepare: error: no space left on device writing {out}"], r.stderr
    assert os.listdir(full_fs) == []  # no temporary file left behind
