"""``convflat train``: train one model and write model.pt, init.pt and train.json.

Examples::

    convflat train --dataset sklearn-digits --family gapcnn --width 16 --depth 3 \\
        --epochs 40 --stop-loss 0.01 --batch-size 64 --lr 0.05 --out results/runs/quick/run0
    convflat train --dataset cifar10 --family resnet --depth 20 --preact \\
        --epochs 200 --weight-decay 5e-4 --out results/runs/cifar/resnet20
    convflat train --dataset cifar10 --family torchvision --arch resnet18 --out runs/r18

A run killed and started again with the same command resumes from its last epoch.
Exit status 0 also for a diverged run (``status: "diverged"`` in train.json); 2 for bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from convflat.cli.prepare import add_data_arguments, load_data

# Help text (with units) of every TrainConfig field; each field becomes a --flag.
CONFIG_HELP = {
    "epochs": "epochs to run; with --stop-loss, the cap (default 30)",
    "stop_loss": "stop after the first epoch whose train cross-entropy (eval mode, full "
                 "split, nats) is below this, e.g. 0.01 (default: run all epochs)",
    "batch_size": "images per step (default 128)",
    "optimizer": "sgd (momentum) or adam (default sgd)",
    "lr": "peak learning rate (default 0.1)",
    "momentum": "SGD momentum / Adam beta1 (default 0.9)",
    "nesterov": "Nesterov momentum (SGD)",
    "weight_decay": "L2 coefficient (default 5e-4)",
    "schedule": "learning-rate schedule: constant, step or cosine (default cosine)",
    "warmup_epochs": "linear warm-up length in epochs (default 0)",
    "step_milestones": "step schedule: fractions of --epochs at which lr decays "
                       "(default 0.5 0.75)",
    "step_gamma": "step schedule: decay factor (default 0.1)",
    "crop_padding": "random crop after zero-padding by this many pixels; 0 turns it off "
                    "(default: the dataset's, 4 for CIFAR, 0 for digits)",
    "flip": "random horizontal flips (default: the dataset's, on for CIFAR-10/100)",
    "seed": "seed of the initial weights, data order, augmentation and dropout (default 0)",
    "amp": "on CUDA, bf16 autocast for the training steps (default on)",
    "channels_last": "train in the channels-last memory format (default on)",
    "eval_batch_size": "images per forward pass when measuring losses (default 1000)",
    "device": "auto, cpu, cuda, cuda:1, ... (default auto)",
}

CHOICES = {"optimizer": ["sgd", "adam"], "schedule": ["constant", "step", "cosine"]}

MODEL_FLAGS = {  # flag -> (spec key, argparse kwargs)
    "--width": ("width", {"type": int, "help": "channels of the first stage"}),
    "--depth": ("depth", {"type": int, "help": "gapcnn: conv layers; resnet: 6n+2, 10, 18, 34"}),
    "--batchnorm": ("batchnorm", {"action": argparse.BooleanOptionalAction,
                                  "help": "gapcnn: BatchNorm after each conv (default on)"}),
    "--dropout": ("dropout", {"type": float, "help": "gapcnn: dropout probability"}),
    "--activation": ("activation", {"choices": ["relu", "gelu", "silu"]}),
    "--preact": ("preact", {"action": argparse.BooleanOptionalAction,
                            "help": "resnet: pre-activation blocks"}),
    "--arch": ("arch", {"help": "torchvision architecture (resnet18, resnet50, mobilenet_v2, ...)"}),
}


def _config_argument(p: argparse.ArgumentParser, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    kind = str(field.type)
    kw: dict = {"dest": f"cfg_{field.name}", "default": None, "help": CONFIG_HELP[field.name]}
    if kind == "str" and field.name not in CHOICES:
        kw["metavar"] = field.name.upper()
    if kind.startswith("bool"):
        kw["action"] = argparse.BooleanOptionalAction
    elif kind.startswith("tuple"):
        kw.update(type=float, nargs="*", metavar="FRACTION")
    elif kind.startswith("int"):
        kw.update(type=int, metavar="N")
    elif kind.startswith("float"):
        kw.update(type=float, metavar="X")
    elif field.name in CHOICES:
        kw["choices"] = CHOICES[field.name]
    p.add_argument(flag, **kw)


def register(sub: argparse._SubParsersAction) -> None:
    from convflat.train import TrainConfig

    p = sub.add_parser(
        "train",
        help="train one CNN (gapcnn, resnet, torchvision) and write model.pt + train.json",
        description="Train one model on a prepared dataset with the whole dataset on the "
        "device; write init.pt, model.pt, train.json (and checkpoint.pt while running) in "
        "--out. A killed run resumes from its last epoch when started again.",
    )
    data = p.add_argument_group("data")
    add_data_arguments(data, seed_flag="--data-seed")
    model = p.add_argument_group("model")
    model.add_argument("--family", choices=["gapcnn", "resnet", "torchvision"],
                       help="model family (or give it in --spec)")
    for flag, (key, kw) in MODEL_FLAGS.items():
        if "type" in kw:
            kw = {**kw, "metavar": "N" if kw["type"] is int else "X"}
        elif "action" not in kw and "choices" not in kw:
            kw = {**kw, "metavar": "NAME"}
        model.add_argument(flag, dest=f"spec_{key}", **kw)
    model.add_argument("--spec", help="model spec as JSON text or a .json file; flags override it")
    hp = p.add_argument_group("training (TrainConfig)")
    for field in dataclasses.fields(TrainConfig):
        _config_argument(hp, field)
    run = p.add_argument_group("run")
    run.add_argument("--out", required=True, type=Path, help="run directory to write")
    run.add_argument("--no-resume", action="store_true",
                     help="ignore an existing checkpoint.pt and start again")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: only on a terminal)")
    run.add_argument("--log-level", default=None,
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
    from convflat.train import TrainConfig

    given = {}
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, f"cfg_{field.name}")
        if value is not None:
            given[field.name] = value
    return TrainConfig.from_dict(given)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from convflat.train import train

    level = args.log_level or ("WARNING" if sys.stderr.isatty() else "INFO")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = build_spec(args)
    cfg = build_config(args)
    prepared = load_data(args)
    record = train(spec, prepared, cfg, args.out, progress=args.progress,
                   resume=not args.no_resume)

    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    print(f"{record['status']}: {record['epochs_run']} epochs ({record['stop_reason']}), "
          f"train loss {fmt(record['train_loss'])} acc {fmt(record['train_acc'])}, "
          f"test loss {fmt(record['test_loss'])} acc {fmt(record['test_acc'])} "
          f"-> {Path(args.out) / 'train.json'}")
    return 0
