"""``convflat measure``: compute flatness and generalization measures of one checkpoint.

    convflat measure --checkpoint RUN/model.pt [--init RUN/init.pt] [--data PREPARED.pt] \\
        [--measures a,b | default | all] [--params JSON] [--out RUN/measures.json]

Writes measures.json (see :func:`convflat.measures.write_measures_json`) next to the
checkpoint unless ``--out`` says otherwise. ``--list`` prints every measure with its default
parameters. The data arguments are those of ``convflat curvature`` (a prepared file or a
dataset name, ``--split``, ``--max-samples`` with ``--subset-seed``, ``--data-mismatch``,
``--prepared-out``): without ``--data`` the checkpoint is measured on the data it was trained
on, and other data are refused unless ``--data-mismatch ok``.

Exit status: 0 when every measure ran (or was skipped for want of ``--init``); 1 when a
measure failed (measures.json is written all the same, with each failure's error), unless
``--allow-failed``; 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from convflat.cli import CLIError
from convflat.cli._args import (
    add_measure_data_arguments,
    check_output_file,
    device,
    non_negative_int,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``convflat measure``."""
    p = sub.add_parser(
        "measure",
        help="compute flatness / generalization measures of a checkpoint -> measures.json",
        description="Compute flatness and generalization measures of one checkpoint on the "
                    "training split of a prepared dataset and write measures.json.",
    )
    p.add_argument("--checkpoint", help="model.pt written by training")
    p.add_argument("--init", help="init.pt (the model at initialisation); needed by "
                   "distance_from_init and pacbayes_bound, which are skipped without it")
    add_measure_data_arguments(p, subset_seed_help="seed of the --max-samples subset "
                               "(default: --seed, as the workflow's measure job)")
    p.add_argument("--measures", default="default",
                   help="comma-separated names, 'default' or 'all' (default: default)")
    p.add_argument("--params", default=None,
                   help='JSON object {measure: {param: value}} or a path to a JSON file, e.g. '
                        '\'{"hutchinson_trace": {"probes": 32}}\'')
    p.add_argument("--out", default=None,
                   help="output JSON (default: CHECKPOINT_DIR/measures.json)")
    p.add_argument("--device", type=device, default="auto",
                   help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of every random draw (default: 0)")
    p.add_argument("--batch-size", type=positive_int, default=256, metavar="N",
                   help="batch size (default: 256)")
    p.add_argument("--allow-failed", action="store_true",
                   help="exit 0 even when a measure failed (default: exit 1; the failures "
                        "are in measures.json either way)")
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
    """Compute the measures and write measures.json; the exit status is in the module doc."""
    if args.list:
        return _list()
    if not args.checkpoint:
        raise CLIError("--checkpoint is required")
    out = Path(args.out) if args.out else Path(args.checkpoint).with_name("measures.json")
    check_output_file(out)
    # the model and data layers import torch: only now, so that `convflat --help` stays fast
    from convflat.cli._args import load_measure_data
    from convflat.io import check_free_space, resolve_device
    from convflat.measures import compute_measures, resolve_names, write_measures_json
    from convflat.models import load_checkpoint

    names = resolve_names(args.measures)
    params = _load_params(args.params)
    dev = resolve_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint)
    init = None
    if args.init:
        init, _ = load_checkpoint(args.init)
    subset_seed = args.seed if args.subset_seed is None else args.subset_seed
    prepared, x, y = load_measure_data(args, subset_seed, checkpoint=ckpt)
    # a lower bound of measures.json's size (a few hundred bytes per entry), before the work
    check_free_space(out, 512 * len(names) + 1024, "measures.json")
    start = time.perf_counter()
    results = compute_measures(model, (x, y), init_model=init, names=names, params=params,
                               device=dev, seed=args.seed, progress=args.progress,
                               batch_size=args.batch_size)
    seconds = time.perf_counter() - start
    write_measures_json(
        out, results, device=dev, seed=args.seed, seconds=seconds,
        checkpoint=str(args.checkpoint), init=args.init,
        data=str(args.data or prepared.path or prepared.name), split=args.split,
        n_samples=int(x.shape[0]), spec=ckpt.get("spec"),
    )
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    print(f"wrote {out}: {len(results) - len(failed)} of {len(results)} measures in "
          f"{seconds:.1f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    if not failed:
        return 0
    for name in failed:
        print(f"convflat measure: measure {name} failed: {results[name].get('error')}",
              file=sys.stderr)
    if args.allow_failed:
        return 0
    print("convflat measure: exit status 1 because a measure failed (--allow-failed: 0)",
          file=sys.stderr)
    return 1
