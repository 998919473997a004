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

The protocol is :func:`time_exact` (on :mod:`convflat.bench.timing`), and (c) and (d) are
:mod:`convflat.bench.oracles`; ``bench gpu``'s cost check calls the same functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

from convflat.bench.oracles import backpack_ggn_trace, hutchinson_to_1pct
from convflat.bench.timing import Peak, interleaved, median_ratio, medians


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


def forward_pass(model: nn.Module, batches) -> Callable[[], None]:
    """(a): one plain forward pass of ``model`` over ``batches`` (no autograd)."""

    def forward() -> None:
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    return forward


@dataclasses.dataclass
class ExactCost:
    """What :func:`time_exact` measured: the float64 and float32-products results, the
    seconds of every run per repeat (``forward``, ``exact``, ``exact32``, maybe
    ``patches``), minor page faults per run, and the peak memory of the untimed runs."""

    result: object
    result32: object
    times: dict[str, list[float]]
    faults: dict[str, list[int]]
    peak_forward: Peak
    peak_exact: Peak

    def median(self, key: str) -> float:
        """Median seconds of run ``key``."""
        return medians(self.times)[key]

    def ratio(self, key: str, base: str = "forward") -> float:
        """Median of the per-repeat ratios ``key`` / ``base``."""
        return median_ratio(self.times, key, base)


def time_exact(model: nn.Module, batches, device: torch.device, repeats: int, *,
               patch_gram: bool = False) -> ExactCost:
    """The closed form's cost protocol: one untimed run each of (a) the forward pass and
    (b) ``exact_curvature`` for peak memory (and warm-up), (b) with float32 products, then
    ``repeats`` interleaved timed repeats of (a), (b), (b) in float32 (and, with
    ``patch_gram``, (b) with the patch Gram from gathered patches)."""
    from convflat.curvature import exact_curvature

    forward = forward_pass(model, batches)
    with Peak(device) as pf:
        forward()
    with Peak(device) as pe:
        res = exact_curvature(model, batches, device=device)
    res32 = exact_curvature(model, batches, device=device, dtype=torch.float32)
    fns = {"forward": forward, **_exact_runs(model, batches, device, patch_gram)}
    faults: dict[str, list[int]] = {}
    times = interleaved(fns, device, repeats, faults)
    return ExactCost(res, res32, times, faults, pf, pe)


def _parser() -> argparse.ArgumentParser:
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
    return ap


def _print_header(args: argparse.Namespace, device: torch.device) -> None:
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


def _note(name: str, cost: ExactCost, bp: dict | None, args, device) -> str:
    """The line under the table for one model."""
    res = cost.result
    note = f"{name}: float32 products rel. err. " \
           f"{abs(cost.result32.trace - res.trace) / abs(res.trace):.1e}"
    if bp is not None:
        note += f", BackPACK rel. err. {abs(bp['trace'] - res.trace) / abs(res.trace):.1e}"
        if bp["sub_batch"] < args.batch_size:
            note += f" (BackPACK in sub-batches of {bp['sub_batch']}, --backpack-max-gib)"
    if device.type == "cpu":
        note += (f", minor page faults per pass: forward "
                 f"{statistics.median(cost.faults['forward']):.0f}, exact "
                 f"{statistics.median(cost.faults['exact']):.0f}")
    if args.patch_gram:
        note += (f", (b)/(a) with the patch Gram from patches {cost.ratio('patches'):.2f} "
                 f"(from the input's phases {cost.ratio('exact'):.2f})")
    return note


def _model_row(name: str, model: nn.Module, batches, args, device) -> str:
    """Measure one model, print its row (and a progress line on stderr); returns its note."""
    from convflat.curvature import find_head

    model = model.to(device).eval()
    head = find_head(model)
    cost = time_exact(model, batches, device, args.repeats, patch_gram=args.patch_gram)
    res, t_fwd, t_ex = cost.result, cost.median("forward"), cost.median("exact")
    hut = hutchinson_to_1pct(model, head.conv.weight, batches, res.trace, device,
                             max_probes=args.max_probes,
                             max_seconds=args.max_hutchinson_seconds)
    bp, bp_cells = None, "- | -"
    if not args.no_backpack:
        bp = backpack_ggn_trace(model, head, batches, device,
                                max_bytes=args.backpack_max_gib * 2**30)
        bp_cells = f"{bp['seconds']:.2f} s | {bp['seconds'] / t_ex:.0f}x"
    print(f"  {name}: forward {t_fwd:.3f}s  exact {t_ex:.3f}s  exact(f32) "
          f"{cost.median('exact32'):.3f}s  hutchinson {hut['seconds']:.1f}s "
          f"({hut['probes_1pct']} probes for 1% stderr; {hut['probes_run']} run, first within "
          f"1% at {hut['first_hit']})" + (f"  backpack {bp['seconds']:.2f} s" if bp else ""),
          file=sys.stderr)
    hit = hut["first_hit"] if hut["first_hit"] is not None else f">{hut['probes_run']}"
    print(f"| {name} | {head.conv_name} | {res.route} | {t_fwd:.3f} s | {t_ex:.3f} s | "
          f"{cost.ratio('exact'):.2f} | {cost.ratio('exact32'):.2f} | {hut['seconds']:.1f} s | "
          f"{hut['probes_1pct']} ({hit}) | {hut['seconds'] / t_ex:.0f}x | {bp_cells} | "
          f"{cost.peak_forward.mib:.0f} / {cost.peak_exact.mib:.0f} |", flush=True)
    return _note(name, cost, bp, args, device)


def main(argv=None) -> int:
    """Run the comparison with the command-line arguments ``argv``; prints the table."""
    args = _parser().parse_args(argv)
    from convflat.io import resolve_device

    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.n,), generator=g).to(device)
    batches = list(zip(x.split(args.batch_size), y.split(args.batch_size), strict=True))
    _print_header(args, device)
    notes = [_model_row(name, model, batches, args, device)
             for name, model in _models(args.models.split(","), 3, args.classes)]
    print("\n(c): probes for a 1% standard error, (sd / 0.01 exact)^2 from the probes run, times "
          "the measured time per probe; in brackets the probe at which the running mean first "
          "came within 1% (chance), '>n' if it never did in the n probes run.")
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
