"""``convflat prepare``: turn a dataset into one canonical tensor file.

Examples::

    convflat prepare --data sklearn-digits                 # -> data/prepared/sklearn-digits.pt
    convflat prepare --data cifar10 --root data --subset 5000 --label-noise 0.2 --seed 1
    convflat prepare --data npz:my_images.npz --test-fraction 0.25 --out data/prepared/mine.pt
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from convflat.cli._args import (
    DATA_HELP,
    SOURCE_HELP,
    add_data_argument,
    add_source_arguments,
    check_output_file,
    non_negative_int,
    positive_int,
)


def add_data_arguments(p: argparse.ArgumentParser, *, seed_flag: str = "--seed",
                       data_help: str = DATA_HELP) -> None:
    """The dataset options shared by ``prepare`` and ``train``: ``--data`` (alias
    ``--dataset``, described by ``data_help``), ``--root``, ``--no-download``, ``--subset``,
    ``--label-noise``, the seed and ``--test-fraction``."""
    add_data_argument(p, help=data_help)
    add_source_arguments(p)
    p.add_argument("--subset", type=positive_int, metavar="N",
                   help="keep this many training images (drawn uniformly)")
    p.add_argument("--label-noise", type=float, default=0.0, metavar="FRACTION",
                   help="fraction of training labels replaced by a different class (default 0)")
    p.add_argument(seed_flag, dest="data_seed", type=non_negative_int, default=0,
                   metavar="SEED",
                   help="seed of the split (digits, npz x/y), the subset and the label noise "
                        "(default 0)")
    p.add_argument("--test-fraction", type=float, default=0.2, metavar="FRACTION",
                   help="test share of each class when a source has no split (default 0.2)")


def load_data(args: argparse.Namespace, out: Path | None = None):
    """A prepared ``.pt`` file as is, or a dataset name prepared (or reused) under --root."""
    from convflat import data

    name = str(args.data)
    if name.endswith(".pt") and ":" not in name:
        if args.subset is not None or args.label_noise:
            raise ValueError("--subset and --label-noise apply when preparing a dataset, not to "
                             f"the prepared file {name}")
        return data.load_prepared(name)
    path = data.prepare(name, root=args.root, out=out, subset=args.subset,
                        label_noise=args.label_noise, seed=args.data_seed,
                        download=not args.no_download, test_fraction=args.test_fraction,
                        overwrite=getattr(args, "overwrite", False))
    return data.load_prepared(path)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convflat prepare``."""
    p = sub.add_parser(
        "prepare",
        help="turn a dataset into one canonical tensor file (uint8 images, labels, split)",
        description="Load a torchvision benchmark, scikit-learn's digits, an .npz file or an "
        "image folder, apply the subset and label noise, and write one .pt file with uint8 "
        "images, labels, class names and per-channel mean and std.",
    )
    add_data_arguments(p, data_help=SOURCE_HELP)
    p.add_argument("--out", type=Path,
                   help="file to write (default: ROOT/prepared/<dataset>[_options].pt)")
    p.add_argument("--overwrite", action="store_true",
                   help="rebuild even if the file exists from the same request")
    p.set_defaults(func=run)


def _check_space(args: argparse.Namespace, out: Path) -> None:
    """Refuse before loading a built-in source when the filesystem of ``out`` cannot hold its
    training images (uint8: a lower bound of the prepared file's size). A file that exists and
    will be reused is not rewritten, so it is not checked; user sources are not sized."""
    from convflat.io import check_free_space
    from convflat.sources import find_source

    source = find_source(str(args.data))
    if source is None or (out.exists() and not getattr(args, "overwrite", False)):
        return
    n = min(args.subset or source.n_images, source.n_images)
    h, w = source.image_size
    check_free_space(out, n * source.channels * h * w,
                     f"{n} images of {source.name} ({source.channels} x {h} x {w} bytes each)")


def run(args: argparse.Namespace) -> int:
    """Prepare (or reuse) the file and print what it holds."""
    from convflat import data

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if str(args.data).endswith(".pt") and ":" not in str(args.data):
        raise ValueError("--data names a source to prepare, not a prepared .pt file")
    out = args.out or data.default_path(
        args.data, root=args.root, subset=args.subset, label_noise=args.label_noise,
        seed=args.data_seed, test_fraction=args.test_fraction)
    check_output_file(out)
    _check_space(args, Path(out))
    prepared = load_data(args, out=out)
    info = prepared.describe()
    print(f"{prepared.path}: {info['n_train']} train / {info['n_test']} test images of shape "
          f"{tuple(info['image_shape'])}, {info['num_classes']} classes, "
          f"label noise {info['label_noise']:g}")
    return 0
