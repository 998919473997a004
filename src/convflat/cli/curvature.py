"""``convflat curvature``: measure one checkpoint's exact conv curvature and write JSON.

Examples::

    convflat curvature --checkpoint results/runs/quick/.../model.pt --data sklearn-digits
    convflat curvature --checkpoint resnet18.pth --arch resnet18 --num-classes 10 \\
        --data cifar10 --root data --max-samples 5000 --out resnet18_curvature.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from convflat.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curvature",
        help="exact Hessian trace and relative flatness of the conv that feeds GAP",
        description=(
            "Load a convflat checkpoint (or a torchvision state_dict with --arch), measure the "
            "exact trace, block traces and relative flatness of the conv that feeds global "
            "average pooling, and of the classifier, on a dataset; write JSON."
        ),
    )
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="convflat model.pt, or a torchvision state_dict file with --arch")
    p.add_argument("--arch", help="torchvision architecture of a plain state_dict "
                   "(resnet18, resnet50, mobilenet_v2, ...)")
    p.add_argument("--num-classes", type=int, help="classes of the --arch model "
                   "(default: those of the dataset)")
    p.add_argument("--data", required=True,
                   help="a prepared .pt file, or a dataset name: sklearn-digits, mnist, "
                   "fashion-mnist, kmnist, cifar10, cifar100, svhn, npz:PATH, folder:PATH")
    p.add_argument("--root", default="data", type=Path, help="dataset root (default: data)")
    p.add_argument("--no-download", action="store_true", help="never touch the network")
    p.add_argument("--split", default="train", choices=["train", "test", "train_clean"],
                   help="which split to measure on (default: train, as the paper)")
    p.add_argument("--max-samples", type=int, help="measure on the first N samples only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--layer", help="conv module to measure (default: found automatically)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the per-sample products (sums are float64)")
    p.add_argument("--route", default="auto", choices=["auto", "gram", "direct"])
    p.add_argument("--blocks", action="store_true", help="include the C x C block traces")
    p.add_argument("--out", type=Path, help="JSON file to write (default: print to stdout)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=run)


def _load_data(args):
    from convflat import data as cfdata

    spec = str(args.data)
    if spec.endswith(".pt"):
        prepared = cfdata.load_prepared(spec)
    else:
        path = cfdata.prepare(spec, root=args.root, download=not args.no_download)
        prepared = cfdata.load_prepared(path)
    x, y = prepared.tensors(args.split)
    if args.max_samples is not None:
        if args.max_samples <= 0:
            raise CLIError(f"--max-samples must be positive, got {args.max_samples}")
        x, y = x[: args.max_samples], y[: args.max_samples]
    if x.shape[0] == 0:
        raise CLIError(f"dataset {spec!r} has no samples in split {args.split!r}")
    return prepared, x, y


def _load_model(args, num_classes: int, in_channels: int):
    from convflat import models

    if args.arch is None:
        model, ckpt = models.load_checkpoint(args.checkpoint)
        return model, ckpt["spec"]
    if not args.checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} does not exist")
    spec = {"family": "torchvision", "arch": args.arch,
            "num_classes": args.num_classes or num_classes, "in_channels": in_channels}
    model = models.build_model(spec)
    try:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CLIError(f"{args.checkpoint}: torch.load failed: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CLIError(f"{args.checkpoint} holds a {type(state).__name__}, not a state_dict")
    models.load_state(model, state, f"{args.checkpoint} does not fit {args.arch}")
    return model.eval(), spec


def run(args) -> int:
    from convflat.curvature import exact_curvature
    from convflat.io import atomic_write_json, provenance, resolve_device

    start = time.perf_counter()
    prepared, x, y = _load_data(args)
    model, spec = _load_model(args, prepared.num_classes, prepared.in_channels)
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None and first.in_channels != x.shape[1]:
        raise CLIError(
            f"the model's first conv expects {first.in_channels} input channels but "
            f"{args.data} has {x.shape[1]}"
        )
    device = resolve_device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    res = exact_curvature(
        model, (x, y), layer=args.layer, device=device, dtype=dtype,
        batch_size=args.batch_size, route=args.route, progress=args.progress,
    )
    out = {
        "measures": res.to_dict(include_blocks=args.blocks),
        "checkpoint": str(args.checkpoint),
        "spec": spec,
        "data": {**prepared.describe(), "split": args.split, "n_measured": int(x.shape[0])},
        **provenance(device=device, seconds=time.perf_counter() - start),
    }
    if args.out:
        atomic_write_json(args.out, out)
        print(f"trace={res.trace:.6g} relative_flatness={res.relative_flatness:.6g} "
              f"({res.n_samples} samples, {res.seconds:.2f}s) -> {args.out}")
    else:
        from convflat.io import dumps_json

        print(dumps_json(out))
    return 0
