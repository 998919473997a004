"""convflat.data: prepare every kind of source into the canonical file, and its errors."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import torch

from convflat import data
from convflat.data import DATA_FORMAT, load_prepared, prepare

# ---- sklearn digits --------------------------------------------------------------------------


def test_digits_canonical_file(digits):
    assert digits.name == "sklearn-digits"
    assert digits.path.name == "sklearn-digits.pt" and digits.path.parent.name == "prepared"
    assert digits.x_train.dtype == torch.uint8 and digits.y_train.dtype == torch.int64
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.x_test.shape[1:] == (1, 8, 8)
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797
    assert digits.classes == [str(i) for i in range(10)]
    assert (digits.num_classes, digits.in_channels, digits.image_size) == (10, 1, (8, 8))
    assert int(digits.x_train.max()) == 255  # 0..16 rescaled to 0..255
    # stratified: every class has ~20 % of its images in the test set
    for c in range(10):
        n_te = int((digits.y_test == c).sum())
        n_all = n_te + int((digits.y_train == c).sum())
        assert n_te == round(0.2 * n_all)
    # statistics of the training images in [0, 1] units
    x = digits.x_train.double() / 255
    assert torch.allclose(digits.mean.double(), x.mean(dim=(0, 2, 3)), atol=1e-6)
    assert torch.allclose(digits.std.double(), x.std(dim=(0, 2, 3), unbiased=False), atol=1e-6)
    assert digits.meta["split"] == "random" and digits.meta["augment"] == {
        "crop_padding": 0, "flip": False}


def test_tensors_are_normalized(digits):
    x, y = digits.tensors("train", dtype=torch.float64)
    assert x.dtype == torch.float64 and x.shape == digits.x_train.shape
    assert torch.equal(y, digits.y_train)
    assert abs(float(x.mean())) < 1e-6 and abs(float(x.std(unbiased=False)) - 1) < 1e-5
    xt, yt = digits.tensors("test")
    assert xt.dtype == torch.float32 and yt.shape == digits.y_test.shape
    with pytest.raises(ValueError, match="split"):
        digits.tensors("validation")


def test_prepare_is_deterministic_and_reused(tmp_path, digits):
    a = prepare("sklearn-digits", root=tmp_path)
    stamp = a.stat().st_mtime_ns
    assert prepare("digits", root=tmp_path) == a  # alias, same request: reused, not rewritten
    assert a.stat().st_mtime_ns == stamp
    b = load_prepared(a)
    assert torch.equal(b.x_train, digits.x_train) and torch.equal(b.y_test, digits.y_test)
    other = load_prepared(prepare("sklearn-digits", root=tmp_path, seed=1))
    assert other.path.name == "sklearn-digits_seed1.pt"
    assert not torch.equal(other.y_train, b.y_train)  # another split


def test_subset(tmp_path, digits):
    p = load_prepared(prepare("sklearn-digits", root=tmp_path, subset=200, seed=3))
    assert p.path.name == "sklearn-digits_n200_seed3.pt"
    assert p.x_train.shape[0] == 200 and p.meta["subset"] == 200
    full = load_prepared(prepare("sklearn-digits", root=tmp_path, seed=3))
    idx = p.meta["train_indices"]
    assert torch.equal(p.x_train, full.x_train[idx]) and torch.equal(p.y_train, full.y_train[idx])
    assert torch.equal(p.x_test, full.x_test)  # the test set is untouched
    again = load_prepared(prepare("sklearn-digits", root=tmp_path, subset=200, seed=3,
                                  out=tmp_path / "again.pt"))
    assert torch.equal(again.meta["train_indices"], idx)
    with pytest.raises(ValueError, match="exceeds"):
        prepare("sklearn-digits", root=tmp_path, subset=10**6)


def test_label_noise_saved_and_reproducible(tmp_path):
    p = load_prepared(prepare("sklearn-digits", root=tmp_path, label_noise=0.25))
    clean, noisy, mask = p.meta["y_train_clean"], p.y_train, p.meta["noise_mask"]
    n = clean.shape[0]
    assert int(mask.sum()) == round(0.25 * n) == p.meta["n_noisy"]
    assert torch.equal(mask, noisy != clean)  # every chosen label really changed
    assert noisy.min() >= 0 and noisy.max() <= 9
    clean_ref = load_prepared(prepare("sklearn-digits", root=tmp_path))
    assert torch.equal(clean, clean_ref.y_train)  # same split, labels before noise
    _, y_clean = p.tensors("train_clean")
    assert torch.equal(y_clean, clean)
    same = load_prepared(prepare("sklearn-digits", root=tmp_path, label_noise=0.25,
                                 out=tmp_path / "same.pt"))
    assert torch.equal(same.y_train, noisy)
    # another seed: other noisy labels (and another split)
    other = load_prepared(prepare("sklearn-digits", root=tmp_path, label_noise=0.25, seed=1))
    assert not torch.equal(other.meta["noise_mask"], mask)
    with pytest.raises(ValueError, match="label_noise"):
        prepare("sklearn-digits", root=tmp_path, label_noise=1.5)


def test_unknown_dataset_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        prepare("imagenet", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prepared(tmp_path / "nope.pt")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a convflat prepared dataset"):
        load_prepared(tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a convflat prepared dataset"):
        load_prepared(tmp_path / "garbage.pt")


# ---- torchvision (offline) ---------------------------------------------------------------------


def _write_idx(path, array: np.ndarray) -> None:
    """The MNIST idx format: magic (0x08 = uint8, rank), sizes, big-endian, then bytes."""
    header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(
        struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_on_disk_is_not_downloaded(tmp_path, monkeypatch):
    """A dataset already under root is read with download=False: the network is never tried."""
    import torchvision.datasets as tvd

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)

    def no_network(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(tvd.MNIST, "download", no_network)
    p = load_prepared(prepare("mnist", root=tmp_path, download=True))
    assert p.x_train.shape == (30, 1, 28, 28) and p.x_test.shape == (10, 1, 28, 28)
    assert p.classes[0].startswith("0") and p.num_classes == 10
    assert torch.equal(p.y_train, torch.arange(30) % 10)
    assert p.meta["augment"] == {"crop_padding": 2, "flip": False}


def test_torchvision_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download is off"):
        prepare("cifar10", root=tmp_path, download=False)


# ---- npz -------------------------------------------------------------------------------------


def _npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _good(n=40, m=12, shape=(3, 6, 6), k=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        "y_train": np.arange(n) % k,
        "x_test": rng.integers(0, 256, (m, *shape), dtype=np.uint8),
        "y_test": np.arange(m) % k,
    }


def test_npz_given_split(tmp_path):
    arrays = _good()
    p = load_prepared(prepare(f"npz:{_npz(tmp_path, **arrays)}", root=tmp_path))
    assert p.name.startswith("npz:") and p.path.name == "npz-d.pt"
    assert torch.equal(p.x_train, torch.from_numpy(arrays["x_train"]))
    assert torch.equal(p.y_test, torch.from_numpy(arrays["y_test"]))
    assert p.classes == ["0", "1", "2", "3"] and p.meta["split"] == "given"


def test_npz_x_y_float_gray_with_classes(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((50, 5, 5)).astype(np.float32)  # N x H x W in [0, 1]
    y = (np.arange(50) % 3).astype(np.float64)     # integer-valued floats are fine
    path = _npz(tmp_path, x=x, y=y, classes=np.array(["cat", "dog", "eel"]))
    p = load_prepared(prepare(f"npz:{path}", root=tmp_path, test_fraction=0.2))
    assert p.classes == ["cat", "dog", "eel"]
    assert p.x_train.shape[1:] == (1, 5, 5) and p.x_train.dtype == torch.uint8
    assert p.x_train.shape[0] + p.x_test.shape[0] == 50 and p.meta["split"] == "random"
    expect = np.rint(x * 255).astype(np.uint8)[:, None]
    all_x = torch.cat([p.x_train, p.x_test]).sort(dim=0).values
    assert torch.equal(all_x, torch.from_numpy(expect).sort(dim=0).values)


def _with(**changes):
    arrays = _good()
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


_nan_images = _good()["x_train"].astype(np.float32)
_nan_images[3, 0, 1, 1] = np.nan
_nan_labels = (np.arange(40) % 4).astype(np.float32)
_nan_labels[5] = np.nan
_bad_labels = np.arange(40) % 4
_bad_labels[7] = 9


@pytest.mark.parametrize("arrays, pattern", [
    (_with(y_test=None), r"missing key 'y_test'"),
    ({"images": np.zeros((3, 4, 4))}, r"missing key 'x'"),
    (_with(y_train=np.arange(39) % 4), r"key 'y_train' has 39 labels but key 'x_train' has 40"),
    (_with(y_train=_bad_labels, classes=np.array(["a", "b", "c", "d"])),
     r"key 'y_train' has label 9 at index 7, outside 0..3"),
    (_with(y_test=-(np.arange(12) % 2)), r"key 'y_test' has label -1 at index 1"),
    (_with(x_train=_nan_images), r"key 'x_train' contains NaN"),
    (_with(y_train=_nan_labels), r"key 'y_train' contains NaN"),
    (_with(x_train=np.zeros((40, 36))), r"key 'x_train' has rank 2"),
    (_with(x_test=np.zeros((12, 1, 3, 6, 6))), r"key 'x_test' has rank 5"),
    (_with(y_train=np.zeros((40, 1), dtype=np.int64)), r"key 'y_train' has rank 2"),
    (_with(x_test=np.zeros((12, 3, 5, 5), dtype=np.uint8)),
     r"key 'x_test' have shape C x H x W = \(3, 5, 5\)"),
    (_with(x_train=np.full((40, 3, 6, 6), 300.0)), r"key 'x_train' has pixel values in"),
    (_with(y_train=np.arange(40) % 4 + 0.5), r"key 'y_train' has a non-integer label"),
    (_with(x_train=np.zeros((0, 3, 6, 6))), r"key 'x_train' holds no images"),
])
def test_npz_errors_name_key_and_file(tmp_path, arrays, pattern):
    path = _npz(tmp_path, "bad.npz", **arrays)
    with pytest.raises(ValueError, match=pattern) as info:
        prepare(f"npz:{path}", root=tmp_path)
    assert "bad.npz" in str(info.value)


def test_npz_missing_or_unreadable_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        prepare(f"npz:{tmp_path / 'missing.npz'}", root=tmp_path)
    (tmp_path / "broken.npz").write_bytes(b"PK garbage")
    with pytest.raises(ValueError, match="broken.npz"):
        prepare(f"npz:{tmp_path / 'broken.npz'}", root=tmp_path)


def test_npz_garbage_is_named_as_not_an_npz(tmp_path):
    """Text, or a bare .npy, is not a zip archive: one sentence saying what an .npz is, not
    numpy's advice about pickles."""
    text = tmp_path / "notes.npz"
    text.write_text("x,y\n1,2\n")
    npy = tmp_path / "bare.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros((4, 8, 8), dtype=np.uint8))
    for path in (text, npy):
        with pytest.raises(ValueError) as info:
            prepare(f"npz:{path}", root=tmp_path)
        assert str(info.value) == (f"{path} is not an .npz file (a zip archive of .npy arrays, "
                                   "as np.savez writes)")


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    arrays = _good()
    arrays["y_train"] = np.array([int(v) for v in arrays["y_train"]], dtype=object)
    path = _npz(tmp_path, "objects.npz", **arrays)
    with pytest.raises(ValueError) as info:
        prepare(f"npz:{path}", root=tmp_path)
    assert str(info.value) == (f"{path}: an array holds Python objects; convflat reads only "
                               "numeric arrays")
    assert "pickle" not in str(info.value)


