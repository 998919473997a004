"""``convflat measure``: compute flatness and generalization measures of one checkpoint.

    convflat measure --checkpoint RUN/model.pt [--init RUN/init.pt] --data PREPARED.pt \\
        [--measures a,b | default | all] [--params JSON] [--out RUN/measures.json]

Writes measures.json (see :func:`convflat.measures.write_measures_json`) next to the
checkpoint unless ``--out`` says otherwise. ``--list`` prints every measure with its default
parameters. Measures are taken on the training split of the prepared data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from convflat.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "measure",
        help="compute flatness / generalization measures of a checkpoint -> measures.json",
        description="Compute flatness and generalization measures of one checkpoint on the "
                    "training split of a prepared dataset and write measures.json.",
    )
    p.add_argument("--checkpoint", help="model.pt written by training")
    p.add_argument("--init", help="init.pt (the model at initialisation); needed by "
                   "distance_from_init and pacbayes_bound, which are skipped without it")
    p.add_argument("--data", help="prepared dataset (.pt from `convflat prepare`)")
    p.add_argument("--split", default="train", choices=("train", "train_clean", "test"),
                   help="data split to measure on (default: train)")
    p.add_argument("--measures", default="default",
                   help="comma-separated names, 'default' or 'all' (default: default)")
    p.add_argument("--params", default=None,
                   help='JSON object {measure: {param: value}} or a path to a JSON file, e.g. '
                        '\'{"hutchinson_trace": {"probes": 32}}\'')
    p.add_argument("--out", default=None,
                   help="output JSON (default: CHECKPOINT_DIR/measures.json)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size (default: 256)")
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--list", action="store_true", help="list the measures and exit")
    p.set_defaults(func=run)


def _load_params(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    path = Path(text)
    try:
        raw = path.read_text() if not text.lstrip().startswith("{") and path.is_file() else text
        params = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CLIError(f"--params is neither a JSON object nor a JSON file: {exc}") from exc
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise CLIError("--params must be a JSON object {measure: {param: value}}")
    return params


def _list() -> int:
    from convflat.measures import DEFAULT_MEASURES, MEASURES

    for name, m in MEASURES.items():
        mark = "*" if name in DEFAULT_MEASURES else " "
        print(f"{mark} {name:30s} {json.dumps(m.defaults)}")
        if m.source:
            print(f"  {'':30s} {m.source}")
    print("(* = computed by default)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list:
        return _list()
    for key in ("checkpoint", "data"):
        if not getattr(args, key):
            raise CLIError(f"--{key} is required")
    # floor 4: the CLI may import the model and data layers; import lazily so that
    # `convflat --help` stays fast
    from convflat.data import load_prepared
    from convflat.io import resolve_device
    from convflat.measures import compute_measures, resolve_names, write_measures_json
    from convflat.models import load_checkpoint

    names = resolve_names(args.measures)
    params = _load_params(args.params)
    device = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint)
    init = None
    if args.init:
        init, _ = load_checkpoint(args.init)
    prepared = load_prepared(args.data)
    x, y = prepared.tensors(args.split)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("measures.json")
    start = time.perf_counter()
    results = compute_measures(model, (x, y), init_model=init, names=names, params=params,
                               device=device, seed=args.seed, progress=args.progress,
                               batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    write_measures_json(
        out, results, device=device, seed=args.seed, seconds=seconds,
        checkpoint=str(args.checkpoint), init=args.init, data=str(args.data), split=args.split,
        n_samples=int(x.shape[0]), spec=ckpt.get("spec"),
    )
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    print(f"wrote {out}: {len(results) - len(failed)} of {len(results)} measures in "
          f"{seconds:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0
