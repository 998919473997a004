"""``python -m convflat.bench gpu``: the GPU path proven in one command.

Run it on a CUDA machine from the source tree::

    PYTHONPATH=src python -m convflat.bench gpu                  # device auto: CUDA if present
    PYTHONPATH=src python -m convflat.bench gpu --out bench-gpu.json --skip pipeline

In one process it runs four checks, prints one table row per sub-check as it finishes and a
summary table at the end, and writes every row to a JSON file (``--out``, default
``bench-gpu.json``, written atomically after each check, so a killed run keeps the rows it
finished). Sized to finish in at most 8 minutes on one H100/H200-class GPU.

Every row has a status: ``pass`` / ``fail`` (a judged check and its verdict), ``info`` (a
figure with no verdict, or a target that is not judged on this device or at these sizes) or
``not run`` (with the reason: skipped by ``--only``/``--skip``, no CUDA, BackPACK or curvlinops
not installed, out of memory, ...). A check never passes silently: an exception inside a
judged check makes its row ``fail`` with the error. The exit status is 1 when a row failed,
2 on a usage error, else 0.

``--device`` is ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:<i>``.
``--device cuda`` on a machine without CUDA is a usage error: one line on stderr, exit status
2, no JSON written. On the CPU the same checks run at toy sizes (``--toy`` is the default
there; ``--no-toy`` asks for the full sizes anywhere, ``--toy`` for toy sizes on a GPU); the
test suite runs them that way. Targets are judged only on CUDA at full sizes; elsewhere their
rows print the figure with "target judged on cuda only" (or "... at full size only").

1. ``exactness``: the networks of the exactness suite
   (:func:`convflat.reference.architecture_suite`, :func:`~convflat.reference.build_case`;
   ``--cases N`` takes the first N).

   * ``exactness/float64``: trace, block traces and relative flatness kappa of
     ``exact_curvature`` in float64 on the device against a reference: on CUDA the same
     computation on the CPU, on the CPU (where CPU-against-CPU would check nothing) the dense
     float64 autograd Hessian (:func:`~convflat.reference.autograd_kernel_hessian` and
     :func:`~convflat.reference.dense_measures`); ``--reference`` chooses either anywhere.
     Relative differences (block traces relative to the largest block); target <= 1e-10,
     judged on every device.
   * ``exactness/float32``: ``exact_curvature(dtype=torch.float32)`` (float32 per-sample
     products, float64 sums) against float64 products on the device, on float32 copies of
     the networks (with a float64 network the closed form's own logit check, 1e-8, refuses
     float32 products). Reported, not judged.

2. ``cost``: the ratios of ``bench curvature``, by its own timing, on random images: (a) one
   plain forward pass over the data (eval mode, no autograd, float32), (b)
   ``exact_curvature`` with float64 products, (b32) with float32 products, (c) Hutchinson's
   estimate (curvlinops, Rademacher probes; its time is the probes a 1% standard error
   needs, ``(sd / 0.01 Tr)^2`` from the probes run, times the time per probe), (d)
   BackPACK's exact GGN diagonal of the kernel, summed (sub-batches of at most
   ``--backpack-max-gib``; run for at most ``--backpack-seconds`` and extrapolated linearly
   in the samples when cut short; not run when one sample's array exceeds the cap). (a),
   (b), (b32) run in turn within each repeat; a ratio is the median of the per-repeat
   ratios. Models (``--cost-models``): ``resnet18-cifar`` (CIFAR ResNet-18 at 32 x 32, 10
   classes) and ``resnet50-tv`` (torchvision ResNet-50 at 224 x 224, ``--r50-classes``
   classes, default 1000), batch ``--cost-batch`` 256, ``--cost-n`` 2048 images; toy:
   ``gapcnn-w8`` (width 8, depth 3) at 16 x 16, 32 images in batches of 16. Rows per model:

   * ``(b)/(a)`` float64: target <= 1.5; ``(b32)/(a)``: reported;
   * ``(c)/(b)``: target >= 1000; ``(d)/(b)``: target >= 10;
   * peak memory of (b) (``torch.cuda.max_memory_allocated`` above what was allocated
     before) on the first half of the batches and on all of them: target, no growth with N
     (at most 5% + 8 MiB). Not measured on the CPU: torch's CPU allocator keeps no peak and
     tracemalloc does not see tensors.

3. ``train``: ``convflat.train`` on the device.

   * ``train/<model>/throughput``: images per second of training steps
     (:func:`convflat.train.train_step` on :class:`convflat.train.DeviceData`, synthetic
     CIFAR-shaped uint8 images, random crop and flip) for the CIFAR ResNet-20 and the
     width-64 gapcnn (depth 6): bf16 autocast with channels-last (``amp+cl``, what
     ``convflat train`` does on CUDA) against float32 with channels-last (``fp32+cl``) and
     plain float32 NCHW (``fp32``). On the CPU (toy models) amp is not run: the bf16
     autocast of ``convflat.train`` is CUDA-only. Reported.
   * ``train/<model>/dataloader``: the device-resident pipeline against
     ``torch.utils.data.DataLoader`` with per-image ``torchvision.transforms.v2``, as
     ``python -m convflat.bench train`` measures it (called in-process; float32,
     channels-last). Reported.
   * ``train/accuracy``: a seeded run of ``convflat.train.train`` on scikit-learn's digits
     (gapcnn width 16, depth 3, 10 epochs): test accuracy >= 0.93 on the device, and on CUDA
     within 0.03 of the same run on the CPU. Judged on every device.

4. ``pipeline``: the Snakemake workflow (needs the source tree: Snakefile and config/ beside
   src/), in temporary directories, as subprocesses.

   * ``pipeline/test-study``: the study of config/test.yaml end to end (prepare, train,
     measure, analysis, validation, notebooks) with ``device`` set to this run's device; pass
     when Snakemake succeeds and every run trained and was measured on that device.
   * ``pipeline/one-job``: one train job and one measure job of the first run of the full
     reproduction's first CIFAR-10 study (config/config.yaml) on synthetic CIFAR-shaped data
     (50000 + 10000 random images), with ``--job-epochs`` epochs (default 3 of its 30; the
     estimate is linear in epochs), timed by Snakemake's benchmark files. Pass when both jobs
     finish with status ok; the row prints the measured seconds next to the seconds that
     the time estimate models for the same job (:func:`convflat.study.estimate_hours`,
     what ``snakemake --cores 1 estimate`` prints, called on the job's config after the
     workflow's schema filled its defaults), and the training rate achieved (images/s, and
     TFLOP/s from the estimate's own FLOP count, :func:`convflat.study.forward_macs`).
     Toy: 512 images, one epoch, three cheap measures on 64 samples.

   The test study takes a minute or more even on the CPU: ``--skip pipeline`` leaves it out.

Finally ``wall``: the whole run's seconds; target <= 480, judged on CUDA at full size when
every check ran.

One module per check: :mod:`~convflat.bench.gpu.exactness`, :mod:`~convflat.bench.gpu.cost`
(with :mod:`~convflat.bench.gpu.memory`), :mod:`~convflat.bench.gpu.training`,
:mod:`~convflat.bench.gpu.pipeline` (with :mod:`~convflat.bench.gpu.estimate`); rows, the
context and the error guard are :mod:`~convflat.bench.gpu.common`. The cost check times
through ``bench curvature``'s :func:`~convflat.bench.curvature.time_exact` and the oracles of
:mod:`convflat.bench.oracles`, the throughput rows through ``bench train``'s
:func:`~convflat.bench.train.time_training`; both use :mod:`convflat.bench.timing`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from convflat.bench.gpu import cost, exactness, pipeline, training
from convflat.bench.gpu.common import (
    HEADER,
    STATUSES,
    Ctx,
    NotRun,
    Row,
    not_run,
    print_row,
    print_table,
    target_row,
)
from convflat.bench.gpu.cost import COST_MODELS
from convflat.bench.gpu.exactness import EXACT_TOL
from convflat.bench.gpu.training import ACC_DELTA, ACC_MIN, TRAIN_MODELS
from convflat.io import atomic_write_json, provenance, resolve_device

__all__ = ["ACC_DELTA", "ACC_MIN", "CHECKS", "COST_MODELS", "EXACT_TOL", "FORMAT", "STATUSES",
           "TRAIN_MODELS", "Ctx", "NotRun", "Row", "build_parser", "main", "target_row"]

FORMAT = "convflat-bench-gpu/1"
CHECKS = ("exactness", "cost", "train", "pipeline")
WALL_TARGET_S = 480.0

# (option, full size, toy size)
SIZES = [
    ("cost_models", "resnet18-cifar,resnet50-tv", "gapcnn-w8"),
    ("cost_n", 2048, 32),
    ("cost_batch", 256, 16),
    ("repeats", 3, 3),
    ("max_probes", 200, 4),
    ("hutchinson_seconds", 20.0, 5.0),
    ("backpack_max_gib", 16.0, 0.25),
    ("backpack_seconds", 30.0, 10.0),
    ("train_models", "resnet20-cifar,gapcnn-w64", "gapcnn-w8"),
    ("train_n", 10000, 256),
    ("train_size", 32, 16),
    ("train_batch", 128, 32),
    ("train_steps", 30, 3),
    ("workers", "0,4", "0"),
    ("job_epochs", 3, 1),
    ("job_n", 50000, 512),
]


def _planned(ctx: Ctx, check: str) -> list[tuple[str, str]]:
    if check == "exactness":
        return exactness.PLANNED
    if check == "cost":
        return [p for m in ctx.args.cost_models.split(",") for p in cost.planned(m)]
    if check == "train":
        return training.planned(ctx)
    return pipeline.PLANNED


RUNNERS: dict[str, Callable[[Ctx], list[Row]]] = {
    "exactness": exactness.check_exactness, "cost": cost.check_cost,
    "train": training.check_train, "pipeline": pipeline.check_pipeline,
}


class UsageError(Exception):
    """A bad command line: one line on stderr, exit status 2."""


def _names(text: str | None, opt: str, known) -> list[str]:
    if text is None:
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise UsageError(f"{opt} {bad[0]!r} is not one of {', '.join(known)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The command line (sizes default to the full or the toy value, by ``--toy``)."""
    p = argparse.ArgumentParser(prog="python -m convflat.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:<i>")
    p.add_argument("--out", default="bench-gpu.json", help="JSON file (default bench-gpu.json)")
    p.add_argument("--only", help=f"comma-separated checks to run ({','.join(CHECKS)})")
    p.add_argument("--skip", help="comma-separated checks to leave out")
    p.add_argument("--toy", action=argparse.BooleanOptionalAction, default=None,
                   help="toy sizes (default: on for cpu, off for cuda)")
    p.add_argument("--cases", type=int, help="exactness: the first N suite networks (all)")
    p.add_argument("--reference", choices=("auto", "autograd", "cpu"), default="auto",
                   help="exactness reference: cpu closed form on CUDA, autograd on cpu (auto)")
    p.add_argument("--r50-classes", type=int, default=1000, help="classes of resnet50-tv")
    p.add_argument("--pipeline-cores", type=int, help="snakemake --cores (all cores)")
    p.add_argument("--pipeline-timeout", type=float, default=900.0,
                   help="seconds each snakemake call may take (900)")
    for opt, full, toy in SIZES:
        p.add_argument("--" + opt.replace("_", "-"), type=type(full), default=None,
                       help=f"default {full} ({toy} with --toy)")
    return p


