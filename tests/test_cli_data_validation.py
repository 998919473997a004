"""Issue 16 item 7: degenerate data is refused when it is prepared (naming the split and the
file), not epochs later ("evaluate got no samples")."""

from __future__ import annotations

import numpy as np
import pytest

from convflat.cli import main
from convflat.data import prepare


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,expect", [
    ("one_class", "split 'train' holds 1 class"),
    ("gap", "labels have gaps: class 2 of 0..3 has no image in split 'train'"),
    ("gap_declared", "labels have gaps: class 1 of 0..2"),
    # a random split whose test share rounds to 0 images in every class (empty x_test in a
    # given split was already refused by the npz reader, naming the key)
    ("tiny_test_fraction", "split 'test' has no images (raise the test fraction)"),
])
def test_degenerate_npz_is_refused_at_prepare(tmp_path, case, expect, capsys):
    y4 = np.array([0, 1, 3, 0, 1, 3, 0, 1])
    arrays = {
        "one_class": {"x": _images(20), "y": np.zeros(20, dtype=np.int64)},
        "gap": {"x_train": _images(8), "y_train": y4, "x_test": _images(3),
                "y_test": np.array([0, 1, 3])},
        "gap_declared": {"x_train": _images(6), "y_train": np.array([0, 2] * 3),
                         "x_test": _images(2), "y_test": np.array([0, 2]),
                         "classes": np.array(["a", "b", "c"])},
        "tiny_test_fraction": {"x": _images(20), "y": np.arange(20) % 2},
    }[case]
    path = _npz(tmp_path / f"{case}.npz", **arrays)
    fraction = ["--test-fraction", "0.01"] if case == "tiny_test_fraction" else []
    with pytest.raises(ValueError) as info:
        prepare(f"npz:{path}", root=tmp_path, test_fraction=0.01 if fraction else 0.2)
    assert str(path) in str(info.value) and expect in str(info.value), str(info.value)
    # the command line: one line, status 2, nothing written
    out = tmp_path / "out.pt"
    assert main(["prepare", "--data", f"npz:{path}", "--root", str(tmp_path), "--out",
                 str(out), *fraction]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0] and str(path) in err[0], err
    assert not out.exists()


def test_a_sound_npz_still_prepares(tmp_path):
    path = _npz(tmp_path / "ok.npz", x=_images(40), y=np.arange(40) % 4)
    assert prepare(f"npz:{path}", root=tmp_path).is_file()


def test_folder_with_an_empty_class_is_a_gap(tmp_path):
    from PIL import Image

    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b", "c"):
            (root / split / cls).mkdir(parents=True)
            if cls == "b" and split == "train":
                continue  # an empty class folder in train/
            for i in range(2):
                Image.fromarray(_images(1, i)[0, 0]).save(root / split / cls / f"{i}.png")
    with pytest.raises(ValueError, match="labels have gaps: class 1 of 0..2") as info:
        prepare(f"folder:{root}", root=tmp_path)
    assert str(root) in str(info.value)


def test_subset_with_one_class_is_refused(tmp_path):
    path = _npz(tmp_path / "skew.npz", x=_images(200),
                y=np.array([0] * 190 + [1] * 10))
    # seed 0's subset of 1 image necessarily holds one class
    with pytest.raises(ValueError, match="subset of 1 training images holds one class"):
        prepare(f"npz:{path}", root=tmp_path, subset=1)
