"""Seconds per measure for one trained small CNN, and the ratio of each to exact_curvature.

    python -m convflat.bench measures [--width 16] [--depth 3] [--steps 300] [--repeats 3]
                                      [--measures default|all|a,b] [--threads N] [--device cpu]
                                      [--invariance] [--spread --nets 8x3:0.001 --seeds 5]

Trains a GAP CNN (the quick study's ``gapcnn`` family) on scikit-learn's digits (1797 8 x 8
images, no download) in-process, then times every measure stand-alone (a fresh context per
repeat, so shared work such as the exact curvature is paid by each measure that needs it) and
prints medians over repeats, the ratio to one forward pass over the data, and the ratio to
:func:`convflat.curvature.exact_curvature`. Finally it times the whole set in one
:func:`convflat.measures.compute_measures` call (shared work done once), the per-model cost of
the workflow's measure rule. Prints; never asserts on time.

``--invariance`` instead prints, as a markdown table, every measure before and after the
function-preserving rescaling (:func:`convflat.measures.invariance_table`: the last conv's
filters without BatchNorm, conv filters with their running statistics with it).

``--spread`` instead measures the stochastic measures' noise on quick-study nets
(:func:`spread`): it trains BatchNorm gapcnns like the quick study's (SGD, momentum 0.9,
lr 0.1 cosine, batch 128, 20 epochs on the 1437 training digits; ``--nets`` width x depth and
weight decay), then on 256 training images runs every stochastic measure at its defaults with
``--seeds`` seeds, and once as a long run (many more draws, probes or ascent steps; exact
where that exists), and prints a markdown table per net: the mean over seeds, the relative
standard deviation and the relative range (max - min)/mean across seeds, the long-run value,
the default mean's relative distance from it, and the median seconds of one default run.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from convflat.bench.timing import timed


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


def _parser() -> argparse.ArgumentParser:
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
                    help="print the rescaling invariance table (markdown) instead")
    ap.add_argument("--spread", action="store_true",
                    help="print the stochastic measures' spread across seeds and distance "
                    "from a long run, on quick-study nets, instead")
    ap.add_argument("--nets", default="8x3:0.001,16x3:0.01",
                    help="--spread: comma-separated WIDTHxDEPTH:WEIGHT_DECAY (BatchNorm nets)")
    ap.add_argument("--seeds", type=int, default=5, help="--spread: seeds per measure")
    ap.add_argument("--n-samples", type=int, default=256,
                    help="--spread: training images measured (the quick study's 256)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Command line of ``python -m convflat.bench measures`` (module docstring)."""
    from convflat.measures import compute_measures, cost_table, resolve_names

    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.spread:
        return spread_main(args)
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
    total, _ = timed(lambda: compute_measures(model, (x, y), init_model=init, names=names,
                                              device=args.device, seed=args.seed),
                     torch.device(args.device), args.total_repeats)
    print()
    print(f"whole set ({len(names)} measures, shared work done once): median "
          f"{total:.2f} s per model over {args.total_repeats} run(s)")
    return 0


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.4g}"


def _invariance(model, init, x, y, names, args) -> int:
    from convflat.measures import invariance_table

    t = time.perf_counter()
    table = invariance_table(model, (x, y), init_model=init, names=names, seed=args.seed,
                             device=args.device)
    how = ("every conv with its BatchNorm's running statistics, the last BatchNorm against the "
           "classifier" if args.batchnorm else "the last conv's filters against the classifier")
    print(f"invariance table in {time.perf_counter() - t:.1f} s; rescaling {how}, factors "
          f"log-uniform in [1/3, 3], seed {args.seed}")
    print()
    print("| measure | before | after | relative change | changed | theory | agrees |")
    print("|---|---|---|---|---|---|---|")
    for r in table.itertuples():
        print(f"| {r.measure} | {_fmt(r.before)} | {_fmt(r.after)} | "
              f"{_fmt(r.relative_change)} | {_fmt(r.changed)} | {r.theory} | "
              f"{_fmt(r.agrees)} |")
    return 0