def test_npz_edit_is_prepared_again(tmp_path):
    path = _npz(tmp_path, **_good(seed=0))
    first = load_prepared(prepare(f"npz:{path}", root=tmp_path))
    _npz(tmp_path, **_good(seed=1))
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = load_prepared(prepare(f"npz:{path}", root=tmp_path))
    assert not torch.equal(first.x_train, second.x_train)


# ---- image folder ----------------------------------------------------------------------------


def _folder(tmp_path, gray: bool, size=(6, 5), classes=("ant", "bee"), test_classes=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split, cls_list, n in (("train", classes, 3), ("test", test_classes or classes, 2)):
        for c in cls_list:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0]) if gray else (size[1], size[0], 3)
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(a, mode="L" if gray else "RGB").save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("gray", [True, False])
def test_folder_dataset(tmp_path, gray):
    root = _folder(tmp_path, gray)
    p = load_prepared(prepare(f"folder:{root}", root=tmp_path))
    c = 1 if gray else 3
    assert p.x_train.shape == (6, c, 5, 6) and p.x_test.shape == (4, c, 5, 6)
    assert p.classes == ["ant", "bee"]
    assert p.y_train.tolist() == [0, 0, 0, 1, 1, 1] and p.y_test.tolist() == [0, 0, 1, 1]
    from PIL import Image

    img = np.asarray(Image.open(root / "train" / "bee" / "1.png").convert("RGB"))
    expect = img[..., :1] if gray else img
    assert torch.equal(p.x_train[4], torch.from_numpy(expect.transpose(2, 0, 1).copy()))


