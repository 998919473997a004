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


def add_source_arguments(p, root_help: str = "where torchvision datasets live and prepared "
                         "files go (default: data)") -> None:
    """Where sources live: ``--root`` and ``--no-download``."""
    p.add_argument("--root", type=Path, default=Path("data"), help=root_help)
    p.add_argument("--no-download", action="store_true",
                   help="never touch the network (a missing torchvision dataset is an error)")


def add_measure_data_arguments(p, *, subset_seed_help: str) -> None:
    """The data arguments of ``convflat curvature`` and ``convflat measure`` (the same)."""
    add_data_argument(p, required=False, help=DATA_HELP + "; default for a convflat "
                      "checkpoint: the data it was trained on")
    add_source_arguments(p, root_help="where torchvision datasets live and prepared files "
                         "are looked for, never written (default: data)")
    p.add_argument("--split", default="train", choices=("train", "train_clean", "test"),
                   help="data split to measure on (default: train, as the paper)")
    p.add_argument("--max-samples", type=positive_int, metavar="N",
                   help="measure on a seeded random subset of N samples "
                        "(convflat.data.seeded_subset, as the workflow does)")
    p.add_argument("--subset-seed", type=non_negative_int, default=None, metavar="SEED",
                   help=subset_seed_help)
    p.add_argument("--data-mismatch", choices=("refuse", "ok"), default="refuse",
                   help="what to do when --data is not the data the checkpoint was trained "
                        "on: refuse (default, exit 2) or ok (measure anyway; the input "
                        "channels must still match the model)")
    p.add_argument("--prepared-out", type=Path, metavar="PATH",
                   help="write the data prepared from a dataset name to PATH (default: "
                        "prepare in memory; nothing is written under --root)")


def notice(args: argparse.Namespace, text: str) -> None:
    """One line on stderr: ``convflat <command>: notice: <text>``."""
    import sys

    print(f"convflat {getattr(args, 'command', '')}: notice: {' '.join(text.split())}",
          file=sys.stderr)


def _prepare_named(args: argparse.Namespace, name: str, *, subset=None, label_noise=0.0,
                   seed=0, test_fraction=0.2, download: bool | None = None):
    """A source prepared for measuring: into ``--prepared-out`` when given, else in memory
    (an existing prepared file of the same request under ``--root`` is read, not written)."""
    from convflat import data as cfdata

    kw = {"subset": subset, "label_noise": label_noise, "seed": seed,
          "test_fraction": test_fraction,
          "download": (not args.no_download) if download is None else download}
    if args.prepared_out is not None:
        check_output_file(args.prepared_out, "--prepared-out")
        return cfdata.load_prepared(cfdata.prepare(name, root=args.root,
                                                   out=args.prepared_out, **kw))
    return cfdata.prepare_transient(name, root=args.root, **kw)


def _run_data(args: argparse.Namespace, identity: dict):
    """The prepared data a checkpoint's identity names: the prepared file the run trained on
    when it still holds the same training split, else the same request prepared again (no
    download) when that gives the same training split; CLIError saying why when neither."""
    from convflat import data as cfdata

    what = f"the data {args.checkpoint} was trained on ({cfdata.describe_identity(identity)})"
    reasons = []
    path = identity.get("path")
    if path and Path(path).is_file():
        try:
            prepared = cfdata.load_prepared(path)
        except ValueError as exc:
            reasons.append(str(exc))
        else:
            if cfdata.train_hash(prepared) == identity["train_hash"]:
                notice(args, f"measuring on the run's own data: the prepared file it "
                             f"trained on, {path}")
                return prepared
            reasons.append(f"{path} no longer holds it")
    elif path:
        reasons.append(f"its prepared file {path} is gone")
    request = identity.get("request")
    if isinstance(request, dict) and request.get("name"):
        try:
            prepared = _prepare_named(
                args, request["name"], subset=request.get("subset"),
                label_noise=request.get("label_noise", 0.0), seed=request.get("seed", 0),
                test_fraction=request.get("test_fraction", 0.2), download=False)
        except (ValueError, FileNotFoundError, OSError) as exc:
            reasons.append(f"preparing {request['name']} again failed ({exc})")
        else:
            if cfdata.train_hash(prepared) == identity["train_hash"]:
                notice(args, f"measuring on the run's own data: {request['name']} prepared "
                             "again from the checkpoint's data identity (same training "
                             "split hash)")
                return prepared
            reasons.append(f"{request['name']} prepared again gives other training images")
    else:
        reasons.append("the identity records no request to prepare it again")
    raise CLIError(f"cannot find {what}: {'; '.join(reasons)}; give it with --data")