def _context(argv: list[str] | None) -> tuple[Ctx, list[str], list[str]]:
    """The parsed command line: (context, checks asked for, checks skipped); UsageError."""
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"{exc} (torch {torch.__version__}); use --device cpu for the toy "
                         "checks") from None
    toy = device.type != "cuda" if args.toy is None else args.toy
    for opt, full, small in SIZES:
        if getattr(args, opt) is None:
            setattr(args, opt, small if toy else full)
    only = _names(args.only, "--only", CHECKS) or list(CHECKS)
    skip = _names(args.skip, "--skip", CHECKS)
    _names(args.cost_models, "--cost-models", list(COST_MODELS))
    _names(args.train_models, "--train-models", list(TRAIN_MODELS))
    return Ctx(device, toy, args), only, skip


def _write(ctx: Ctx, rows: list[Row], ran: dict[str, bool], seconds: float) -> None:
    """The JSON file (atomically: a killed run keeps the rows it finished)."""
    failed = sum(r.status == "fail" for r in rows)
    atomic_write_json(ctx.args.out, {
        "format": FORMAT, **provenance(device=ctx.device, seconds=seconds),
        "toy": ctx.toy, "checks": ran, "args": dict(vars(ctx.args)),
        "result": "fail" if failed else "pass", "failed": failed,
        "rows": [r.to_dict() for r in rows]})


