"""``python -m convflat.bench curvature``: the exact closed form against its alternatives.

For each model, on the same data and device, in one process:

(a) one plain forward pass over the data (eval mode, no autograd) - the floor;
(b) ``exact_curvature`` (float64 products; also float32 products, summed in float64);
(c) Hutchinson's estimate of the same layer's trace through curvlinops'
    ``HessianLinearOperator`` (Rademacher probes, one Hessian-vector product over the data
    each): the probes it needs for a 1% standard error, from the sample variance of the
    probes run (capped by --max-probes / --max-hutchinson-seconds), and the probe at which
    its running mean first came within 1% of the exact value;
(d) the exact oracle: BackPACK's ``DiagGGNExact`` summed over the kernel (equal to the trace
    for ReLU heads), one extended backward over the data.

(a), (b) and (b) in float32 (and, with ``--patch-gram``, (b) with the patch Gram from
gathered patches) run in turn within each repeat; times are medians over ``--repeats`` and
(b)/(a) is the median of the per-repeat ratios, which a shared machine's load disturbs far
less than the ratio of separately taken medians. Peak memory is the CUDA peak on GPU and the
growth of the process's max RSS on CPU. On CPU the header says how glibc's malloc was set
(``MALLOC_MMAP_THRESHOLD_``), which moves the plain forward pass most, and the notes give the
median minor page faults of one pass of (a) and of (b). Ratios are printed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import resource
import statistics
import sys
import time

import torch
from torch import nn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved(fns, device, repeats, faults=None):
    """Times of each function, run in turn within every repeat (a, b, c, a, b, c, ...), so
    that the load of a shared machine hits all of them alike; per-repeat ratios to the first
    function are what the table reports (their median). If ``faults`` is a dict, it receives
    each function's minor page faults per call (the process's ``ru_minflt``)."""
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            _sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
            if faults is not None:
                faults.setdefault(k, []).append(
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times


def _ratio(times, key, base):
    return statistics.median(a / b for a, b in zip(times[key], times[base], strict=True))


def _timed(fn, device, repeats):
    times, out = [], None
    for _ in range(repeats):
        gc.collect()
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


class _Peak:
    """Peak memory of a block: CUDA allocator peak, or growth of max RSS on CPU (MiB)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024
        return False


def _models(names, in_ch, classes):
    from convflat.models import build_model

    specs = {
        "resnet18-cifar": {"family": "resnet", "depth": 18, "in_channels": in_ch,
                           "num_classes": classes},
        "resnet20-cifar": {"family": "resnet", "depth": 20, "in_channels": in_ch,
                           "num_classes": classes},
        "gapcnn-w32-d4": {"family": "gapcnn", "width": 32, "depth": 4, "in_channels": in_ch,
                          "num_classes": classes},
        "gapcnn-w16-d3": {"family": "gapcnn", "width": 16, "depth": 3, "in_channels": in_ch,
                          "num_classes": classes},
    }
    for name in names:
        if name not in specs:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(specs)}")
        torch.manual_seed(0)
        yield name, build_model(specs[name])


def _hutchinson_to_1pct(model, layer_param, batches, exact, device, max_probes, max_seconds):
    """Hutchinson (curvlinops) on one kernel: probes drawn until ``max_probes`` or
    ``max_seconds``; reports the first probe count at which the running mean came within 1%
    (luck plays a part there) and the count for a 1% standard error, ``m = (sd / 0.01 T)^2``,
    which is what the estimator costs on average to be that good. Time = count x time/probe."""
    from curvlinops import HessianLinearOperator
    from curvlinops.trace.hutchinson import hutchinson_trace

    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), [layer_param], batches,
                              check_deterministic=False)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    ests: list[float] = []
    first_hit = None
    t0 = time.perf_counter()
    while len(ests) < max_probes and time.perf_counter() - t0 < max_seconds:
        ests.append(float(hutchinson_trace(H, 1)))
        mean = sum(ests) / len(ests)
        if first_hit is None and len(ests) >= 2 and abs(mean - exact) <= 0.01 * abs(exact):
            first_hit = len(ests)
    per_probe = (time.perf_counter() - t0) / len(ests)
    torch.random.set_rng_state(gen_state)
    sd = statistics.stdev(ests) if len(ests) > 1 else float("nan")
    needed = max(1, math.ceil((sd / (0.01 * abs(exact))) ** 2)) if math.isfinite(sd) else None
    return {"probes": needed, "seconds": per_probe * (needed or len(ests)),
            "first_hit": first_hit, "probes_run": len(ests), "per_probe": per_probe}