def _check_against_model(args: argparse.Namespace, prepared, spec: dict | None) -> None:
    """A checkpoint without a data identity: its spec's input channels and classes against
    the data (channels always, classes unless --data-mismatch ok). The spec's image size is
    not checked: it may be a default that the model, pooling globally, never used."""
    if not spec:
        return
    c, k = prepared.in_channels, prepared.num_classes
    if spec.get("in_channels") not in (None, c):
        raise CLIError(f"{args.checkpoint} expects {spec['in_channels']} input channels but "
                       f"--data {args.data} has {c}")
    if args.data_mismatch == "ok":
        return
    if spec.get("num_classes") not in (None, k):
        raise CLIError(f"{args.checkpoint} was built for {spec['num_classes']} classes but "
                       f"--data {args.data} has {k}; pass --data-mismatch ok to measure anyway")


def load_measure_data(args: argparse.Namespace, subset_seed: int, *,
                      checkpoint: dict | None = None):
    """(prepared, x, y): the split of the data to measure on, cut to the seeded subset of
    --max-samples.

    ``checkpoint``: the dict of a convflat checkpoint (None for a plain state_dict). Without
    --data the data are those its identity names (:func:`_run_data`); with --data, a
    prepared file or a source prepared in memory (or into --prepared-out), checked against
    the identity before any measuring: other data are refused (CLIError, exit 2, one line
    naming both) unless --data-mismatch ok. A checkpoint without an identity gets a one-line
    notice that the data cannot be checked, and a check of its spec's shape and classes.
    """
    from convflat import data as cfdata
    from convflat.models import checkpoint_data

    identity = None if checkpoint is None else checkpoint_data(checkpoint, args.checkpoint)
    spec = str(args.data) if args.data else None
    if spec is None:
        if checkpoint is None:
            raise CLIError("--data is required with --arch")
        if identity is None:
            raise CLIError(f"--data is required: {args.checkpoint} records no data identity "
                           "(written before checkpoints did)")
        prepared = _run_data(args, identity)
    else:
        if spec.endswith(".pt") and ":" not in spec:
            prepared = cfdata.load_prepared(spec)
        else:
            prepared = _prepare_named(args, spec)
        if checkpoint is not None and identity is None:
            notice(args, f"{args.checkpoint} records no data identity (written before "
                         f"checkpoints did): cannot check that {spec} is the data it was "
                         "trained on")
            _check_against_model(args, prepared, checkpoint.get("spec"))
        elif identity is not None:
            found = cfdata.data_identity(prepared)
            diff = cfdata.identity_mismatch(identity, found)
            if diff is not None and (args.data_mismatch != "ok" or identity["image_shape"][0]
                                     != found["image_shape"][0]):
                hint = ("" if args.data_mismatch == "ok" else "; leave out --data to measure "
                        "on the run's own data, or pass --data-mismatch ok")
                raise CLIError(
                    f"{args.checkpoint} was trained on {cfdata.describe_identity(identity)}, "
                    f"but --data {spec} is {cfdata.describe_identity(found)} ({diff}){hint}")
            if diff is not None:
                notice(args, f"measuring on other data than the run's ({diff}; "
                             "--data-mismatch ok)")
    x, y = prepared.tensors(args.split)
    x, y = cfdata.seeded_subset(x, y, n=args.max_samples, seed=subset_seed)
    if x.shape[0] == 0:
        raise CLIError(f"dataset {spec or prepared.name!r} has no samples in split "
                       f"{args.split!r}")
    return prepared, x, y
