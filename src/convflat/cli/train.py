"""``convflat train``: train one model and write model.pt, init.pt and train.json.

Examples::

    convflat train --data sklearn-digits --family gapcnn --width 16 --depth 3 \\
        --epochs 40 --stop-loss 0.01 --batch-size 64 --lr 0.05 --out results/runs/quick/run0
    convflat train --data cifar10 --family resnet --depth 20 --preact \\
        --epochs 200 --weight-decay 5e-4 --out results/runs/cifar/resnet20
    convflat train --data cifar10 --family torchvision --arch resnet18 --out runs/r18

A run killed and started again with the same command resumes from its last epoch. A run
directory that already holds this run, finished, is skipped (and says so); one that holds a
run with other settings is refused unless ``--overwrite``, which first removes convflat's
files from it (model.pt, init.pt, checkpoint.pt, train.json, measures.json, ...).

Before the first epoch the model's head is checked (:func:`convflat.models.check_head`): a
model that ``convflat curvature`` would refuse is refused here too, naming the op, unless
``--no-check-head``.

The training flags are made from :class:`convflat.train.TrainConfig`'s fields (name, type,
default, ``metadata["help"]``) of :mod:`convflat.train_config`, a module without torch, so
that ``convflat train --help`` stays fast.

Exit status 0 also for a diverged run (``status: "diverged"`` in train.json); 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from convflat.cli import CLIError
from convflat.cli._args import (
    check_output_dir,
    device,
    model_flags,
    non_negative_int,
    positive_int,
)
from convflat.cli.prepare import add_data_arguments, load_data
from convflat.records import (
    CHECKPOINT_FILE,
    INIT_FILE,
    MEASURES_FILE,
    MODEL_FILE,
    RECORD_FILE,
    RecordError,
    read_train_record,
)

#: flag -> (spec key, argparse kwargs): one flag per key of the spec dataclasses of
#: :mod:`convflat.model_spec` (the data's keys aside)
MODEL_FLAGS = model_flags()

#: TrainConfig integer fields that may be 0 (every other integer field must be positive).
_NON_NEGATIVE = {"seed", "crop_padding", "track_flatness", "divergence_patience"}

#: Files a run directory may hold that belong to the run; --overwrite removes exactly these.
RUN_FILES = (MODEL_FILE, INIT_FILE, CHECKPOINT_FILE, RECORD_FILE, "checkpoint.stale.pt",
             MEASURES_FILE)


@dataclasses.dataclass(frozen=True)
class ConfigField:
    """One TrainConfig field as the command line needs it."""

    name: str
    annotation: str    # as written: "int", "float | None", "tuple[float, ...]"
    default: Any
    help: str
    choices: tuple | None = None


def config_fields() -> list[ConfigField]:
    """TrainConfig's fields, from :mod:`convflat.train_config` (which imports no torch, so
    ``--help`` stays fast)."""
    from convflat.train_config import TrainConfig

    out = []
    for f in dataclasses.fields(TrainConfig):
        meta = dict(f.metadata)
        out.append(ConfigField(f.name, str(f.type), f.default, meta.get("help", ""),
                               tuple(meta["choices"]) if meta.get("choices") else None))
    return out


def _config_argument(p, field: ConfigField) -> None:
    flag = "--" + field.name.replace("_", "-")
    kind = field.annotation.replace(" ", "")
    default_text = field.default
    if isinstance(field.default, tuple):
        default_text = " ".join(f"{v:g}" for v in field.default)
    help_text = field.help + ("" if field.default is None else f" (default: {default_text})")
    kw: dict[str, Any] = {"dest": f"cfg_{field.name}", "default": field.default,
                          "help": help_text.replace("%", "%%")}
    if kind.startswith("bool"):
        kw["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("tuple"):
        kw.update(type=float, nargs="*", metavar="FRACTION")
    elif kind.startswith("int"):
        kw.update(type=non_negative_int if field.name in _NON_NEGATIVE else positive_int,
                  metavar="N")
    elif kind.startswith("float"):
        kw.update(type=float, metavar="X")
    elif field.name == "device":
        kw.update(type=device, metavar="DEVICE")
    elif field.choices:
        kw["choices"] = list(field.choices)
    else:
        kw["metavar"] = field.name.upper()
    p.add_argument(flag, **kw)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convflat train``."""
    p = sub.add_parser(
        "train",
        help="train one CNN (gapcnn, resnet, torchvision) and write model.pt + train.json",
        description="Train one model on a prepared dataset with the whole dataset on the "
        "device; write init.pt, model.pt, train.json (and checkpoint.pt while running) in "
        "--out. A killed run resumes from its last epoch when started again; a finished run "
        "with the same settings is skipped.",
    )
    data = p.add_argument_group("data")
    add_data_arguments(data, seed_flag="--data-seed")
    model = p.add_argument_group("model")
    model.add_argument("--family", choices=["gapcnn", "resnet", "torchvision"],
                       help="model family (or give it in --spec)")
    for flag, (key, kw) in MODEL_FLAGS.items():
        model.add_argument(flag, dest=f"spec_{key}", **kw)
    model.add_argument("--spec", help="model spec as JSON text or a .json file; flags override it")
    model.add_argument("--no-check-head", action="store_true",
                       help="train even a model whose head `convflat curvature` refuses "
                            "(default: refuse it before the first epoch, naming the op)")
    hp = p.add_argument_group("training (convflat.train.TrainConfig)")
    for field in config_fields():
        _config_argument(hp, field)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, type=Path, help="run directory to write")
    run.add_argument("--no-resume", action="store_true",
                     help="ignore an existing checkpoint.pt and start again")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the run in --out, finished or not, whatever its settings: "
                          "its files are removed first (default: a finished run with the same "
                          "settings is skipped, one with other settings refused)")
    run.add_argument("--threads", type=positive_int, metavar="N",
                     help="torch CPU threads (default: torch's)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only on a terminal)")
    run.add_argument("--log-level", default=None, type=str.upper,
                     choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                     help="logging level (default INFO off a terminal, WARNING on one)")
    p.set_defaults(func=run_train)