def _exact_runs(model, batches, device, patch_gram):
    """The timed runs of the closed form: (b) ``exact``, (b) with float32 products
    ``exact32`` and, if ``patch_gram``, (b) with the patch Gram formed from gathered patches,
    ``U U^T`` (what ``exact_curvature`` did before the stride-phase Gram), ``patches``."""
    from convflat.curvature import CurvatureOptions, exact_curvature

    runs = {
        "exact": lambda: exact_curvature(model, batches, device=device),
        "exact32": lambda: exact_curvature(model, batches, device=device, dtype=torch.float32),
    }
    if patch_gram:
        gathered = CurvatureOptions(gram_from="patches")
        runs["patches"] = lambda: exact_curvature(model, batches, device=device,
                                                  options=gathered)
    return runs


def _backpack_oracle(model, head, batches, max_bytes):
    """BackPACK's exact GGN diagonal of one kernel, summed: the trace for ReLU heads.

    BackPACK's conv diagonal forms the per-sample, per-class products ``J^T S`` as one array
    of K x b x C x d entries (12 GB for a CIFAR ResNet-18 at batch 128, 10 classes), so each
    batch runs in sub-batches of at most ``max_bytes`` of that array: the sum is the same, and
    a batch that would not fit in memory no longer kills the process without output.
    Returns ``(trace, sub_batch)``.
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    ext = extend(copy.deepcopy(model).eval(), use_converter=True)
    layer = head.conv_name
    key = layer.replace(".", "_")
    target = None
    for name, p in ext.named_parameters():  # the oracle for this one kernel, nothing more
        mine = name.replace(".", "_") == f"{key}_weight"
        p.requires_grad_(mine)
        target = p if mine else target
    if target is None:
        raise SystemExit(f"BackPACK's converted model has no weight for layer {layer!r}")
    lossf = extend(nn.CrossEntropyLoss())  # BackPACK needs the loss module's own output
    n = sum(int(y.shape[0]) for _, y in batches)
    # K x (C x d) entries per sample
    per_sample = head.linear.out_features * target.numel() * target.element_size()
    sub = max(1, int(max_bytes // per_sample))
    total = 0.0
    for xb, yb in batches:
        for x, y in zip(xb.split(sub), yb.split(sub), strict=True):
            ext.zero_grad()
            loss = lossf(ext(x), y)
            with backpack(DiagGGNExact()):
                loss.backward()
            # the sub-batch mean's GGN, weighted by the sub-batch's share of the data
            total += float(target.diag_ggn_exact.sum()) * int(y.shape[0]) / n
    return total, min(sub, max(int(y.shape[0]) for _, y in batches))


def main(argv=None) -> int:
    """Run the comparison with the command-line arguments ``argv``; prints the table."""
    ap = argparse.ArgumentParser(prog="python -m convflat.bench curvature", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18-cifar,gapcnn-w32-d4,gapcnn-w16-d3")
    ap.add_argument("--n", type=int, default=256, help="samples (default 256)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--size", type=int, default=32, help="image side (default 32, CIFAR)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-probes", type=int, default=400)
    ap.add_argument("--max-hutchinson-seconds", type=float, default=120.0)
    ap.add_argument("--no-backpack", action="store_true")
    ap.add_argument("--patch-gram", action="store_true",
                    help="also time (b) with the patch Gram from gathered patches (U U^T) "
                         "instead of the input's stride phases, interleaved with the rest; "
                         "its (b)/(a) is printed under the table")
    ap.add_argument("--backpack-max-gib", type=float, default=4.0,
                    help="largest array BackPACK may form for the conv diagonal (K x b x C x d "
                         "entries); batches are split into sub-batches to stay below it "
                         "(default 4 GiB)")
    args = ap.parse_args(argv)

    from convflat.curvature import exact_curvature, find_head
    from convflat.io import resolve_device

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.n,), generator=g).to(device)
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# device: {device} ({name_dev}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, N={args.n}, {args.size}x{args.size}, "
          f"batch {args.batch_size}, median of {args.repeats}")
    if device.type == "cpu":
        # On CPU, glibc hands large tensors fresh pages (mmap) unless told otherwise, and the
        # page faults can cost a plain forward pass more than its arithmetic;
        # exact_curvature reuses its buffers and pays far less of it, so the setting moves
        # (b)/(a): say which one this run had.
        tuned = {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
                 if k in os.environ}
        print("# glibc malloc: " + (", ".join(f"{k}={v}" for k, v in tuned.items())
                                    if tuned else "defaults (large tensors on fresh pages)"))
    # rows are printed as each model finishes, so a later model that fails (out of memory,
    # say) does not take the earlier rows with it
    print()
    print("| model | conv layer | route | forward (a) | exact (b) | (b)/(a) | exact f32 (b)/(a) "
          "| Hutchinson 1% (c) | probes (first hit) | (c)/(b) | BackPACK (d) | (d)/(b) "
          "| peak MiB fwd / exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    notes = []
    for name, model in _models(args.models.split(","), 3, args.classes):
        model = model.to(device).eval()
        head = find_head(model)

        def forward(model=model):
            with torch.no_grad():
                for xb, _ in batches:
                    model(xb)

        # one untimed run each for peak memory (and warm-up), then interleaved timed repeats
        with _Peak(device) as pf:
            forward()
        with _Peak(device) as pe:
            res = exact_curvature(model, batches, device=device)
        res32 = exact_curvature(model, batches, device=device, dtype=torch.float32)
        fns = {"forward": forward, **_exact_runs(model, batches, device, args.patch_gram)}
        faults: dict[str, list[int]] = {}
        times = _interleaved(fns, device, args.repeats, faults)
        t_fwd, t_ex, t_ex32 = (statistics.median(times[k]) for k in ("forward", "exact",
                                                                      "exact32"))
        hut = _hutchinson_to_1pct(model, head.conv.weight, batches, res.trace, device,
                                  args.max_probes, args.max_hutchinson_seconds)
        bp = "- | -"
        note = f"{name}: float32 products rel. err. " \
               f"{abs(res32.trace - res.trace) / abs(res.trace):.1e}"
        if not args.no_backpack:
            t_bp, (ref, sub) = _timed(
                lambda m=model, h=head: _backpack_oracle(m, h, batches,
                                                         args.backpack_max_gib * 2**30),
                device, 1)
            bp = f"{t_bp:.2f} s | {t_bp / t_ex:.0f}x"
            note += f", BackPACK rel. err. {abs(ref - res.trace) / abs(res.trace):.1e}"
            if sub < args.batch_size:
                note += f" (BackPACK in sub-batches of {sub}, --backpack-max-gib)"
        if device.type == "cpu":
            note += (f", minor page faults per pass: forward "
                     f"{statistics.median(faults['forward']):.0f}, exact "
                     f"{statistics.median(faults['exact']):.0f}")
        if args.patch_gram:
            note += (f", (b)/(a) with the patch Gram from patches "
                     f"{_ratio(times, 'patches', 'forward'):.2f} (from the input's phases "
                     f"{_ratio(times, 'exact', 'forward'):.2f})")
        notes.append(note)
        print(f"  {name}: forward {t_fwd:.3f}s  exact {t_ex:.3f}s  exact(f32) {t_ex32:.3f}s  "
              f"hutchinson {hut['seconds']:.1f}s ({hut['probes']} probes for 1% stderr; "
              f"{hut['probes_run']} run, first within 1% at {hut['first_hit']})"
              + (f"  backpack {bp.split(' |')[0]}" if not args.no_backpack else ""),
              file=sys.stderr)
        hit = hut["first_hit"] if hut["first_hit"] is not None else f">{hut['probes_run']}"
        print(f"| {name} | {head.conv_name} | {res.route} | {t_fwd:.3f} s | {t_ex:.3f} s | "
              f"{_ratio(times, 'exact', 'forward'):.2f} | "
              f"{_ratio(times, 'exact32', 'forward'):.2f} | {hut['seconds']:.1f} s | "
              f"{hut['probes']} ({hit}) | {hut['seconds'] / t_ex:.0f}x | {bp} | "
              f"{pf.mib:.0f} / {pe.mib:.0f} |", flush=True)
    print("\n(c): probes for a 1% standard error, (sd / 0.01 exact)^2 from the probes run, times "
          "the measured time per probe; in brackets the probe at which the running mean first "
          "came within 1% (chance), '>n' if it never did in the n probes run.")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