def test_folder_errors(tmp_path):
    from PIL import Image

    root = _folder(tmp_path, gray=True)
    Image.fromarray(np.zeros((7, 7), dtype=np.uint8)).save(root / "test" / "bee" / "odd.png")
    with pytest.raises(ValueError, match=r"odd.png: image is 7 x 7 pixels"):
        prepare(f"folder:{root}", root=tmp_path)
    root2 = _folder(tmp_path / "b", gray=True, test_classes=("ant", "cow"))
    with pytest.raises(ValueError, match="class folder 'cow'"):
        prepare(f"folder:{root2}", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no train/"):
        prepare(f"folder:{tmp_path / 'empty'}", root=tmp_path)


def test_prepared_file_layout(digits):
    obj = torch.load(digits.path, weights_only=True)
    assert obj["format"] == DATA_FORMAT
    assert set(obj) == {"format", "name", "x_train", "y_train", "x_test", "y_test", "classes",
                        "mean", "std", "meta"}
    assert data.canonical_name("CIFAR-10") == "cifar10"


# ---- the one seeded subset and the one table of sources -------------------------------------


def test_seeded_subset_is_a_fixed_random_draw():
    x = torch.arange(100).reshape(50, 2)
    y = torch.arange(50)
    xs, ys = data.seeded_subset(x, y, n=10, seed=3)
    idx = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:10]
    assert torch.equal(ys, idx) and torch.equal(xs, x[idx])
    assert torch.equal(data.seeded_subset(y, n=10, seed=3)[0], ys)  # same rows, any tensors
    assert not torch.equal(data.seeded_subset(y, n=10, seed=4)[0], ys)
    assert data.seeded_subset(y, n=None, seed=3)[0] is y
    assert data.seeded_subset(y, n=50, seed=3)[0] is y
    assert data.seeded_subset(y, n=80, seed=0)[0] is y
    with pytest.raises(ValueError, match="differ in length"):
        data.seeded_subset(x, y[:3], n=2, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        data.seeded_subset(y, n=0, seed=0)


def test_sources_table_drives_the_names(digits):
    from convflat.sources import SOURCES, find_source

    assert data.DATASETS == (*SOURCES, "npz:PATH", "folder:PATH")
    for source in SOURCES.values():
        assert data.canonical_name(source.name.upper()) == source.name
        for alias in source.aliases:
            assert data.canonical_name(alias) == source.name and find_source(alias) is source
        assert data.DEFAULT_AUGMENT[source.name] == {"crop_padding": source.crop_padding,
                                                     "flip": source.flip}
        if source.torchvision:
            cls = data.torchvision_class(source.name)
            assert cls.__name__ == source.torchvision
            assert data.torchvision_files(source.name, "r")  # something to fetch by hand
    assert find_source("npz:/x.npz") is None and find_source("imagenet") is None
    row = SOURCES["sklearn-digits"]
    assert (row.split, row.image_size, row.channels, row.classes) == ("random", (8, 8), 1, 10)
    # the estimate's figure of the training images: the real count within rounding
    assert abs(row.n_images - digits.x_train.shape[0]) <= 1
    assert data.torchvision_files("cifar10", "r") == [
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "r/cifar-10-python.tar.gz")]