# ------------------------------------------------------------------ --spread


def _train_quick(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
                 weight_decay: float, seed: int) -> float:
    """The quick study's recipe: SGD (momentum 0.9, L2 weight decay), lr 0.1 with a cosine
    schedule, batch 128, ``epochs`` passes over (x, y) in a seeded order; train accuracy."""
    steps_per_epoch = -(-x.shape[0] // 128)
    total = epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


#: The long PAC-Bayes search each spread row is compared with.
_PACBAYES_LONG = {"mc_samples": 512, "tol": 0.001, "depth": 20}


def _pacbayes_row(**params) -> dict:
    """A spread row of pacbayes_flatness with ``params``; its long run uses the same
    BatchNorm convention."""
    extra = {"folded_bn": params["folded_bn"]} if "folded_bn" in params else {}
    return {"measure": "pacbayes_flatness", "params": params,
            "long": [{**_PACBAYES_LONG, **extra}], "key": "sigma"}


#: per stochastic measure: its default-parameter overrides for the table (none: the
#: registered defaults), and the long run(s) it is compared with; the long-run value is the
#: largest over the listed runs for the ascents (each is a lower bound on the maximum), the
#: value of the single run otherwise. "exact" means the entry's own exact reference.
_SPREAD: dict[str, dict] = {
    "pacbayes_flatness": {"long": [_PACBAYES_LONG], "key": "sigma"},
    **{f"pacbayes_flatness@{label}": _pacbayes_row(**params) for label, params in (
        ("64", {"mc_samples": 64}),
        ("128", {"mc_samples": 128}),
        ("keep+128", {"folded_bn": "keep", "mc_samples": 128}),
        ("256", {"mc_samples": 256}),
        ("keep", {"folded_bn": "keep"}),
        ("tol.0025", {"mc_samples": 128, "tol": 0.0025}),
        ("256+tol.0025", {"mc_samples": 256, "tol": 0.0025}),
        ("keep+tol.0025", {"folded_bn": "keep", "mc_samples": 128, "tol": 0.0025}),
        ("keep+256", {"folded_bn": "keep", "mc_samples": 256}),
        ("keep+256+tol.0025", {"folded_bn": "keep", "mc_samples": 256, "tol": 0.0025}),
        ("jiang", {"mc_samples": 5, "tol": 0.01, "depth": 10}),
    )},
    "sharpness_worst": {"long": [{"tol": 0.0, "max_steps": 300, "step_fraction": f}
                                 for f in (0.5, 0.2, 0.1, 0.05)], "take": "max"},
    "sharpness_adaptive": {"long": [{"tol": 0.0, "max_steps": 300, "step_fraction": f}
                                    for f in (0.5, 0.2, 0.1, 0.05)], "take": "max"},
    # the old fixed 5 steps, for comparison with the converged default
    "sharpness_worst@5": {"measure": "sharpness_worst", "params": {"max_steps": 5, "tol": 0.0},
                          "long": [{"tol": 0.0, "max_steps": 300, "step_fraction": f}
                                   for f in (0.5, 0.2, 0.1, 0.05)], "take": "max"},
    "sharpness_adaptive@5": {"measure": "sharpness_adaptive",
                             "params": {"max_steps": 5, "tol": 0.0},
                             "long": [{"tol": 0.0, "max_steps": 300, "step_fraction": f}
                                      for f in (0.5, 0.2, 0.1, 0.05)], "take": "max"},
    "sharpness_avg": {"long": [{"samples": 400}]},
    "hutchinson_trace": {"long": [{"probes": 240, "groups": 8}]},
    "hutchinson_conv_trace": {"long": "exact"},
    "hessian_top_eigenvalue": {"long": [{"method": "eigsh", "tol": 1e-8}]},
    "conv_top_eigenvalue": {"long": [{"method": "gram", "dense_max": 4096}]},
}


def spread(model, init, data, *, seeds: int, names: list[str] | None = None,
           device: str = "cpu") -> list[dict]:
    """Rows ``{measure, params, key, mean, rel_std, rel_range, long, rel_distance, seconds,
    steps}`` for the stochastic measures of :data:`_SPREAD` (``names``: a subset)."""
    from convflat.measures import MEASURES

    rows = []
    for label, spec in _SPREAD.items():
        if names is not None and label not in names:
            continue
        name = spec.get("measure", label)
        key = spec.get("key", "value")
        params = spec.get("params", {})
        vals, secs, steps = [], [], []
        entry = None
        for s in range(seeds):
            entry = MEASURES[name](model, data, init_model=init, device=device, seed=s,
                                   **params)
            if entry["status"] != "ok":
                raise RuntimeError(f"{name} (seed {s}): {entry['error']}")
            vals.append(float(entry[key]))
            secs.append(entry["seconds"])
            if "steps" in entry:
                steps.append(entry["steps"])
        if spec["long"] == "exact":
            long = float(entry["exact"])
        else:
            longs = []
            for lp in spec["long"]:
                e = MEASURES[name](model, data, init_model=init, device=device, seed=0, **lp)
                if e["status"] != "ok":
                    raise RuntimeError(f"{name} long run {lp}: {e['error']}")
                longs.append(float(e[key]))
            long = max(longs) if spec.get("take") == "max" else longs[0]
        mean = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append({
            "measure": label, "params": params or "defaults", "key": key, "mean": mean,
            "rel_std": sd / abs(mean) if mean else float("nan"),
            "rel_range": (max(vals) - min(vals)) / abs(mean) if mean else float("nan"),
            "long": long, "rel_distance": (mean - long) / abs(long) if long else float("nan"),
            "seconds": statistics.median(secs),
            "steps": f"{min(steps)}-{max(steps)}" if steps else "",
        })
    return rows


def spread_main(args) -> int:
    """``--spread``: train the ``--nets`` and print a :func:`spread` table for each."""
    import platform

    from sklearn.datasets import load_digits

    d = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(d.target), generator=g)
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)[perm] / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)[perm]
    x_train, y_train = x[:1437], y[:1437]
    sub = torch.randperm(1437, generator=g)[:args.n_samples]
    data = (x_train[sub], y_train[sub])
    names = None if args.measures == "default" else args.measures.split(",")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {torch.get_num_threads()}; seeds 0..{args.seeds - 1}; "
          f"{args.n_samples} training images measured")
    for net in args.nets.split(","):
        arch, wd = net.split(":")
        width, depth = (int(v) for v in arch.split("x"))
        torch.manual_seed(args.seed)
        model = _model(width, depth, batchnorm=True)
        init = copy.deepcopy(model)
        t = time.perf_counter()
        acc = _train_quick(model, x_train, y_train, epochs=20, weight_decay=float(wd),
                           seed=args.seed)
        print(f"\n### gapcnn width {width}, depth {depth}, BatchNorm, weight decay {wd}: "
              f"train accuracy {acc:.3f} ({time.perf_counter() - t:.0f} s to train)\n")
        t = time.perf_counter()
        rows = spread(model, init, data, seeds=args.seeds, names=names, device=args.device)
        print("| measure | params | of | mean | rel. std | rel. range | long run | "
              "mean vs long | s/run | steps |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['measure']} | {r['params']} | {r['key']} | {r['mean']:.5g} | "
                  f"{r['rel_std']:.2%} | {r['rel_range']:.2%} | {r['long']:.5g} | "
                  f"{r['rel_distance']:+.2%} | {r['seconds']:.2f} | {r['steps']} |")
        print(f"\n({time.perf_counter() - t:.0f} s)")
    return 0
