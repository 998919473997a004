"""Floor 2: datasets -> one canonical tensor file -> normalized tensors on a device.

Every source (a torchvision benchmark, scikit-learn's digits, a user's ``.npz`` or image
folder) is turned by :func:`prepare` into one file, ``<root>/prepared/<slug>.pt``::

    {"format": "convflat-data/1", "name": str,
     "x_train": uint8 (N, C, H, W), "y_train": int64 (N,),      # labels after label noise
     "x_test":  uint8 (M, C, H, W), "y_test":  int64 (M,),
     "classes": list[str] (K names), "mean": float32 (C,), "std": float32 (C,),
     "meta": {...}}                                             # see :func:`prepare`

so that training reads one tensor file, not thousands of images. ``mean`` and ``std`` are the
per-channel statistics of the training images in [0, 1] units; :meth:`Prepared.tensors` maps
``x`` to ``(x / 255 - mean) / std``.

Dataset names (:data:`DATASETS`; the built-in ones are the rows of
:data:`convflat.sources.SOURCES`): ``mnist``, ``fashion-mnist``, ``kmnist``, ``cifar10``,
``cifar100``, ``svhn`` (torchvision, with torchvision's own download and checksum code),
``sklearn-digits`` (8 x 8 grayscale, ships with scikit-learn: no network), ``npz:PATH`` and
``folder:PATH``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convflat.io import atomic_torch_save
from convflat.sources import SOURCES, USER_SOURCES

log = logging.getLogger(__name__)

DATA_FORMAT = "convflat-data/1"

# name -> (torchvision class, how the split is chosen), from the one table of sources
TORCHVISION = {s.name: (s.torchvision, s.split) for s in SOURCES.values() if s.torchvision}
DATASETS = (*SOURCES, *USER_SOURCES)
_ALIASES = {alias: s.name for s in SOURCES.values() for alias in s.aliases}

# Augmentation a dataset is trained with unless the TrainConfig says otherwise: random crop
# after zero-padding by `crop_padding` pixels per side, and horizontal flips (the columns of
# convflat.sources.SOURCES). npz and folder data: crop by H / 8, no flips.
DEFAULT_AUGMENT = {s.name: {"crop_padding": s.crop_padding, "flip": s.flip}
                   for s in SOURCES.values()}

_STD_FLOOR = 1.0 / 255.0  # a constant channel gets std 1/255 instead of 0 (no division by 0)


def canonical_name(name: str) -> str:
    """Lower-case a benchmark name and resolve aliases; ``npz:``/``folder:`` keep their path."""
    kind, sep, rest = str(name).partition(":")
    if sep and kind.lower() in ("npz", "folder"):
        if not rest:
            raise ValueError(f"dataset {name!r}: give a path after '{kind}:'")
        return f"{kind.lower()}:{rest}"
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel: uint8 (B, C, H, W) -> ``dtype`` (B, C, H, W).

    The one normalization used everywhere (evaluation tensors and training batches), so
    that training and measurement see bit-identical inputs for the same image.
    """
    shape = (1, -1, 1, 1)
    mean = mean.to(device=x.device, dtype=dtype).view(shape)
    std = std.to(device=x.device, dtype=dtype).view(shape)
    return (x.to(dtype) / 255 - mean) / std