def _wall_row(ctx: Ctx, wall: float, ran_all: bool) -> Row:
    row = target_row(ctx, "wall", "wall time of the whole run", f"{wall:.0f} s",
                     wall <= WALL_TARGET_S, f"<= {WALL_TARGET_S:.0f} s",
                     "" if ran_all else "not every check ran", {"seconds": wall})
    if ctx.judged and not ran_all:
        row.status = "info"
    return row


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the table, write the JSON; 1 if a row failed, 2 on misuse."""
    try:
        ctx, only, skip = _context(argv)
    except UsageError as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    name_dev = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "CPU"
    print(f"# bench gpu: device {ctx.device} ({name_dev}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {'toy' if ctx.toy else 'full'} sizes",
          flush=True)
    print(HEADER, flush=True)
    rows: list[Row] = []
    ran = {c: c in only and c not in skip for c in CHECKS}
    for check in CHECKS:
        if ran[check]:
            rows.extend(RUNNERS[check](ctx))
        else:
            not_run(rows, _planned(ctx, check), f"skipped: --skip {check}" if check in skip
                    else f"skipped: --only {ctx.args.only}")
        _write(ctx, rows, ran, time.perf_counter() - t_start)
    wrow = _wall_row(ctx, time.perf_counter() - t_start, all(ran.values()))
    print_row(wrow)
    rows.append(wrow)
    _write(ctx, rows, ran, time.perf_counter() - t_start)
    print_table(rows)
    print(f"JSON: {ctx.args.out}")
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
