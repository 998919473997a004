"""Arguments, validators and output checks shared by the subcommands.

Nothing here imports torch at module level: ``convflat --help`` and every subcommand's
``--help`` are answered without it (tests/test_cli_vocabulary.py checks this).

One vocabulary: ``--data`` names the dataset everywhere (a prepared ``.pt`` file or a source
name); ``--dataset`` is kept as an alias of it on every subcommand.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path

from convflat.cli import CLIError

DATA_HELP = ("a prepared .pt file, or a dataset name: sklearn-digits, mnist, fashion-mnist, "
             "kmnist, cifar10, cifar100, svhn, npz:PATH, folder:PATH")

#: ``convflat prepare --data``: only sources (a prepared file is what prepare writes).
SOURCE_HELP = ("a dataset name: sklearn-digits, mnist, fashion-mnist, kmnist, cifar10, "
               "cifar100, svhn, npz:PATH, folder:PATH (not a prepared .pt file: that is what "
               "prepare writes)")

_DEVICE = re.compile(r"^(auto|cpu|mps|meta|(cuda|xpu)(:\d+)?)$")


# --------------------------------------------------------------------------------------------
# argparse types: a bad value is one line and exit status 2 (see convflat.cli.Parser.error)
# --------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum``, else one line naming ``what``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a {what} integer, got {value}")
        return value

    parse.__name__ = f"{what} integer"  # argparse names the type by it in some messages
    return parse


#: An integer >= 1.
positive_int = _int_at_least(1, "positive")
#: An integer >= 0.
non_negative_int = _int_at_least(0, "non-negative")


def device(text: str) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` (also ``mps``, ``xpu[:N]``)."""
    if not _DEVICE.match(text.strip()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device; use auto, cpu, cuda or cuda:N")
    return text.strip()


# --------------------------------------------------------------------------------------------
# Model flags, from the spec dataclasses of convflat.model_spec (no torch)
# --------------------------------------------------------------------------------------------


def model_flags() -> dict[str, tuple[str, dict]]:
    """``{flag: (spec key, argparse kwargs)}`` for every key of a model spec of any family
    but those the data set (channels, classes, image size): ``--width``, ``--depth``,
    ``--batchnorm/--no-batchnorm``, ``--dropout``, ... Each flag's type follows the key's
    kind and its help names the families that have the key, with their help."""
    from convflat.model_spec import DATA_KEYS, FAMILIES, options

    keys: dict[str, list] = {}
    for family in FAMILIES:
        for opt in options(family):
            if opt.name not in DATA_KEYS:
                keys.setdefault(opt.name, []).append((family, opt))
    out: dict[str, tuple[str, dict]] = {}
    for key, owners in keys.items():
        opt = owners[0][1]
        by_help: dict[str, list[str]] = {}
        for family, o in owners:
            default = "" if o.default is None else f" (default {str(o.default).lower()})"
            by_help.setdefault(o.help + default, []).append(family)
        help_text = "; ".join(f"{', '.join(fams)}: {h}" for h, fams in by_help.items())
        kw: dict = {"help": help_text.replace("%", "%%")}
        if opt.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif opt.kind == "int":
            kw.update(type=non_negative_int if opt.minimum == 0 else positive_int, metavar="N")
        elif opt.kind == "float":
            kw.update(type=float, metavar="X")
        elif opt.choices:
            kw["choices"] = list(opt.choices)
        else:
            kw["metavar"] = "NAME"
        out["--" + key.replace("_", "-")] = (key, kw)
    return out


# --------------------------------------------------------------------------------------------
# Output paths, checked before any work
# --------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _probe_writable(directory: Path, flag: str, path: Path) -> None:
    """Create and remove a file in ``directory``: the one test that also holds for root, for
    read-only mounts and for ACLs."""
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".convflat-probe-")
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write in {directory} "
                       f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def check_output_file(path: str | os.PathLike | None, flag: str = "--out") -> Path | None:
    """Refuse, before the work, an output file that names a directory, lies under a file, or
    lies in a directory that cannot be written. Missing directories are fine (they are made)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise CLIError(f"{flag} {path} is a directory; give a file name")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise CLIError(f"{flag} {path}: {base} is a file, not a directory")
    _probe_writable(base, flag, path)
    return path


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """The same for a directory to write into (it may not exist yet)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {path} is a file; give a directory")
    base = path if path.is_dir() else _nearest_existing(path)
    if not base.is_dir():
        raise CLIError(f"{flag} {path}: {base} is a file, not a directory")
    _probe_writable(base, flag, path)
    return path


# --------------------------------------------------------------------------------------------
# Data arguments
# --------------------------------------------------------------------------------------------


def add_data_argument(p, *, required: bool = True, help: str = DATA_HELP) -> None:
    """``--data`` (alias ``--dataset``)."""
    p.add_argument("--data", "--dataset", dest="data", required=required, metavar="DATA",
                   help=f"{help} (--dataset is an alias)")


def add_source_arguments(p) -> None:
    """Where sources live: ``--root`` and ``--no-download``."""
    p.add_argument("--root", type=Path, default=Path("data"),
                   help="where torchvision datasets live and prepared files go (default: data)")
    p.add_argument("--no-download", action="store_true",
                   help="never touch the network (a missing torchvision dataset is an error)")


def add_measure_data_arguments(p, *, subset_seed_help: str) -> None:
    """The data arguments of ``convflat curvature`` and ``convflat measure`` (the same)."""
    add_data_argument(p, required=False)
    add_source_arguments(p)
    p.add_argument("--split", default="train", choices=("train", "train_clean", "test"),
                   help="data split to measure on (default: train, as the paper)")
    p.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="measure on a seeded random subset of N samples "
                        "(convflat.data.seeded_subset, as the workflow does)")
    p.add_argument("--subset-seed", type=non_negative_int, default=None, metavar="SEED",
                   help=subset_seed_help)


def load_measure_data(args: argparse.Namespace, subset_seed: int):
    """(prepared, x, y): the split of a prepared file, or of a source prepared (or reused)
    under --root, cut to the seeded subset of --max-samples."""
    from convflat import data as cfdata

    spec = str(args.data)
    if spec.endswith(".pt") and ":" not in spec:
        prepared = cfdata.load_prepared(spec)
    else:
        path = cfdata.prepare(spec, root=args.root, download=not args.no_download)
        prepared = cfdata.load_prepared(path)
    x, y = prepared.tensors(args.split)
    x, y = cfdata.seeded_subset(x, y, n=args.max_samples, seed=subset_seed)
    if x.shape[0] == 0:
        raise CLIError(f"dataset {spec!r} has no samples in split {args.split!r}")
    return prepared, x, y