# --------------------------------------------------------------------------------------------
# The canonical in-memory form
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Prepared:
    """A prepared dataset in memory: uint8 images, int64 labels, class names, statistics.

    ``x_train`` (N, C, H, W) uint8, ``y_train`` (N,) int64 (noisy labels when label noise was
    applied; the clean ones are ``meta["y_train_clean"]``), ``x_test`` (M, C, H, W), ``y_test``
    (M,), ``classes`` (K names), ``mean`` / ``std`` (C,) float32 in [0, 1] units, ``name``,
    ``meta`` (provenance of the split, subset and noise; see :func:`prepare`), ``path``.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    mean: torch.Tensor
    std: torch.Tensor
    meta: dict[str, Any]
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        """C, the image channels."""
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    @property
    def augment(self) -> dict[str, Any]:
        """The dataset's default augmentation, ``{"crop_padding": int, "flip": bool}``."""
        return dict(self.meta.get("augment") or {"crop_padding": 0, "flip": False})

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The raw ``(uint8 images, int64 labels)`` of ``"train"``, ``"test"`` or
        ``"train_clean"`` (training images with the labels before noise)."""
        if split == "train":
            return self.x_train, self.y_train
        if split == "test":
            return self.x_test, self.y_test
        if split == "train_clean":
            return self.x_train, self.meta.get("y_train_clean", self.y_train)
        raise ValueError(f"split must be 'train', 'test' or 'train_clean', got {split!r}")

    def tensors(self, split: str, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images ``(x / 255 - mean) / std`` as ``dtype`` (N, C, H, W) on
        ``device``, and int64 labels (N,)."""
        x, y = self.split(split)
        x = x.to(device)
        return normalize(x, self.mean, self.std, dtype), y.to(device)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: name, sizes, shapes, noise and subset."""
        return {
            "name": self.name,
            "path": None if self.path is None else str(self.path),
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "num_classes": self.num_classes,
            "image_shape": list(self.x_train.shape[1:]),
            "subset": self.meta.get("subset"),
            "label_noise": self.meta.get("label_noise", 0.0),
            "seed": self.meta.get("seed"),
        }


# --------------------------------------------------------------------------------------------
# Data identity: what a checkpoint records about the data it was trained on
# --------------------------------------------------------------------------------------------

IDENTITY_FORMAT = "convflat-data-identity/1"


def train_hash(prepared: Prepared) -> str:
    """SHA-256 (hex) of the training split as prepared: the uint8 image bytes (C-contiguous
    N x C x H x W), then the int64 labels (little-endian), then the shape. Two prepared files
    with equal hashes hold the same training images with the same (noisy) labels."""
    x = prepared.x_train.detach().cpu().to(torch.uint8).contiguous().numpy()
    y = prepared.y_train.detach().cpu().to(torch.int64).contiguous().numpy().astype("<i8")
    h = hashlib.sha256()
    h.update(x.tobytes())
    h.update(y.tobytes())
    h.update(repr(tuple(x.shape)).encode())
    return h.hexdigest()


def data_identity(prepared: Prepared) -> dict[str, Any]:
    """The identity of a prepared dataset, as a checkpoint records it (JSON-ready):
    ``format``, ``name``, ``source``, ``subset``, ``label_noise``, ``seed``,
    ``test_fraction``, ``image_shape`` [C, H, W], ``classes`` (K), ``n_train``,
    ``train_hash`` (:func:`train_hash`), ``request`` (the arguments of :func:`prepare` that
    wrote it, so that it can be prepared again) and ``path`` (the absolute path of the
    prepared file, None for data prepared in memory)."""
    meta = prepared.meta
    return {
        "format": IDENTITY_FORMAT,
        "name": prepared.name,
        "source": meta.get("source"),
        "subset": meta.get("subset"),
        "label_noise": float(meta.get("label_noise") or 0.0),
        "seed": meta.get("seed"),
        "test_fraction": meta.get("test_fraction"),
        "image_shape": [int(s) for s in prepared.x_train.shape[1:]],
        "classes": prepared.num_classes,
        "n_train": int(prepared.x_train.shape[0]),
        "train_hash": train_hash(prepared),
        "request": meta.get("request"),
        "path": None if prepared.path is None else str(Path(prepared.path).resolve()),
    }


def describe_identity(identity: dict[str, Any]) -> str:
    """One short phrase naming a data identity, e.g. ``sklearn-digits (300 train images,
    subset 300, noise 0, seed 0; 1x8x8, 10 classes; train hash 1a2b3c4d5e6f)``."""
    shape = "x".join(str(s) for s in identity.get("image_shape") or []) or "?"
    subset = identity.get("subset")
    parts = [f"{identity.get('n_train')} train images"]
    if subset is not None:
        parts.append(f"subset {subset}")
    parts += [f"noise {float(identity.get('label_noise') or 0):g}", f"seed {identity.get('seed')}"]
    return (f"{identity.get('name')} ({', '.join(parts)}; {shape}, {identity.get('classes')} "
            f"classes; train hash {str(identity.get('train_hash'))[:12]})")


def identity_mismatch(expected: dict[str, Any], found: dict[str, Any]) -> str | None:
    """None when two identities name the same training data (equal train hashes); else the
    first difference, as a phrase: ``"image shape 1x8x8 vs 1x16x16"``, ``"10 vs 4
    classes"``, ``"300 vs 1438 training images"``, ``"other training images or labels"``."""
    shape_a = list(expected.get("image_shape") or [])
    shape_b = list(found.get("image_shape") or [])
    if shape_a != shape_b:
        return (f"image shape {'x'.join(map(str, shape_a))} vs "
                f"{'x'.join(map(str, shape_b))}")
    if expected.get("classes") != found.get("classes"):
        return f"{expected.get('classes')} vs {found.get('classes')} classes"
    if expected.get("n_train") != found.get("n_train"):
        return f"{expected.get('n_train')} vs {found.get('n_train')} training images"
    if expected.get("train_hash") != found.get("train_hash"):
        return "other training images or labels"
    return None


