"""Seconds per measure for one trained small CNN, and the ratio of each to exact_curvature.

    python -m convflat.bench measures [--width 16] [--depth 3] [--steps 300] [--repeats 3]
                                      [--measures default|all|a,b] [--threads N] [--device cpu]
                                      [--invariance]

Trains a GAP CNN (the quick study's ``gapcnn`` family) on scikit-learn's digits (1797 8 x 8
images, no download) in-process, then times every measure stand-alone (a fresh context per
repeat, so shared work such as the exact curvature is paid by each measure that needs it) and
prints medians over repeats, the ratio to one forward pass over the data, and the ratio to
:func:`convflat.curvature.exact_curvature`. Finally it times the whole set in one
:func:`convflat.measures.compute_measures` call (shared work done once), the per-model cost of
the workflow's measure rule. Prints; never asserts on time.

``--invariance`` instead prints, as a markdown table, every measure before and after the
function-preserving rescaling of the last conv's filters
(:func:`convflat.measures.invariance_table`), for the same trained model (no BatchNorm).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    return x, torch.tensor(d.target, dtype=torch.long)


def _model(width: int, depth: int, batchnorm: bool) -> torch.nn.Module:
    from convflat.models import build_model

    return build_model({
        "family": "gapcnn", "in_channels": 1, "num_classes": 10, "image_size": [8, 8],
        "width": width, "depth": depth, "batchnorm": batchnorm,
    })


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> int:
    from convflat.measures import compute_measures, cost_table, resolve_names

    ap = argparse.ArgumentParser(prog="python -m convflat.bench measures", description=__doc__)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batchnorm", action="store_true")
    ap.add_argument("--steps", type=int, default=300, help="Adam steps of batch 128")
    ap.add_argument("--repeats", type=int, default=3, help="stand-alone runs per measure")
    ap.add_argument("--total-repeats", type=int, default=1,
                    help="runs of the whole set in one compute_measures call")
    ap.add_argument("--measures", default="default")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--invariance", action="store_true",
                    help="print the filter-rescaling invariance table (markdown) instead")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x, y = _digits()
    model = _model(args.width, args.depth, args.batchnorm)
    init = copy.deepcopy(model)
    t = time.perf_counter()
    last = _train(model, x, y, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"gapcnn width={args.width} depth={args.depth} batchnorm={args.batchnorm}: "
          f"{n_params} parameters, trained {args.steps} steps in {time.perf_counter() - t:.1f} s "
          f"(last batch loss {last:.3f}); {x.shape[0]} samples; device {args.device}; "
          f"torch threads {torch.get_num_threads()}")
    names = resolve_names(args.measures)
    if args.invariance:
        return _invariance(model, init, x, y, names, args)
    # warm-up: the first Hessian-vector product of a process pays a one-off torch.func cost
    compute_measures(model, (x[:64], y[:64]), init_model=init, device=args.device,
                     names=["hutchinson_conv_trace"], params={"hutchinson_conv_trace": {
                         "probes": 2, "groups": 1}})
    table = cost_table(model, (x, y), names, repeats=args.repeats, init_model=init,
                       device=args.device, seed=args.seed)
    print()
    print(f"median over {args.repeats} stand-alone runs")
    print(f"{'measure':32s} {'seconds':>9s} {'x forward':>10s} {'x exact':>9s}  status")
    for r in table.itertuples():
        print(f"{r.measure:32s} {r.seconds:9.3f} {r.ratio_forward:10.1f} {r.ratio_exact:9.2f}  "
              f"{r.status}")
    totals = []
    for _ in range(args.total_repeats):
        t = time.perf_counter()
        compute_measures(model, (x, y), init_model=init, names=names, device=args.device,
                         seed=args.seed)
        totals.append(time.perf_counter() - t)
    print()
    print(f"whole set ({len(names)} measures, shared work done once): median "
          f"{statistics.median(totals):.2f} s per model over {args.total_repeats} run(s)")
    return 0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4g}"


def _invariance(model, init, x, y, names, args) -> int:
    from convflat.measures import invariance_table

    if args.batchnorm:
        print("the rescaling is function-preserving only without BatchNorm after the last conv")
        return 2
    t = time.perf_counter()
    table = invariance_table(model, (x, y), init_model=init, names=names, seed=args.seed,
                             device=args.device)
    print(f"invariance table in {time.perf_counter() - t:.1f} s; alphas log-uniform in "
          f"[1/3, 3], seed {args.seed}")
    print()
    print("| measure | before | after | relative change | changed | theory | agrees |")
    print("|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.measure} | {_fmt(r.before)} | {_fmt(r.after)} | "
              f"{_fmt(r.relative_change)} | {_fmt(r.changed)} | {r.theory} | "
              f"{_fmt(r.agrees)} |")
    return 0
