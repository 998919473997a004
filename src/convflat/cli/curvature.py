"""``convflat curvature``: measure one checkpoint's exact conv curvature and write JSON.

Examples::

    convflat curvature --checkpoint results/runs/quick/.../model.pt
    convflat curvature --checkpoint results/runs/quick/.../model.pt --data other.pt \\
        --data-mismatch ok
    convflat curvature --checkpoint resnet18.pth --arch resnet18 --num-classes 10 \\
        --data cifar10 --root data --max-samples 5000 --out resnet18_curvature.json

A convflat checkpoint records the data it was trained on (:func:`convflat.data.data_identity`):
without ``--data`` it is measured on those data (the prepared file it trained on, or the same
request prepared again in memory; a notice says which); other ``--data`` is refused (exit 2)
unless ``--data-mismatch ok``. A dataset name is prepared in memory (nothing is written under
``--root``) unless ``--prepared-out`` names a file.

``--max-samples N`` measures on the seeded random subset the workflow's jobs use
(:func:`convflat.data.seeded_subset`, seed ``--subset-seed``, default 0), not the first N.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from convflat.cli import CLIError
from convflat.cli._args import (
    add_measure_data_arguments,
    check_output_file,
    device,
    load_measure_data,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convflat curvature``."""
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
    p.add_argument("--num-classes", type=positive_int, help="classes of the --arch model "
                   "(default: those of the dataset)")
    add_measure_data_arguments(p, subset_seed_help="seed of the --max-samples subset "
                               "(default 0, the workflow's default measure seed)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N",
                   help="samples per batch (default: 256)")
    p.add_argument("--layer", help="conv module to measure (default: found automatically)")
    p.add_argument("--device", type=device, default="auto",
                   help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="precision of the per-sample products (sums are float64)")
    p.add_argument("--route", default="auto", choices=["auto", "gram", "direct"])
    p.add_argument("--blocks", action="store_true", help="include the C x C block traces")
    p.add_argument("--out", type=Path, help="JSON file to write (default: print to stdout)")
    p.add_argument("--progress", action="store_true",
                   help="show a progress bar (batches done of the total)")
    p.set_defaults(func=run)


def _load_model(args, num_classes: int, in_channels: int):
    from convflat import models

    if args.arch is None:
        model, ckpt = models.load_checkpoint(args.checkpoint)
        return model, ckpt["spec"]
    spec = {"family": "torchvision", "arch": args.arch,
            "num_classes": args.num_classes or num_classes, "in_channels": in_channels}
    state = models.load_torch_file(args.checkpoint)
    model = models.build_model(spec)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CLIError(f"{args.checkpoint} holds a {type(state).__name__}, not a state_dict")
    _check_classes(args, model, state, spec["num_classes"])
    models.load_state(model, state, f"{args.checkpoint} does not fit {args.arch}")
    return model.eval(), spec


def _check_classes(args, model, state: dict, num_classes: int) -> None:
    """A state_dict that fits the model except for the number of outputs of its classifier
    (the model's last nn.Linear): name the key and suggest ``--num-classes``. Anything else
    that does not fit is left to :func:`convflat.models.load_state`."""
    import torch

    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    expected = model.state_dict()
    if not linears or set(state) != set(expected):
        return
    key = f"{linears[-1]}.weight"
    bad = {k for k, v in expected.items()
           if not isinstance(state[k], torch.Tensor) or tuple(state[k].shape) != tuple(v.shape)}
    if key not in bad or not bad <= {key, f"{linears[-1]}.bias"} or state[key].ndim != 2:
        return
    n = int(state[key].shape[0])
    given = ("--num-classes" if args.num_classes is not None
             else f"the classes of {args.data}")
    raise CLIError(
        f"{args.checkpoint} does not fit {args.arch}: its classifier {key} has {n} "
        f"outputs, the model was built with {num_classes} ({given}); pass --num-classes "
        f"{n} if the checkpoint is right")


def _batches(x, y, batch_size: int, progress: bool, desc: str):
    """The (x, y) batches, behind a progress bar that knows their total."""
    from tqdm.auto import tqdm

    batches = [(x[i:i + batch_size], y[i:i + batch_size])
               for i in range(0, int(x.shape[0]), batch_size)]
    return tqdm(batches, total=len(batches), desc=desc, unit="batch", disable=not progress,
                leave=False)


def run(args) -> int:
    """Measure and write (or print) the JSON record."""
    import torch

    from convflat.curvature import exact_curvature, find_head
    from convflat.data import train_hash
    from convflat.io import atomic_write_json, check_free_space, provenance, resolve_device

    check_output_file(args.out)
    start = time.perf_counter()
    subset_seed = 0 if args.subset_seed is None else args.subset_seed
    if args.arch is None:  # a convflat checkpoint: its data identity decides the data
        from convflat import models

        model, ckpt = models.load_checkpoint(args.checkpoint)
        spec = ckpt["spec"]
        prepared, x, y = load_measure_data(args, subset_seed, checkpoint=ckpt)
    else:
        if not args.data:
            raise CLIError("--data is required with --arch")
        prepared, x, y = load_measure_data(args, subset_seed)
        model, spec = _load_model(args, prepared.num_classes, prepared.in_channels)
    first = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    if first is not None and first.in_channels != x.shape[1]:
        raise CLIError(
            f"the model's first conv expects {first.in_channels} input channels but "
            f"{args.data} has {x.shape[1]}"
        )
    dev = resolve_device(args.device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    head = find_head(model, layer=args.layer)  # refuses an out-of-class model before the work
    if args.out:  # a lower bound of the JSON's size (C x C numbers with --blocks), before the work
        C = head.conv.out_channels
        check_free_space(args.out, 1024 + (8 * C * C if args.blocks else 0), "the JSON record")
    bar = _batches(x, y, args.batch_size, args.progress,
                   desc=f"exact curvature [{head.conv_name}]")
    try:
        res = exact_curvature(model, bar, layer=args.layer, device=dev, dtype=dtype,
                              route=args.route)
    finally:
        bar.close()
    out = {
        "measures": res.to_dict(include_blocks=args.blocks),
        "checkpoint": str(args.checkpoint),
        "spec": spec,
        "data": {**prepared.describe(), "train_hash": train_hash(prepared),
                 "split": args.split, "n_measured": int(x.shape[0]),
                 "max_samples": args.max_samples,
                 "subset_seed": subset_seed if args.max_samples is not None else None},
        **provenance(device=dev, seconds=time.perf_counter() - start),
    }
    if args.out:
        atomic_write_json(args.out, out)
        print(f"trace={res.trace:.6g} relative_flatness={res.relative_flatness:.6g} "
              f"({res.n_samples} samples, {res.seconds:.2f}s) -> {args.out}")
    else:
        from convflat.io import dumps_json

        print(dumps_json(out))
    return 0