def load_prepared(path: str | os.PathLike) -> Prepared:
    """Read a file written by :func:`prepare` (``torch.load(weights_only=True)``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prepared dataset {path} does not exist (run `convflat prepare`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file gets the same clear message
        raise ValueError(f"{path} is not a convflat prepared dataset: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("format") != DATA_FORMAT:
        raise ValueError(f"{path} is not a convflat prepared dataset (format {DATA_FORMAT!r})")
    for key in ("x_train", "y_train", "x_test", "y_test", "classes", "mean", "std"):
        if key not in obj:
            raise ValueError(f"{path}: prepared dataset lacks key {key!r}")
    return Prepared(
        name=obj["name"], x_train=obj["x_train"], y_train=obj["y_train"], x_test=obj["x_test"],
        y_test=obj["y_test"], classes=list(obj["classes"]), mean=obj["mean"], std=obj["std"],
        meta=dict(obj.get("meta") or {}), path=path,
    )


# --------------------------------------------------------------------------------------------
# prepare: any source -> the canonical file
# --------------------------------------------------------------------------------------------


def default_path(name: str, *, root: str | os.PathLike = "data", subset: int | None = None,
                 label_noise: float = 0.0, seed: int = 0, test_fraction: float = 0.2) -> Path:
    """``<root>/prepared/<slug>.pt``; the slug names the dataset and every non-default option,
    e.g. ``cifar10.pt``, ``sklearn-digits_n500_noise0.2_seed1.pt``."""
    name = canonical_name(name)
    kind, _, rest = name.partition(":")
    slug = f"{kind}-{Path(rest).stem or Path(rest).name}" if rest else kind
    parts = [slug]
    if subset is not None:
        parts.append(f"n{int(subset)}")
    if label_noise:
        parts.append(f"noise{float(label_noise):g}")
    if seed:
        parts.append(f"seed{int(seed)}")
    if float(test_fraction) != 0.2:
        parts.append(f"test{float(test_fraction):g}")
    return Path(root) / "prepared" / ("_".join(parts) + ".pt")


def prepare(
    name: str,
    *,
    root: str | os.PathLike = "data",
    out: str | os.PathLike | None = None,
    subset: int | None = None,
    label_noise: float = 0.0,
    seed: int = 0,
    download: bool = True,
    test_fraction: float = 0.2,
    overwrite: bool = False,
) -> Path:
    """Turn dataset ``name`` into one canonical ``.pt`` file and return its path.

    Steps, each recorded in ``meta``:

    1. Load. torchvision benchmarks live under ``root`` (torchvision's layout); one already
       there is read without touching the network, a missing one is downloaded (and checked
       by torchvision's MD5 sums) only if ``download``. Sources without a given split
       (``sklearn-digits``, ``npz`` with ``x, y``) are split class by class: a fraction
       ``test_fraction`` of each class goes to the test set (``meta["split"] = "random"``).
    2. Subset: keep ``subset`` training images drawn uniformly without replacement
       (``meta["train_indices"]``: their indices in the full training split).
    3. Label noise: exactly ``round(label_noise * N)`` training images, drawn uniformly, get a
       label drawn uniformly from the K - 1 *other* classes (so the noise fraction is exact).
       ``y_train`` holds the noisy labels; ``meta["y_train_clean"]`` the clean ones and
       ``meta["noise_mask"]`` (N,) bool which were changed.
    4. Statistics: per-channel mean and std of the (subset) training images in [0, 1] units.

    The split, the subset and the noise each draw from their own generator derived from
    ``seed``, so the same arguments give the same file. An existing ``out`` written by the
    same request is reused unless ``overwrite``. ``out`` defaults to :func:`default_path`.
    """
    name = canonical_name(name)
    _check_request(subset, label_noise, test_fraction)
    out = Path(out) if out is not None else default_path(
        name, root=root, subset=subset, label_noise=label_noise, seed=seed,
        test_fraction=test_fraction)
    request = _request(name, subset, label_noise, seed, test_fraction)
    if not overwrite and _holds_request(out, request):
        log.info("reusing %s (same request)", out)
        return out

    x_tr, y_tr, x_te, y_te, classes, source, split_kind = _load_source(
        name, Path(root), download=download, test_fraction=test_fraction, seed=seed)
    check_splits(y_tr, y_te, len(classes), source,
                 hint=" (raise the test fraction)" if split_kind == "random" else "")
    n_full = int(x_tr.shape[0])
    x_tr, y_tr, train_indices = _take_subset(x_tr, y_tr, subset, seed, name, source)
    y_clean = y_tr.clone()
    y_noisy, mask = _apply_label_noise(y_tr, len(classes), float(label_noise), seed)
    mean, std = _channel_stats(x_tr)

    base = name.split(":")[0]
    augment = DEFAULT_AUGMENT.get(base) or {
        "crop_padding": max(1, round(min(x_tr.shape[2:]) / 8)), "flip": False}
    meta = {
        "source": source,
        "request": request,
        "split": split_kind,
        "test_fraction": float(test_fraction) if split_kind == "random" else None,
        "n_train_full": n_full,
        "subset": None if subset is None else int(subset),
        "train_indices": train_indices,
        "label_noise": float(label_noise),
        "n_noisy": int(mask.sum()),
        "noise_mask": mask,
        "y_train_clean": y_clean,
        "seed": int(seed),
        "augment": dict(augment),
    }
    obj = {
        "format": DATA_FORMAT, "name": name, "x_train": x_tr.contiguous(), "y_train": y_noisy,
        "x_test": x_te.contiguous(), "y_test": y_te, "classes": [str(c) for c in classes],
        "mean": mean, "std": std, "meta": meta,
    }
    atomic_torch_save(out, obj)
    log.info("prepared %s: %d train, %d test, %d classes, images %s -> %s", name,
             x_tr.shape[0], x_te.shape[0], len(classes), tuple(x_tr.shape[1:]), out)
    return out


def prepare_transient(name: str, *, root: str | os.PathLike = "data", subset: int | None = None,
                      label_noise: float = 0.0, seed: int = 0, test_fraction: float = 0.2,
                      download: bool = True) -> Prepared:
    """:func:`prepare` without writing a prepared file under ``root``: a file at
    :func:`default_path` written by the same request is read (not rewritten); otherwise the
    data are prepared into a temporary directory, read back and the file removed
    (``path`` of the result is then None). torchvision sources still read (and, with
    ``download``, fetch) their raw files under ``root``."""
    import tempfile

    name = canonical_name(name)
    _check_request(subset, label_noise, test_fraction)
    kw = {"subset": subset, "label_noise": label_noise, "seed": seed,
          "test_fraction": test_fraction}
    existing = default_path(name, root=root, **kw)
    if _holds_request(existing, _request(name, subset, label_noise, seed, test_fraction)):
        return load_prepared(existing)
    with tempfile.TemporaryDirectory(prefix="convflat-prepare-") as tmp:
        prepared = load_prepared(prepare(name, root=root, out=Path(tmp) / "prepared.pt",
                                         download=download, **kw))
    prepared.path = None
    return prepared


def _check_request(subset: Any, label_noise: Any, test_fraction: Any) -> None:
    """:func:`prepare`'s numeric arguments, each checked by name."""
    if subset is not None and (int(subset) != subset or int(subset) < 1):
        raise ValueError(f"subset must be a positive number of images, got {subset!r}")
    if not 0.0 <= float(label_noise) < 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1), got {label_noise!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")


def _holds_request(out: Path, request: dict[str, Any]) -> bool:
    """Whether ``out`` is a readable prepared file written by the same ``request``."""
    if not out.is_file():
        return False
    try:
        existing = load_prepared(out)
    except (ValueError, FileNotFoundError):
        return False
    return existing.meta.get("request") == request


def _take_subset(x: torch.Tensor, y: torch.Tensor, subset: int | None, seed: int, name: str,
                 source: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The ``subset`` training images drawn uniformly without replacement (their indices in
    the full split, sorted, as the third element; all images and None without a subset)."""
    if subset is None:
        return x, y, None
    n_full = int(x.shape[0])
    if subset > n_full:
        raise ValueError(f"subset={subset} exceeds the {n_full} training images of {name}")
    perm = torch.randperm(n_full, generator=seeded_generator(seed, "subset"))
    train_indices = perm[: int(subset)].sort().values
    x, y = x[train_indices], y[train_indices]
    if torch.unique(y).numel() < 2:
        raise ValueError(f"{source}: the subset of {subset} training images holds one "
                         "class only; a classifier needs two (take a larger subset)")
    return x, y, train_indices


def check_splits(y_train: torch.Tensor, y_test: torch.Tensor, num_classes: int, where: str,
                 hint: str = "") -> None:
    """Refuse, at prepare time, data that would only fail epochs later: a split without
    images, fewer than two classes, or labels with gaps (a class in 0..K-1 with no training
    image). ``where`` names the source (file, folder or dataset) in the ValueError."""
    for split, y in (("train", y_train), ("test", y_test)):
        if y.numel() == 0:
            raise ValueError(f"{where}: split {split!r} has no images"
                             + (hint if split == "test" else ""))
    present = torch.unique(y_train).tolist()
    if num_classes < 2 or len(present) < 2:
        raise ValueError(f"{where}: split 'train' holds {len(present)} class"
                         f"{'es' if len(present) != 1 else ''} ({num_classes} declared); a "
                         "classifier needs at least two")
    missing = sorted(set(range(num_classes)) - set(present))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise ValueError(f"{where}: labels have gaps: class {shown} of 0..{num_classes - 1} "
                         "has no image in split 'train'; number the classes 0..K-1 without "
                         "gaps")


def _request(name: str, subset, label_noise, seed, test_fraction) -> dict[str, Any]:
    """What a prepared file was asked for; a later identical request reuses the file. For an
    npz source the file's size and modification time are part of it, so an edited file is
    prepared again."""
    req = {"name": name, "subset": None if subset is None else int(subset),
           "label_noise": float(label_noise), "seed": int(seed),
           "test_fraction": float(test_fraction)}
    if name.startswith("npz:"):
        p = Path(name[4:])
        if p.is_file():
            st = p.stat()
            req["source_stat"] = [int(st.st_size), int(st.st_mtime_ns)]
    return req


def seeded_generator(seed: int, stream: str) -> torch.Generator:
    """An independent, reproducible CPU generator per (seed, purpose): the torch seed is
    ``numpy.random.SeedSequence([seed, *map(ord, stream)])``'s first 64-bit word."""
    words = [int(seed) & 0xFFFFFFFF, *(ord(c) for c in stream)]
    state = int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(state)


def seeded_subset(*tensors: torch.Tensor, n: int | None,
                  seed: int) -> tuple[torch.Tensor, ...]:
    """The same seeded uniform random ``n`` rows of every tensor (a subset for measuring).

    The rows are the first ``n`` of ``torch.randperm(N, generator=torch.Generator()
    .manual_seed(seed))``, in that order, so a seed gives the same subset on every machine
    and for every run of a study. ``n`` None, or at least N: every row, in order. This is
    the one definition of "a seeded random subset" (the workflow's measure and validation
    jobs, ``convflat curvature --max-samples``).
    """
    if not tensors:
        raise ValueError("seeded_subset needs at least one tensor")
    total = int(tensors[0].shape[0])
    if any(int(t.shape[0]) != total for t in tensors):
        lengths = [int(t.shape[0]) for t in tensors]
        raise ValueError(f"seeded_subset: tensors differ in length {lengths}")
    if n is not None and (isinstance(n, bool) or int(n) != n or n < 1):
        raise ValueError(f"subset size must be a positive integer, got {n!r}")
    if n is None or int(n) >= total:
        return tuple(tensors)
    idx = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))[: int(n)]
    return tuple(t[idx.to(t.device)] for t in tensors)


class DeviceData:
    """A labelled uint8 image set held on the device, producing augmented, normalized batches.

    ``x`` uint8 (N, C, H, W) is zero-padded once to (N, C, H + 2p, W + 2p) (zero = black, as
    torchvision's ``RandomCrop(padding=p)``); batch image b is
    ``x_pad[i_b, :, oy_b + r, ox_b + s']`` for r < H, s < W, with s' = s, or W - 1 - s when b is
    flipped (two ``gather`` calls on the device), followed by ``(x / 255 - mean) / std`` in
    ``dtype``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 *, crop_padding: int = 0, flip: bool = False,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError("DeviceData needs uint8 images (N, C, H, W), got "
                             f"{x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels of shape {tuple(y.shape)} do not match {x.shape[0]} images")
        self.device = torch.device(device)
        self.pad, self.flip = int(crop_padding), bool(flip)
        self.n, self.c, self.h, self.w = (int(s) for s in x.shape)
        p = self.pad
        self.x_pad = F.pad(x, (p, p, p, p)).to(self.device) if p else x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.channels_last, self.dtype = channels_last, dtype
        self._rows = torch.arange(self.h, device=self.device)
        self._cols = torch.arange(self.w, device=self.device)

    def __len__(self) -> int:
        return self.n

    @property
    def images(self) -> torch.Tensor:
        """The un-augmented uint8 images (N, C, H, W), a view of the padded store."""
        p = self.pad
        return self.x_pad[:, :, p : p + self.h, p : p + self.w] if p else self.x_pad

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (a partial last batch is dropped), at least one."""
        return max(1, self.n // batch_size)

    def epoch(self, generator: torch.Generator,
              batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``steps_per_epoch`` augmented batches ``(x (B, C, H, W) dtype, y (B,))``.

        Draws, in this order and on the CPU: a permutation of N, then (if cropping) N crop
        offsets in [0, 2p], then (if flipping) N flip bits, so the stream is independent of
        the device.
        """
        perm = torch.randperm(self.n, generator=generator)
        offsets = (torch.randint(0, 2 * self.pad + 1, (self.n, 2), generator=generator)
                   if self.pad else None)
        flips = torch.randint(0, 2, (self.n,), generator=generator).bool() if self.flip else None
        perm = perm.to(self.device, non_blocking=True)
        offsets = None if offsets is None else offsets.to(self.device, non_blocking=True)
        flips = None if flips is None else flips.to(self.device, non_blocking=True)
        b = min(batch_size, self.n)
        for i in range(self.steps_per_epoch(batch_size)):
            sl = slice(i * b, (i + 1) * b)
            idx = perm[sl]
            yield self.batch(idx, None if offsets is None else offsets[sl],
                             None if flips is None else flips[sl])

    def batch(self, idx: torch.Tensor, offsets: torch.Tensor | None = None,
              flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` (B,), cropped at ``offsets`` (B, 2) = (row, col) into the padded
        store (None: the un-augmented centre) and mirrored where ``flips`` (B,) is true ->
        normalized (B, C, H, W), labels (B,)."""
        if offsets is None:
            xb = self.images[idx]                                           # (B, C, H, W)
            if flips is not None:
                xb = torch.where(flips.view(-1, 1, 1, 1), xb.flip(3), xb)
        else:
            b, c, wp = idx.numel(), self.c, self.x_pad.shape[3]
            rows = self._rows + offsets[:, :1]                              # (B, H)
            cols = self._cols + offsets[:, 1:]                              # (B, W)
            if flips is not None:
                cols = torch.where(flips[:, None], cols.flip(1), cols)
            # two gathers: faster than one 4-index advanced indexing (docs/benchmarks.md)
            xb = self.x_pad[idx]                                            # (B, C, H+2p, W+2p)
            xb = xb.gather(2, rows[:, None, :, None].expand(b, c, self.h, wp))
            xb = xb.gather(3, cols[:, None, None, :].expand(b, c, self.h, self.w))
        xb = normalize(xb, self.mean, self.std, self.dtype)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.y[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Un-augmented normalized batches in order, for measurement."""
        for i in range(0, self.n, batch_size):
            xb = normalize(self.images[i : i + batch_size], self.mean, self.std, self.dtype)
            yield xb, self.y[i : i + batch_size]


def _apply_label_noise(y: torch.Tensor, num_classes: int, fraction: float,
                       seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the labels of exactly ``round(fraction * N)`` samples by a uniformly drawn
    *different* class: ``y' = (y + U{1..K-1}) mod K``. Returns (noisy labels, changed mask)."""
    n = int(y.shape[0])
    mask = torch.zeros(n, dtype=torch.bool)
    if fraction <= 0.0:
        return y.clone(), mask
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    gen = seeded_generator(seed, "label_noise")
    chosen = torch.randperm(n, generator=gen)[: round(fraction * n)]
    shift = torch.randint(1, num_classes, (chosen.numel(),), generator=gen)
    noisy = y.clone()
    noisy[chosen] = (y[chosen] + shift) % num_classes
    mask[chosen] = True
    return noisy, mask


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (population) of uint8 (N, C, H, W) images in [0, 1] units,
    accumulated in float64 over chunks so memory stays small."""
    c = x.shape[1]
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, x.shape[0], chunk):
        xb = x[i : i + chunk].to(torch.float64) / 255
        s1 += xb.sum(dim=(0, 2, 3))
        s2 += (xb * xb).sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt().clamp_min(_STD_FLOOR)
    return mean.float(), std.float()


def _stratified_split(y: torch.Tensor, test_fraction: float,
                      seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test): ``round(test_fraction * n_c)`` of each class c go to the test
    set, drawn uniformly; both index lists are returned sorted."""
    gen = seeded_generator(seed, "split")
    test = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        k = round(test_fraction * idx.numel())
        test.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    test_idx = torch.cat(test).sort().values
    keep = torch.ones(y.shape[0], dtype=torch.bool)
    keep[test_idx] = False
    return torch.nonzero(keep).flatten(), test_idx


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _load_source(name: str, root: Path, *, download: bool, test_fraction: float, seed: int):
    """-> (x_train, y_train, x_test, y_test, classes, source, split kind)."""
    if name in TORCHVISION:
        return (*_load_torchvision(name, root, download), f"torchvision:{name}", "given")
    if name == "sklearn-digits":
        x, y, classes = _load_digits()
        tr, te = _stratified_split(y, test_fraction, seed)
        return x[tr], y[tr], x[te], y[te], classes, "sklearn:load_digits", "random"
    path = Path(name.split(":", 1)[1]).expanduser()
    if name.startswith("npz:"):
        x_tr, y_tr, x_te, y_te, classes, kind = _load_npz(path, test_fraction, seed)
        return x_tr, y_tr, x_te, y_te, classes, f"npz:{path.resolve()}", kind
    return (*_load_folder(path), f"folder:{path.resolve()}", "given")


def _load_digits() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """scikit-learn's 1797 digits: 8 x 8 pixels with values 0..16, rescaled to 0..255."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    return torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64)), [
        str(c) for c in d.target_names]


def _load_torchvision(name: str, root: Path, download: bool):
    """Read a torchvision benchmark from ``root``; download it only when it is missing."""
    cls, split_kind = torchvision_class(name), TORCHVISION[name][1]

    def build(train: bool, dl: bool):
        kw = {"split": "train" if train else "test"} if split_kind == "split" else {"train": train}
        return cls(str(root), download=dl, **kw)

    parts = []
    for train in (True, False):
        try:
            ds = build(train, False)  # on disk: read, never download again
        except RuntimeError as exc:
            if not download:
                raise FileNotFoundError(
                    f"{name} is not in {root} and download is off ({exc})") from exc
            log.info("downloading %s into %s", name, root)
            try:
                ds = build(train, True)
            except Exception as exc2:  # network errors come in many types
                raise FileNotFoundError(
                    f"{name} is not in {root} and downloading it failed: {exc2}") from exc2
        data = ds.data
        x = torch.as_tensor(np.asarray(data))
        if x.ndim == 3:  # MNIST family: (N, H, W)
            x = x[:, None]
        elif split_kind == "train":  # CIFAR: (N, H, W, C)
            x = x.permute(0, 3, 1, 2)
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = ds.labels  # SVHN (torchvision already maps label 10 to 0)
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        parts.append((x.to(torch.uint8).contiguous(), y))
        classes = list(getattr(ds, "classes", None) or [str(i) for i in range(int(y.max()) + 1)])
    (x_tr, y_tr), (x_te, y_te) = parts
    return x_tr, y_tr, x_te, y_te, classes


def torchvision_class(name: str):
    """The ``torchvision.datasets`` class of a torchvision source (``cifar10`` -> CIFAR10)."""
    import torchvision.datasets as tvd

    name = canonical_name(name)
    if name not in TORCHVISION:
        raise ValueError(f"{name!r} is not a torchvision source (those are {list(TORCHVISION)})")
    return getattr(tvd, TORCHVISION[name][0])


def torchvision_files(name: str, root: str | os.PathLike) -> list[tuple[str, str]]:
    """(URL, path under ``root``) of every file torchvision downloads for source ``name``:
    what to fetch by hand for a machine without network."""
    cls, root = torchvision_class(name), str(root)
    if hasattr(cls, "tgz_md5"):  # CIFAR-10/100: one archive
        return [(cls.url, f"{root}/{cls.filename}")]
    if hasattr(cls, "split_list"):  # SVHN: one .mat per split
        return [(url, f"{root}/{file}") for split, (url, file, _md5) in cls.split_list.items()
                if split in ("train", "test")]
    raw = f"{root}/{cls.__name__}/raw"  # MNIST family: four .gz files
    return [(f"{cls.mirrors[0]}{file}", f"{raw}/{file}") for file, _md5 in cls.resources]


def download(name: str, root: str | os.PathLike) -> dict[str, int]:
    """Fetch torchvision source ``name`` into ``root`` (torchvision's layout and MD5 checks;
    files already there are verified and kept). Returns ``{"train": N, "test": M}`` images.
    A network error propagates as torchvision raises it."""
    cls = torchvision_class(name)
    kind = TORCHVISION[canonical_name(name)][1]
    sizes = {}
    for split in ("train", "test"):
        kw = {"split": split} if kind == "split" else {"train": split == "train"}
        sizes[split] = len(cls(str(root), download=True, **kw))
    return sizes


# ---- npz ------------------------------------------------------------------------------------

_NPZ_SPLIT = ("x_train", "y_train", "x_test", "y_test")


def _load_npz(path: Path, test_fraction: float, seed: int):
    """Read and check a user's ``.npz`` (see :func:`prepare`); every error names the key and
    the file."""
    arrays = _read_npz_arrays(path)
    keys = set(arrays)
    if set(_NPZ_SPLIT) <= keys:
        kind, img_keys, lab_keys = "given", ("x_train", "x_test"), ("y_train", "y_test")
    elif {"x", "y"} <= keys:
        kind, img_keys, lab_keys = "random", ("x",), ("y",)
    else:
        present = [k for k in _NPZ_SPLIT if k in keys]
        if present:
            missing = [k for k in _NPZ_SPLIT if k not in keys]
        else:
            missing = [k for k in ("x", "y") if k not in keys]
        raise ValueError(
            f"{path}: missing key {missing[0]!r} (an npz dataset needs x_train, y_train, "
            f"x_test, y_test, or x, y and a test fraction; found keys {sorted(keys)})")

    images = {k: _npz_images(arrays[k], k, path) for k in img_keys}
    scale = _npz_scale(images, path)
    images = {k: _to_uint8(v, scale) for k, v in images.items()}
    shapes = {k: tuple(v.shape[1:]) for k, v in images.items()}
    if len(set(shapes.values())) > 1:
        (k0, s0), (k1, s1) = list(shapes.items())
        raise ValueError(f"{path}: images of key {k1!r} have shape C x H x W = {s1}, but "
                         f"those of key {k0!r} have {s0}")
    labels = {}
    for xk, yk in zip(img_keys, lab_keys, strict=True):
        labels[yk] = _npz_labels(arrays[yk], yk, path)
        if labels[yk].shape[0] != images[xk].shape[0]:
            raise ValueError(f"{path}: key {yk!r} has {labels[yk].shape[0]} labels but key "
                             f"{xk!r} has {images[xk].shape[0]} images")

    if "classes" in arrays:
        classes = [str(c) for c in np.asarray(arrays["classes"]).reshape(-1).tolist()]
        k = len(classes)
    else:
        k = max(int(v.max()) for v in labels.values()) + 1
        classes = [str(i) for i in range(k)]
    for yk, y in labels.items():
        bad = np.nonzero((y < 0) | (y >= k))[0]
        if bad.size:
            i = int(bad[0])
            whence = " from key classes" if "classes" in arrays else ""
            raise ValueError(f"{path}: key {yk!r} has label {int(y[i])} at index {i}, outside "
                             f"0..{k - 1} ({k} classes{whence})")

    as_t = {kk: torch.from_numpy(np.ascontiguousarray(v)) for kk, v in {**images, **labels}.items()}
    if kind == "given":
        return (as_t["x_train"], as_t["y_train"], as_t["x_test"], as_t["y_test"], classes, kind)
    tr, te = _stratified_split(as_t["y"], test_fraction, seed)
    return as_t["x"][tr], as_t["y"][tr], as_t["x"][te], as_t["y"][te], classes, kind


def _read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a user's ``.npz``, or an error in our words naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    if not zipfile.is_zipfile(path):  # text, a bare .npy, a truncated download, ...
        raise ValueError(f"{path} is not an .npz file (a zip archive of .npy arrays, as "
                         "np.savez writes)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except ValueError as exc:  # numpy refuses an object array (it would need pickles)
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise ValueError(f"{path}: an array holds Python objects; convflat reads only "
                             "numeric arrays") from None
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc
    except Exception as exc:  # a damaged member: zip or format errors
        raise ValueError(f"{path}: cannot read as .npz ({exc})") from exc


def _npz_images(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    """N x C x H x W or N x H x W, numeric, finite, non-empty -> N x C x H x W."""
    if a.ndim == 3:
        a = a[:, None]
    elif a.ndim != 4:
        raise ValueError(f"{path}: key {key!r} has rank {a.ndim} (shape {a.shape}); images must "
                         "be N x C x H x W or N x H x W")
    if a.shape[0] == 0:
        raise ValueError(f"{path}: key {key!r} holds no images")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{path}: key {key!r} has dtype {a.dtype}; images must be uint8 or float")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        i = int(np.argwhere(~np.isfinite(a))[0][0])
        raise ValueError(
            f"{path}: key {key!r} contains NaN or infinite values (first in image {i})")
    return a


def _npz_scale(images: dict[str, np.ndarray], path: Path) -> float:
    """Factor to uint8: float images all in [0, 1] are scaled by 255, images in [0, 255] are
    rounded as they are; anything else is an error naming the key."""
    lo = min(float(v.min()) for v in images.values())
    hi = max(float(v.max()) for v in images.values())
    floating = any(np.issubdtype(v.dtype, np.floating) for v in images.values())
    if lo < 0 or hi > 255:
        key = next(k for k, v in images.items() if float(v.min()) < 0 or float(v.max()) > 255)
        raise ValueError(f"{path}: key {key!r} has pixel values in [{lo:g}, {hi:g}]; images must "
                         "lie in [0, 1] (float) or [0, 255]")
    return 255.0 if floating and hi <= 1.0 else 1.0


def _to_uint8(a: np.ndarray, scale: float) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    return np.rint(a.astype(np.float64) * scale).astype(np.uint8)


def _npz_labels(a: np.ndarray, key: str, path: Path) -> np.ndarray:
    """1-D integer (or integer-valued float) labels -> int64."""
    if a.ndim != 1:
        raise ValueError(f"{path}: key {key!r} has rank {a.ndim} (shape {a.shape}); labels must "
                         "be a 1-D array of class indices")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{path}: key {key!r} has dtype {a.dtype}; labels must be integers")
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            i = int(np.argwhere(~np.isfinite(a))[0][0])
            raise ValueError(f"{path}: key {key!r} contains NaN or infinite labels (index {i})")
        if not (a == np.round(a)).all():
            i = int(np.argwhere(a != np.round(a))[0][0])
            raise ValueError(f"{path}: key {key!r} has a non-integer label {a[i]!r} at index {i}")
    return a.astype(np.int64)


# ---- image folder ---------------------------------------------------------------------------


def _load_folder(root: Path):
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (ImageFolder layout) -> uint8
    tensors. Class indices follow the sorted class folders of ``train/``. Images must share
    one size; they are stored with one channel when every image is gray, else three (RGB)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    for sub in ("train", "test"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"image folder dataset {root} has no {sub}/ directory")
    classes, class_to_idx = find_classes(str(root / "train"))
    test_classes, _ = find_classes(str(root / "test"))
    extra = sorted(set(test_classes) - set(classes))
    if extra:
        raise ValueError(f"{root / 'test'}: class folder {extra[0]!r} does not exist in train/")
    splits = []
    for sub in ("train", "test"):
        items = make_dataset(str(root / sub), class_to_idx, extensions=IMG_EXTENSIONS,
                             allow_empty=True)
        if not items:
            raise ValueError(f"{root / sub} contains no images ({', '.join(IMG_EXTENSIONS)})")
        splits.append(items)
    arrays, size = [], None
    for items in splits:
        xs, ys = [], []
        for file, label in items:
            img = _read_rgb(Path(file))
            if size is None:
                size = img.shape
            elif img.shape != size:
                raise ValueError(
                    f"{file}: image is {img.shape[1]} x {img.shape[0]} pixels, but the first "
                    f"image is {size[1]} x {size[0]}; resize them to one size")
            xs.append(img)
            ys.append(label)
        arrays.append((np.stack(xs), np.asarray(ys, dtype=np.int64)))
    gray = all((x[..., 0] == x[..., 1]).all() and (x[..., 0] == x[..., 2]).all() for x, _ in arrays)
    out = []
    for x, y in arrays:
        x = x[..., :1] if gray else x
        out.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        out.append(torch.from_numpy(y))
    return (*out, list(classes))


def _read_rgb(file: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(file) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except OSError as exc:
        raise ValueError(f"{file}: cannot read as an image ({exc})") from exc