def build_spec(args: argparse.Namespace) -> dict:
    """--spec (JSON text or file), then --family and the model flags on top."""
    spec: dict = {}
    if args.spec:
        text = Path(args.spec).read_text() if args.spec.endswith(".json") else args.spec
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--spec is not valid JSON: {exc}") from exc
        if not isinstance(spec, dict):
            raise ValueError("--spec must be a JSON object")
    if args.family:
        spec["family"] = args.family
    if "family" not in spec:
        raise ValueError("give --family (gapcnn, resnet, torchvision) or a spec with 'family'")
    for key, _ in MODEL_FLAGS.values():
        value = getattr(args, f"spec_{key}")
        if value is not None:
            spec[key] = value
    return spec


def build_config(args: argparse.Namespace):
    """The TrainConfig of the flags (each flag's default is the field's default)."""
    from convflat.train_config import TrainConfig

    given = {f.name: getattr(args, f"cfg_{f.name}") for f in dataclasses.fields(TrainConfig)}
    return TrainConfig.from_dict(given)


def _first_difference(old: Any, new: Any) -> str | None:
    from convflat.io import first_difference

    diff = first_difference(old, new)
    return None if diff is None else f"{diff[0]} is {diff[1]!r} there, {diff[2]!r} now"


def _existing_run(out: Path, identity: dict, run_hash: str) -> tuple[str, str]:
    """What ``out`` holds: ("none" | "finished" | "resume" | "other", why)."""
    import torch

    present = [n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return "none", ""
    record_path = out / RECORD_FILE
    if record_path.is_file():
        try:
            record = read_train_record(record_path)
        except (OSError, RecordError) as exc:
            return "other", f"{record_path} is unreadable ({exc})"
        old = {"spec": record.get("spec"), "config": dict(record.get("config") or {})}
        new = {"spec": identity["spec"], "config": dict(identity["config"])}
        for key in ("device", "eval_batch_size"):
            old["config"].pop(key, None)
        same = record.get("run_hash") == run_hash if "run_hash" in record else old == new
        if not same:
            diff = _first_difference(old, new) or "the dataset differs"
            return "other", diff
        if record["status"] in ("ok", "diverged") and (out / MODEL_FILE).is_file():
            return "finished", str(record.get("status"))
        return "resume", str(record.get("status"))
    ckpt = out / CHECKPOINT_FILE
    if ckpt.is_file():
        try:
            old_identity = torch.load(ckpt, map_location="cpu",
                                      weights_only=True)["train_state"]["identity"]
        except Exception:  # any unreadable checkpoint is "another run"
            return "other", f"{ckpt} is not a resumable checkpoint"
        diff = _first_difference(old_identity, identity)
        return ("other", diff) if diff else ("resume", "unfinished")
    init = out / INIT_FILE
    if init.is_file():
        try:
            old_spec = torch.load(init, map_location="cpu", weights_only=True).get("spec")
        except Exception:  # unreadable: another run
            return "other", f"{init} is unreadable"
        diff = _first_difference({"spec": old_spec}, {"spec": identity["spec"]})
        return ("other", diff) if diff else ("resume", "not started")
    return "other", f"it holds {', '.join(present)} but no {RECORD_FILE}"


def _clear(out: Path) -> list[str]:
    removed = []
    for name in RUN_FILES:
        if (out / name).is_file():
            (out / name).unlink()
            removed.append(name)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    return removed


def run_train(args: argparse.Namespace) -> int:
    """Check, then train (or skip, or refuse); print one summary line."""
    out = check_output_dir(args.out)
    import torch

    from convflat.models import check_head
    from convflat.train import run_hash_of, run_identity, spec_for, train

    level = args.log_level or ("WARNING" if sys.stderr.isatty() else "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = build_spec(args)
    cfg = build_config(args)
    prepared = load_data(args)
    full_spec = spec_for(spec, prepared)
    if not args.no_check_head:
        from convflat.curvature import OutOfClassError

        try:
            check_head(full_spec)
        except OutOfClassError as exc:
            raise CLIError(f"{exc}; `convflat curvature` would refuse this model "
                           "(--no-check-head trains it anyway)") from exc
    identity = run_identity(full_spec, cfg.resolve(prepared), prepared)
    run_hash = run_hash_of(identity)
    state, why = _existing_run(out, identity, run_hash)
    if state != "none" and args.overwrite:
        removed = _clear(out)
        print(f"--overwrite: removed {', '.join(removed) or 'nothing'} from {out}")
    elif state == "finished":
        print(f"skipped: {out} already holds this run, finished with status {why} "
              f"({out / RECORD_FILE}); --overwrite trains it again")
        return 0
    elif state == "other":
        raise CLIError(f"{out} holds another run ({why}); give another --out, or --overwrite "
                       "to replace it")
    record = train(spec, prepared, cfg, out, progress=args.progress,
                   resume=not args.no_resume)

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{record['status']}: {record['epochs_run']} epochs ({record['stop_reason']}), "
          f"train loss {fmt(record['train_loss'])} acc {fmt(record['train_acc'])}, "
          f"test loss {fmt(record['test_loss'])} acc {fmt(record['test_acc'])} "
          f"-> {out / RECORD_FILE}")
    return 0
