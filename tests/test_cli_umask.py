"""Issue 16 item 5: every file convflat.io writes follows the umask, as ``open`` would."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from convflat import io


@pytest.fixture()
def umask():
    old = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this umask: the reference
    assert _mode(plain) == 0o666 & ~mask
    written = [
        io.atomic_write_json(tmp_path / "a.json", {"a": 1}),
        io.atomic_write_text(tmp_path / "b.txt", "b"),
        io.atomic_write(tmp_path / "c.bin", lambda fh: fh.write(b"c")),
        io.atomic_torch_save(tmp_path / "d.pt", {"d": 1}),
    ]
    for path in written:
        assert _mode(path) == _mode(plain), path.name
    assert io.current_umask() == mask


def test_prepared_data_is_group_and_world_readable_under_umask_022(tmp_path, umask):
    from convflat.cli import main

    umask(0o022)
    out = tmp_path / "digits.pt"
    assert main(["prepare", "--data", "sklearn-digits", "--root", str(tmp_path),
                 "--out", str(out)]) == 0
    assert _mode(out) == 0o644


def test_first_difference_names_the_first_differing_key():
    from convflat.io import first_difference

    a = {"spec": {"width": 8, "depth": 3}, "config": {"lr": 0.1}}
    assert first_difference(a, {"spec": {"width": 8, "depth": 3}, "config": {"lr": 0.1}}) is None
    assert first_difference(a, {"spec": {"width": 16, "depth": 3}, "config": {"lr": 0.2}}) == \
        ("spec.width", 8, 16)
    assert first_difference(a, {**a, "extra": 1}) == ("extra", None, 1)
    assert first_difference({"x": [1, 2]}, {"x": [1, 3]}) == ("x", [1, 2], [1, 3])
