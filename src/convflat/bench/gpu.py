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

2. ``cost``: the ratios of ``bench curvature`` on random images: (a) one plain forward pass
   over the data (eval mode, no autograd, float32), (b) ``exact_curvature`` with float64
   products, (b32) with float32 products, (c) Hutchinson's estimate (curvlinops,
   Rademacher probes; its time is the probes a 1% standard error needs, ``(sd / 0.01 Tr)^2``
   from the probes run, times the time per probe), (d) BackPACK's exact GGN diagonal of the
   kernel, summed (sub-batches of at most ``--backpack-max-gib``; run for at most
   ``--backpack-seconds`` and extrapolated linearly in the samples when cut short; not run
   when one sample's array exceeds the cap). (a), (b), (b32) run in turn within each repeat;
   a ratio is the median of the per-repeat ratios. Models (``--cost-models``):
   ``resnet18-cifar`` (CIFAR ResNet-18 at 32 x 32, 10 classes) and ``resnet50-tv``
   (torchvision ResNet-50 at 224 x 224, ``--r50-classes`` classes, default 1000), batch
   ``--cost-batch`` 256, ``--cost-n`` 2048 images; toy: ``gapcnn-w8`` (width 8, depth 3) at
   16 x 16, 32 images in batches of 16. Rows per model:

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
     ``snakemake --cores 1 estimate`` models for the same job (read from its output for a
     config of 1000 copies of the job, divided by 1000), and the training rate achieved
     (images/s and TFLOP/s from ``torch.utils.flop_counter``). Toy: 512 images, one epoch,
     three cheap measures on 64 samples.

   The test study takes a minute or more even on the CPU: ``--skip pipeline`` leaves it out.

Finally ``wall``: the whole run's seconds; target <= 480, judged on CUDA at full size when
every check ran.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib.util
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convflat import reference
from convflat.io import atomic_write_json, provenance, resolve_device

FORMAT = "convflat-bench-gpu/1"
CHECKS = ("exactness", "cost", "train", "pipeline")
STATUSES = ("pass", "fail", "info", "not run")
EXACT_TOL = 1e-10
WALL_TARGET_S = 480.0
ACC_MIN, ACC_DELTA = 0.93, 0.03
ESTIMATE_COPIES = 1000

# name -> (model spec without in_channels/num_classes, image side, classes)
COST_MODELS: dict[str, tuple[dict[str, Any], int, int]] = {
    "resnet18-cifar": ({"family": "resnet", "depth": 18}, 32, 10),
    "resnet50-tv": ({"family": "torchvision", "arch": "resnet50"}, 224, 1000),
    "gapcnn-w8": ({"family": "gapcnn", "width": 8, "depth": 3}, 16, 10),
}
TRAIN_MODELS: dict[str, dict[str, Any]] = {
    "resnet20-cifar": {"family": "resnet", "depth": 20},
    "gapcnn-w64": {"family": "gapcnn", "width": 64, "depth": 6},
    "resnet8-w4": {"family": "resnet", "depth": 8, "width": 4},
    "gapcnn-w8": {"family": "gapcnn", "width": 8, "depth": 2},
}
DIGITS_SPEC = {"family": "gapcnn", "width": 16, "depth": 3}
DIGITS_TRAIN = {"epochs": 10, "batch_size": 64, "lr": 0.1, "seed": 0}

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


@dataclasses.dataclass
class Row:
    """One line of the table and of the JSON file."""

    id: str
    name: str
    status: str
    value: str = ""
    target: str = "-"
    note: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None  # wall time of the sub-check that made the row

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; a row not run carries its reason."""
        d = dataclasses.asdict(self)
        if self.status == "not run":
            d["reason"] = self.note
        return d


class NotRun(Exception):
    """Raised inside a check that cannot run here; the message is the reason."""


@dataclasses.dataclass
class Ctx:
    """What every check needs: the device, toy or full sizes, the parsed options."""

    device: torch.device
    toy: bool
    args: argparse.Namespace

    @property
    def cuda(self) -> bool:
        """Whether the device is a CUDA device."""
        return self.device.type == "cuda"

    @property
    def judged(self) -> bool:
        """Whether the performance targets are judged: on CUDA at full size only."""
        return self.cuda and not self.toy

    def sync(self) -> None:
        """Wait for the device (CUDA); timings need it."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def target_row(ctx: Ctx, id: str, name: str, value: str, ok: bool, target: str,
               note: str = "", data: dict | None = None) -> Row:
    """A row with a performance target: pass/fail where judged, else info saying so."""
    if ctx.judged:
        status = "pass" if ok else "fail"
    else:
        status = "info"
        why = "target judged on cuda only" if not ctx.cuda else "target judged at full size only"
        note = f"{why}; {note}" if note else why
    return Row(id, name, status, value, target, note, data or {})


_OOM = tuple({getattr(torch, "OutOfMemoryError", MemoryError),
              getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError})


def _guarded(rows: list[Row], planned: list[tuple[str, str]], fn: Callable[[], list[Row]]
             ) -> list[Row]:
    """Run one sub-check; turn NotRun, out-of-memory and any other error into rows for the
    ``planned`` (id, name) pairs it did not deliver: not run, not run, fail."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except NotRun as exc:
        out = [Row(i, n, "not run", note=str(exc)) for i, n in planned]
    except _OOM as exc:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        out = [Row(i, n, "not run", note=f"out of memory: {msg}") for i, n in planned]
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        out = [Row(i, n, "fail", note=f"error: {msg}") for i, n in planned]
    done = {r.id for r in out}
    out += [Row(i, n, "fail", note="the check produced no row") for i, n in planned
            if i not in done]
    for r in out:
        r.seconds = time.perf_counter() - t0
        _print_row(r)
    rows.extend(out)
    return out


def _median_ratio(times: dict[str, list[float]], key: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(times[key], times[base], strict=True))


def _interleaved(ctx: Ctx, fns: dict[str, Callable[[], Any]], repeats: int
                 ) -> dict[str, list[float]]:
    """Seconds of each function, run in turn within every repeat (a, b, c, a, b, c, ...)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            gc.collect()
            ctx.sync()
            t0 = time.perf_counter()
            fn()
            ctx.sync()
            times[k].append(time.perf_counter() - t0)
    return times


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _block_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------------------ exactness


def _exactness_planned() -> list[tuple[str, str]]:
    return [("exactness/float64", "exactness: float64 on the device vs reference"),
            ("exactness/float32", "exactness: float32 products vs float64")]


def check_exactness(ctx: Ctx) -> list[Row]:
    """Rows ``exactness/float64`` and ``exactness/float32`` (see the module docstring)."""
    from convflat.curvature import exact_curvature

    cases = reference.architecture_suite()
    if ctx.args.cases:
        cases = cases[: ctx.args.cases]
    ref_kind = ctx.args.reference
    if ref_kind == "auto":
        ref_kind = "cpu" if ctx.cuda else "autograd"
    rows: list[Row] = []
    planned = _exactness_planned()

    def float64() -> list[Row]:
        worst = {"trace": 0.0, "blocks": 0.0, "kappa": 0.0}
        per_case = []
        for case in cases:
            model, x, y = reference.build_case(case)
            res = exact_curvature(model, (x, y), layer="last", device=ctx.device, batch_size=3)
            if ref_kind == "autograd":
                H = reference.autograd_kernel_hessian(model, "last", x, y)
                ref = reference.dense_measures(H, model.last.weight.detach())
                ref_tr, ref_bl, ref_k = (ref["trace"], ref["block_traces"],
                                         ref["relative_flatness"])
            else:
                cpu = exact_curvature(model, (x, y), layer="last", device="cpu", batch_size=3)
                ref_tr, ref_bl, ref_k = cpu.trace, cpu.block_traces, cpu.relative_flatness
            e = {"trace": _rel(res.trace, ref_tr), "blocks": _block_rel(res.block_traces, ref_bl),
                 "kappa": _rel(res.relative_flatness, ref_k)}
            if not all(math.isfinite(v) for v in e.values()):
                e = {k: math.inf if not math.isfinite(v) else v for k, v in e.items()}
            per_case.append({"case": case.name, **e})
            worst = {k: max(worst[k], e[k]) for k in worst}
        ok = all(v <= EXACT_TOL for v in worst.values())
        what = {"autograd": "dense float64 autograd Hessian (cpu)",
                "cpu": "float64 closed form on cpu"}[ref_kind]
        worst_case = max(per_case, key=lambda c: max(c["trace"], c["blocks"], c["kappa"]))
        return [Row(
            "exactness/float64", f"exactness: float64 on {ctx.device} vs {what}",
            "pass" if ok else "fail",
            f"max rel diff: trace {worst['trace']:.1e}, blocks {worst['blocks']:.1e}, "
            f"kappa {worst['kappa']:.1e}", f"<= {EXACT_TOL:g}",
            f"{len(cases)} networks; worst: {worst_case['case']}",
            {"reference": ref_kind, "max_rel_diff": worst, "cases": per_case})]

    def float32() -> list[Row]:
        worst = {"trace": 0.0, "blocks": 0.0, "kappa": 0.0}
        for case in cases:
            model, x, y = reference.build_case(case)
            m32 = copy.deepcopy(model).float()
            kw = {"layer": "last", "device": ctx.device, "batch_size": 3}
            r64 = exact_curvature(m32, (x.float(), y), **kw)
            r32 = exact_curvature(m32, (x.float(), y), dtype=torch.float32, **kw)
            e = {"trace": _rel(r32.trace, r64.trace),
                 "blocks": _block_rel(r32.block_traces, r64.block_traces),
                 "kappa": _rel(r32.relative_flatness, r64.relative_flatness)}
            worst = {k: max(worst[k], e[k]) for k in worst}
        return [Row("exactness/float32", "exactness: float32 products vs float64", "info",
                    f"max rel diff: trace {worst['trace']:.1e}, blocks {worst['blocks']:.1e}, "
                    f"kappa {worst['kappa']:.1e}", "report",
                    f"{len(cases)} networks in float32, products float32 vs float64",
                    {"max_rel_diff": worst})]

    _guarded(rows, planned[:1], float64)
    _guarded(rows, planned[1:], float32)
    return rows


# ----------------------------------------------------------------------------------- cost


def _cost_planned(name: str) -> list[tuple[str, str]]:
    return [(f"cost/{name}/b_over_a", f"cost {name}: (b)/(a) float64"),
            (f"cost/{name}/b32_over_a", f"cost {name}: (b32)/(a) float32 products"),
            (f"cost/{name}/c_over_b", f"cost {name}: (c)/(b) Hutchinson to 1%"),
            (f"cost/{name}/d_over_b", f"cost {name}: (d)/(b) BackPACK"),
            (f"cost/{name}/peak_memory", f"cost {name}: peak memory of (b) vs N")]


def _cost_model(ctx: Ctx, name: str) -> tuple[nn.Module, int, int]:
    from convflat.models import build_model

    spec, size, classes = COST_MODELS[name]
    if name == "resnet50-tv":
        classes = ctx.args.r50_classes
    spec = {**spec, "in_channels": 3, "num_classes": classes}
    if spec["family"] in ("gapcnn", "resnet"):
        spec["image_size"] = [size, size]
    torch.manual_seed(0)
    return build_model(spec).to(ctx.device).eval(), size, classes


def _hutchinson(ctx: Ctx, model: nn.Module, param: nn.Parameter, batches, exact: float
                ) -> dict[str, Any]:
    """Probes of Hutchinson's estimator (curvlinops) until ``--max-probes`` or
    ``--hutchinson-seconds`` (at least 2); the probes a 1% standard error needs and their
    time, from the sample standard deviation and the time per probe."""
    try:
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.hutchinson import hutchinson_trace
    except ImportError as exc:
        raise NotRun(f"curvlinops is not installed ({exc})") from None
    H = HessianLinearOperator(model, nn.CrossEntropyLoss(), [param], batches,
                              check_deterministic=False)
    with torch.random.fork_rng(devices=[ctx.device] if ctx.cuda else []):
        torch.manual_seed(0)
        ests: list[float] = []
        ctx.sync()
        t0 = time.perf_counter()
        while len(ests) < 2 or (len(ests) < ctx.args.max_probes
                                and time.perf_counter() - t0 < ctx.args.hutchinson_seconds):
            ests.append(float(hutchinson_trace(H, 1)))
        ctx.sync()
        per_probe = (time.perf_counter() - t0) / len(ests)
    sd = statistics.stdev(ests)
    needed = max(1, math.ceil((sd / (0.01 * abs(exact))) ** 2))
    mean = statistics.fmean(ests)
    return {"probes_run": len(ests), "per_probe_s": per_probe, "sd": sd, "probes_1pct": needed,
            "seconds": needed * per_probe, "mean": mean,
            "mean_rel_diff": _rel(mean, exact), "stderr_rel": sd / math.sqrt(len(ests))
            / max(abs(exact), 1e-300)}


def _backpack(ctx: Ctx, model: nn.Module, layer: str, classes: int, batches
              ) -> dict[str, Any]:
    """BackPACK's DiagGGNExact of one kernel, summed, in sub-batches of at most
    ``--backpack-max-gib`` of its K x b x C x d array; stops after ``--backpack-seconds``
    and extrapolates the time linearly in the samples."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import DiagGGNExact
    except ImportError as exc:
        raise NotRun(f"BackPACK is not installed ({exc})") from None
    ext = extend(copy.deepcopy(model).eval(), use_converter=True)
    key = layer.replace(".", "_") + "_weight"
    target = None
    for pname, p in ext.named_parameters():
        mine = pname.replace(".", "_") == key
        p.requires_grad_(mine)
        target = p if mine else target
    if target is None:
        raise RuntimeError(f"BackPACK's converted model has no weight for layer {layer!r}")
    per_sample = classes * target.numel() * target.element_size()
    cap = ctx.args.backpack_max_gib * 2**30
    if per_sample > cap:
        raise NotRun(f"BackPACK's conv diagonal needs {per_sample / 2**30:.1f} GiB per sample "
                     f"(K x C x d), over --backpack-max-gib {ctx.args.backpack_max_gib:g}")
    sub = max(1, int(cap // per_sample))
    lossf = extend(nn.CrossEntropyLoss())
    n = sum(int(y.shape[0]) for _, y in batches)
    total, done = 0.0, 0
    ctx.sync()
    t0 = time.perf_counter()
    for xb, yb in batches:
        for x, y in zip(xb.split(sub), yb.split(sub), strict=True):
            ext.zero_grad()
            loss = lossf(ext(x), y)
            with backpack(DiagGGNExact()):
                loss.backward()
            total += float(target.diag_ggn_exact.sum()) * int(y.shape[0]) / n
            done += int(y.shape[0])
            if time.perf_counter() - t0 > ctx.args.backpack_seconds and done < n:
                break
        else:
            continue
        break
    ctx.sync()
    seconds = (time.perf_counter() - t0) * n / done
    return {"seconds": seconds, "samples_run": done, "n": n, "sub_batch": sub,
            "trace": total if done == n else None}


def _peak_bytes(ctx: Ctx, fn: Callable[[], Any]) -> int:
    ctx.sync()
    gc.collect()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    fn()
    ctx.sync()
    return torch.cuda.max_memory_allocated(ctx.device) - base


def check_cost(ctx: Ctx) -> list[Row]:
    """Rows ``cost/<model>/...`` (see the module docstring)."""
    from convflat.curvature import exact_curvature, find_head

    rows: list[Row] = []
    a = ctx.args
    for name in a.cost_models.split(","):
        planned = _cost_planned(name)
        state: dict[str, Any] = {}

        def setup(name=name, planned=planned, state=state) -> list[Row]:
            model, size, classes = _cost_model(ctx, name)
            gen = torch.Generator(device=ctx.device).manual_seed(0)
            x = torch.randn(a.cost_n, 3, size, size, generator=gen, device=ctx.device)
            y = torch.randint(0, classes, (a.cost_n,), generator=gen, device=ctx.device)
            batches = list(zip(x.split(a.cost_batch), y.split(a.cost_batch), strict=True))
            head = find_head(model)

            def forward() -> None:
                with torch.no_grad():
                    for xb, _ in batches:
                        model(xb)

            def exact(dtype=torch.float64, data=batches):
                return exact_curvature(model, data, device=ctx.device, dtype=dtype)

            forward()  # warm-up (cuDNN algorithm choice, allocator)
            r64, r32 = exact(), exact(torch.float32)
            times = _interleaved(ctx, {"a": forward, "b": exact,
                                       "b32": lambda: exact(torch.float32)}, a.repeats)
            med = {k: statistics.median(v) for k, v in times.items()}
            state.update(model=model, batches=batches, head=head, classes=classes, r64=r64,
                         t_b=med["b"], exact=exact)
            common = {"model": name, "n": a.cost_n, "batch": a.cost_batch, "image": size,
                      "classes": classes, "layer": head.conv_name, "route": r64.route,
                      "seconds": med}
            ba, b32a = _median_ratio(times, "b", "a"), _median_ratio(times, "b32", "a")
            return [
                target_row(ctx, planned[0][0], planned[0][1], f"{ba:.2f}", ba <= 1.5, "<= 1.5",
                           f"(a) {med['a']:.3f} s, (b) {med['b']:.3f} s; {head.conv_name}, "
                           f"route {r64.route}, N={a.cost_n}", {**common, "ratio": ba}),
                Row(planned[1][0], planned[1][1], "info", f"{b32a:.2f}", "report",
                    f"(b32) {med['b32']:.3f} s; trace rel diff to float64 "
                    f"{_rel(r32.trace, r64.trace):.1e}",
                    {**common, "ratio": b32a, "trace_rel_diff": _rel(r32.trace, r64.trace)}),
            ]

        if not _guarded(rows, planned[:2], setup) or "r64" not in state:
            for i, n in planned[2:]:
                r = Row(i, n, "not run", note="the model's (b) did not run")
                _print_row(r)
                rows.append(r)
            continue
        s = state

        def hutch(planned=planned, s=s) -> list[Row]:
            h = _hutchinson(ctx, s["model"], s["head"].conv.weight, s["batches"],
                            s["r64"].trace)
            cb = h["seconds"] / s["t_b"]
            return [target_row(
                ctx, planned[2][0], planned[2][1], f"{cb:.0f}x", cb >= 1000, ">= 1000",
                f"{h['probes_1pct']} probes x {h['per_probe_s']:.2f} s for 1% (sd from "
                f"{h['probes_run']} run); mean vs exact {h['mean_rel_diff']:.1e}",
                {**h, "ratio": cb})]

        def bp(planned=planned, s=s) -> list[Row]:
            d = _backpack(ctx, s["model"], s["head"].conv_name, s["classes"], s["batches"])
            db = d["seconds"] / s["t_b"]
            note = f"{d['seconds']:.2f} s, sub-batches of {d['sub_batch']}"
            if d["trace"] is None:
                note += f"; extrapolated from {d['samples_run']} of {d['n']} samples"
            else:
                d["rel_diff_gauss_newton"] = _rel(d["trace"], s["r64"].gauss_newton_trace)
                note += f"; vs exact Gauss-Newton trace {d['rel_diff_gauss_newton']:.1e}"
            return [target_row(ctx, planned[3][0], planned[3][1], f"{db:.0f}x", db >= 10,
                               ">= 10", note, {**d, "ratio": db})]

        def memory(planned=planned, s=s) -> list[Row]:
            if not ctx.cuda:
                raise NotRun("peak memory not measured on cpu (torch's CPU allocator keeps "
                             "no peak; tracemalloc does not see tensors)")
            batches = s["batches"]
            if len(batches) < 2:
                raise NotRun("needs at least two batches (--cost-n / --cost-batch)")
            half = batches[: len(batches) // 2]
            n_half = sum(int(y.shape[0]) for _, y in half)
            p1 = _peak_bytes(ctx, lambda: s["exact"](data=half))
            p2 = _peak_bytes(ctx, lambda: s["exact"]())
            ok = p2 <= 1.05 * p1 + 8 * 2**20
            return [target_row(ctx, planned[4][0], planned[4][1],
                               f"{p1 / 2**20:.0f} / {p2 / 2**20:.0f} MiB", ok,
                               "no growth (<= +5% + 8 MiB)", f"N={n_half} / N={a.cost_n}",
                               {"peak_bytes": {str(n_half): p1, str(a.cost_n): p2}})]

        _guarded(rows, planned[2:3], hutch)
        _guarded(rows, planned[3:4], bp)
        _guarded(rows, planned[4:5], memory)
        state.clear()
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------- train


def _train_planned(ctx: Ctx) -> list[tuple[str, str]]:
    out = []
    for name in ctx.args.train_models.split(","):
        out += [(f"train/{name}/throughput", f"train {name}: images/s amp vs fp32"),
                (f"train/{name}/dataloader", f"train {name}: resident vs DataLoader")]
    return [*out, ("train/accuracy", "train: seeded digits run reaches the accuracy band")]


def _synthetic_uint8(n: int, size: int, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _throughput(ctx: Ctx, name: str, row_id: str, row_name: str) -> list[Row]:
    from convflat.models import build_model
    from convflat.train import DeviceData, TrainConfig, make_optimizer, train_step

    a = ctx.args
    x, y = _synthetic_uint8(a.train_n, a.train_size)
    spec = {**TRAIN_MODELS[name], "in_channels": 3, "num_classes": 10,
            "image_size": [a.train_size, a.train_size]}
    torch.manual_seed(0)
    model0 = build_model(spec).to(ctx.device)
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    variants = ([("amp+cl", True, True)] if ctx.cuda else []) + [("fp32+cl", False, True),
                                                                  ("fp32", False, False)]
    cfg = TrainConfig(batch_size=a.train_batch, lr=0.01)
    runs = {}
    for key, amp, cl in variants:
        data = DeviceData(x, y, mean, std, crop_padding=max(1, a.train_size // 8), flip=True,
                          device=ctx.device, channels_last=cl)
        model = copy.deepcopy(model0).train()
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = make_optimizer(model, cfg)
        gen = torch.Generator().manual_seed(0)

        def batches(data=data, gen=gen):
            while True:
                yield from data.epoch(gen, a.train_batch)

        runs[key] = (model, opt, batches(), amp)
    times: dict[str, list[float]] = {k: [] for k in runs}
    warm = 2 if ctx.toy else 5
    for rep in range(a.repeats):
        for key, (model, opt, it, amp) in runs.items():  # round-robin: load hits all alike
            for _ in range(warm if rep == 0 else 0):
                train_step(model, opt, *next(it), autocast=amp)
            ctx.sync()
            t0 = time.perf_counter()
            for _ in range(a.train_steps):
                train_step(model, opt, *next(it), autocast=amp)
            ctx.sync()
            times[key].append(time.perf_counter() - t0)
    ips = {k: a.train_steps * a.train_batch / statistics.median(v) for k, v in times.items()}
    base = "amp+cl" if ctx.cuda else "fp32+cl"
    speedup = ips[base] / ips["fp32"]
    value = ", ".join(f"{k} {v:.0f}" for k, v in ips.items()) + " img/s"
    note = f"{base} / fp32 = {speedup:.2f}x; batch {a.train_batch}, {a.train_size}px"
    if not ctx.cuda:
        note += "; amp not run: bf16 autocast in convflat.train is CUDA-only"
    return [Row(row_id, row_name, "info", value, "report", note,
                {"images_per_s": ips, "speedup": speedup, "batch": a.train_batch,
                 "image": a.train_size, "steps": a.train_steps})]


def _dataloader(ctx: Ctx, name: str, row_id: str, row_name: str) -> list[Row]:
    from convflat.bench import train as bench_train

    a = ctx.args
    spec = {k: v for k, v in TRAIN_MODELS[name].items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train.json"
        argv = ["--datasets", "cifar-synthetic", "--spec", json.dumps(spec),
                "--batch-size", str(a.train_batch), "--steps", str(a.train_steps),
                "--warmup", "1" if ctx.toy else "3", "--repeats", str(a.repeats),
                "--workers", *a.workers.split(","), "--n-synthetic", str(a.train_n),
                "--device", str(ctx.device), "--json", str(out)]
        if ctx.toy:
            argv.append("--no-pil")
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc = bench_train.main(argv)
        if rc:
            raise RuntimeError(f"bench train exited {rc}: {buf.getvalue()[-300:]}")
        res = json.loads(out.read_text())["rows"]
    resident = next(r for r in res if r["pipeline"] == "resident")
    others = [r for r in res if r["pipeline"] != "resident"]
    ratios = {r["pipeline"]: resident["train_images_per_s"] / r["train_images_per_s"]
              for r in others}
    value = f"resident {resident['train_images_per_s']:.0f} img/s; " + ", ".join(
        f"{r['pipeline']} {r['train_images_per_s']:.0f} ({ratios[r['pipeline']]:.2f}x)"
        for r in others)
    return [Row(row_id, row_name, "info", value, "report",
                "python -m convflat.bench train (fp32, channels-last, 32px synthetic); "
                "(ratio) = resident / pipeline", {"rows": res, "ratios": ratios})]


def _accuracy(ctx: Ctx) -> list[Row]:
    from convflat.data import load_prepared, prepare
    from convflat.train import TrainConfig, train

    accs = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = load_prepared(prepare("sklearn-digits", root=tmp))
        devices = [ctx.device] + ([torch.device("cpu")] if ctx.cuda else [])
        for dev in devices:
            cfg = TrainConfig(**DIGITS_TRAIN, device=str(dev))
            rec = train(DIGITS_SPEC, prepared, cfg, Path(tmp) / dev.type, progress=False)
            if rec.get("status") != "ok":
                raise RuntimeError(f"training on {dev} ended with status {rec.get('status')}")
            accs[str(dev)] = float(rec["test_acc"])
    acc = accs[str(ctx.device)]
    ok = acc >= ACC_MIN
    value = ", ".join(f"{d} {v:.3f}" for d, v in accs.items())
    target = f"test acc >= {ACC_MIN}"
    if ctx.cuda:
        delta = abs(acc - accs["cpu"])
        ok = ok and accs["cpu"] >= ACC_MIN and delta <= ACC_DELTA
        target += f", |device - cpu| <= {ACC_DELTA}"
    return [Row("train/accuracy", "train: seeded digits run reaches the accuracy band",
                "pass" if ok else "fail", value, target,
                f"gapcnn w16 d3, {DIGITS_TRAIN['epochs']} epochs, seed 0, sklearn digits",
                {"test_acc": accs})]


def check_train(ctx: Ctx) -> list[Row]:
    """Rows ``train/...`` (see the module docstring)."""
    rows: list[Row] = []
    for name in ctx.args.train_models.split(","):
        i1, i2 = f"train/{name}/throughput", f"train/{name}/dataloader"
        n1, n2 = dict(_train_planned(ctx))[i1], dict(_train_planned(ctx))[i2]
        _guarded(rows, [(i1, n1)], lambda name=name, i1=i1, n1=n1: _throughput(ctx, name, i1, n1))
        _guarded(rows, [(i2, n2)], lambda name=name, i2=i2, n2=n2: _dataloader(ctx, name, i2, n2))
    _guarded(rows, [("train/accuracy", "train: seeded digits run reaches the accuracy band")],
             lambda: _accuracy(ctx))
    return rows


# ------------------------------------------------------------------------------- pipeline


def _pipeline_planned() -> list[tuple[str, str]]:
    return [("pipeline/test-study", "pipeline: config/test.yaml end to end"),
            ("pipeline/one-job", "pipeline: one train + measure job of the first CIFAR-10 "
                                 "study vs the estimate")]


def _source_tree() -> Path:
    """The repository root (Snakefile, config/) above src/convflat, or NotRun."""
    root = Path(__file__).resolve().parents[3]
    if not (root / "Snakefile").is_file() or not (root / "config").is_dir():
        raise NotRun(f"no Snakefile and config/ at {root}: run from the source tree "
                     "(PYTHONPATH=src python -m convflat.bench gpu)")
    if importlib.util.find_spec("snakemake") is None:
        raise NotRun("snakemake is not installed")
    return root


def _snakemake(root: Path, workdir: Path, args: list[str], timeout: float
               ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"),
           "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _tail(text: str, n: int = 400) -> str:
    return " ".join(text.strip().splitlines()[-6:])[-n:]


def _dump_yaml(path: Path, obj: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def _test_study(ctx: Ctx) -> list[Row]:
    import yaml

    root = _source_tree()
    config = yaml.safe_load((root / "config" / "test.yaml").read_text())
    config["device"] = str(ctx.device)
    cores = ctx.args.pipeline_cores or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-gpu-study-") as tmp:
        work = Path(tmp)
        _dump_yaml(work / "config.yaml", config)
        t0 = time.perf_counter()
        proc = _snakemake(root, work, ["--cores", str(cores), "--configfile",
                                       str(work / "config.yaml")], ctx.args.pipeline_timeout)
        seconds = time.perf_counter() - t0
        problems = []
        if proc.returncode != 0:
            problems.append(f"snakemake exited {proc.returncode}: "
                            f"{_tail(proc.stdout + proc.stderr)}")
        records = sorted((work / "results" / "runs").glob("**/train.json"))
        n_runs = len(records)
        for path in records:
            rec = json.loads(path.read_text())
            run = path.parent.relative_to(work / "results" / "runs")
            if rec.get("status") != "ok" or rec.get("device") != str(ctx.device):
                problems.append(f"{run}: train status {rec.get('status')} on "
                                f"{rec.get('device')}")
            meas = path.parent / "measures.json"
            if not meas.is_file() or json.loads(meas.read_text()).get("status") != "ok":
                problems.append(f"{run}: measures.json missing or not ok")
        if proc.returncode == 0 and n_runs == 0:
            problems.append("no run was trained")
    ok = not problems
    return [Row("pipeline/test-study", f"pipeline: config/test.yaml end to end on {ctx.device}",
                "pass" if ok else "fail", f"{seconds:.0f} s, {n_runs} runs",
                "snakemake ok, every run trained and measured on the device",
                "; ".join(problems)[:600] if problems else f"--cores {cores}",
                {"seconds": seconds, "runs": n_runs, "returncode": proc.returncode,
                 "problems": problems, "log_tail": (proc.stdout + proc.stderr)[-4000:]})]


def _first_cifar_study(config: dict) -> tuple[str, dict]:
    for name, study in config["studies"].items():
        if config["datasets"][study["dataset"]]["source"] == "cifar10":
            return name, study
    raise NotRun("config/config.yaml has no CIFAR-10 study")


def _forward_flops(spec: dict, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from convflat.models import build_model

    spec = {**spec, "in_channels": 3, "num_classes": 10}
    if spec["family"] in ("gapcnn", "resnet"):
        spec["image_size"] = [size, size]
    model = build_model(spec).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def _modelled_seconds(root: Path, job_config: dict, study: str, device_kind: str,
                      timeout: float) -> tuple[float | None, str]:
    """Seconds per run that ``snakemake --cores 1 estimate`` models for the job, from a
    config of ESTIMATE_COPIES copies of it (a seed axis), or (None, reason)."""
    config = copy.deepcopy(job_config)
    config["studies"][study]["grid"]["seed"] = list(range(ESTIMATE_COPIES))
    with tempfile.TemporaryDirectory(prefix="bench-gpu-estimate-") as tmp:
        work = Path(tmp)
        _dump_yaml(work / "config.yaml", config)
        proc = _snakemake(root, work, ["estimate", "--cores", "1", "--configfile",
                                       str(work / "config.yaml")], timeout)
        log = work / "results" / "logs" / "estimate.log"
        text = log.read_text() if log.is_file() else proc.stdout + proc.stderr
    pattern = (r"about ([0-9.]+) h on one H100-class GPU" if device_kind == "gpu"
               else r"about ([0-9.]+) h on a 2-core CPU")
    m = re.search(pattern, text)
    runs = re.search(r"(\d+) runs to train and measure", text)
    if proc.returncode != 0 or not m or not runs or int(runs.group(1)) != ESTIMATE_COPIES:
        return None, f"n/a: could not read the estimate ({_tail(text, 200)})"
    return float(m.group(1)) * 3600.0 / ESTIMATE_COPIES, ""


def _benchmark_seconds(work: Path, rule: str) -> float | None:
    files = sorted((work / "results" / "benchmarks" / rule).glob("**/*.tsv"))
    if not files:
        return None
    lines = files[0].read_text().splitlines()
    return float(lines[1].split("\t")[0]) if len(lines) > 1 else None


def _one_job(ctx: Ctx) -> list[Row]:
    import numpy as np
    import yaml

    root = _source_tree()
    a = ctx.args
    full = yaml.safe_load((root / "config" / "config.yaml").read_text())
    name, study = _first_cifar_study(full)
    study = copy.deepcopy(study)
    study["grid"] = {axis: [values[0]] for axis, values in study["grid"].items()}
    study["train"] = {**study.get("train", {}), "epochs": a.job_epochs}
    study["train"].setdefault("crop_padding", 4)  # CIFAR-10's default augmentation
    study["train"].setdefault("flip", True)
    study["false_friend"] = False
    if ctx.toy:
        study["measure"] = {**study.get("measure", {}), "n_samples": 64,
                            "names": ["conv_trace", "conv_relative_flatness", "frobenius_norm"]}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-job-") as tmp:
        work = Path(tmp)
        n_test = max(1, a.job_n // 5)
        x, y = _synthetic_uint8(a.job_n + n_test, 32)
        npz = work / "synthetic-cifar.npz"
        np.savez(npz, x_train=x[: a.job_n].numpy(), y_train=y[: a.job_n].numpy(),
                 x_test=x[a.job_n:].numpy(), y_test=y[a.job_n:].numpy())
        del x, y
        config = {
            "description": f"bench gpu: one job of {name} on synthetic CIFAR-shaped data",
            "device": str(ctx.device), "gpu": False,
            # the subset makes the estimate count these images (npz: CIFAR's 50000 else)
            "datasets": {study["dataset"]: {"source": f"npz:{npz}", "subset": a.job_n}},
            "studies": {name: study},
            "validation": {"enabled": False}, "notebooks": {"enabled": False},
        }
        _dump_yaml(work / "config.yaml", config)
        proc = _snakemake(root, work, ["--cores", str(a.pipeline_cores or os.cpu_count() or 1),
                                       "--configfile", str(work / "config.yaml"),
                                       "--until", "measure"], a.pipeline_timeout)
        problems = []
        if proc.returncode != 0:
            problems.append(f"snakemake exited {proc.returncode}: "
                            f"{_tail(proc.stdout + proc.stderr)}")
        rec_files = sorted((work / "results" / "runs" / name).glob("**/train.json"))
        meas_files = sorted((work / "results" / "runs" / name).glob("**/measures.json"))
        rec = json.loads(rec_files[0].read_text()) if rec_files else {}
        meas = json.loads(meas_files[0].read_text()) if meas_files else {}
        if rec.get("status") != "ok":
            problems.append(f"train status {rec.get('status')}: {rec.get('error')}")
        if meas.get("status") != "ok":
            problems.append(f"measure status {meas.get('status')}: {meas.get('error')}")
        t_train, t_meas = _benchmark_seconds(work, "train"), _benchmark_seconds(work, "measure")
        run_id = (str(rec_files[0].parent.relative_to(work / "results" / "runs" / name))
                  if rec_files else None)
        spec = rec.get("spec") or {}
        modelled, why = _modelled_seconds(root, config, name, "gpu" if ctx.cuda else "cpu",
                                          a.pipeline_timeout)
    epochs = [h["seconds"] for h in rec.get("history", []) if h.get("seconds")]
    n_train = (rec.get("dataset") or {}).get("n_train") or a.job_n
    data: dict[str, Any] = {"study": name, "run_id": run_id, "epochs": a.job_epochs,
                            "n_train": n_train, "train_job_s": t_train,
                            "measure_job_s": t_meas, "modelled_job_s": modelled,
                            "modelled_note": why, "problems": problems,
                            "log_tail": (proc.stdout + proc.stderr)[-4000:]}
    parts = []
    if t_train is not None and t_meas is not None:
        data["measured_job_s"] = t_train + t_meas
        parts.append(f"measured {t_train + t_meas:.0f} s (train {t_train:.0f} + measure "
                     f"{t_meas:.0f})")
    parts.append(f"modelled {modelled:.0f} s" if modelled is not None else f"modelled {why}")
    if modelled and "measured_job_s" in data:
        data["measured_over_modelled"] = data["measured_job_s"] / modelled
        parts.append(f"ratio {data['measured_over_modelled']:.2f}")
    note = f"{name} {run_id}, {a.job_epochs} epoch(s) of {n_train} images"
    if epochs and spec:
        ips = n_train / statistics.median(epochs)
        flops = _forward_flops({k: v for k, v in spec.items()
                                if k not in ("in_channels", "num_classes", "image_size")}, 32)
        data.update(train_images_per_s=ips, forward_flops=flops,
                    train_tflops=3 * flops * ips / 1e12)
        note += f"; training {ips:.0f} img/s = {3 * flops * ips / 1e12:.2f} TFLOP/s"
    if problems:
        note = "; ".join(problems)[:600]
    return [Row("pipeline/one-job", _pipeline_planned()[1][1], "fail" if problems else "pass",
                ", ".join(parts), "both jobs ok; measured vs modelled reported", note, data)]


def check_pipeline(ctx: Ctx) -> list[Row]:
    """Rows ``pipeline/test-study`` and ``pipeline/one-job`` (see the module docstring)."""
    rows: list[Row] = []
    planned = _pipeline_planned()
    _guarded(rows, planned[:1], lambda: _test_study(ctx))
    _guarded(rows, planned[1:], lambda: _one_job(ctx))
    return rows


# ----------------------------------------------------------------------------------- main


def _planned(ctx: Ctx, check: str) -> list[tuple[str, str]]:
    if check == "exactness":
        return _exactness_planned()
    if check == "cost":
        return [p for m in ctx.args.cost_models.split(",") for p in _cost_planned(m)]
    if check == "train":
        return _train_planned(ctx)
    return _pipeline_planned()


RUNNERS: dict[str, Callable[[Ctx], list[Row]]] = {
    "exactness": check_exactness, "cost": check_cost, "train": check_train,
    "pipeline": check_pipeline,
}


HEADER = "| id | check | status | value | target | note |\n|---|---|---|---|---|---|"


def _cell(text: str, width: int) -> str:
    return text.replace("|", "/")[:width]


def _print_row(r: Row, file=None) -> None:
    print(f"| {r.id} | {r.name} | {r.status} | {_cell(r.value, 160)} | {r.target} | "
          f"{_cell(r.note, 300)} |", file=file or sys.stdout, flush=True)


def print_table(rows: list[Row]) -> None:
    """The summary table (markdown)."""
    print("\n" + HEADER)
    for r in rows:
        _print_row(r)
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)


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


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the table, write the JSON; 1 if a row failed, 2 on misuse."""
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"bench gpu: {exc} (torch {torch.__version__}); use --device cpu for the toy "
              "checks", file=sys.stderr)
        return 2
    toy = device.type != "cuda" if args.toy is None else args.toy
    for opt, full, small in SIZES:
        if getattr(args, opt) is None:
            setattr(args, opt, small if toy else full)
    try:
        only = _names(args.only, "--only", CHECKS) or list(CHECKS)
        skip = _names(args.skip, "--skip", CHECKS)
        _names(args.cost_models, "--cost-models", list(COST_MODELS))
        _names(args.train_models, "--train-models", list(TRAIN_MODELS))
    except UsageError as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return 2
    ctx = Ctx(device, toy, args)
    t_start = time.perf_counter()
    name_dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# bench gpu: device {device} ({name_dev}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {'toy' if toy else 'full'} sizes", flush=True)
    print(HEADER, flush=True)
    rows: list[Row] = []
    ran_all = True

    def write() -> None:
        failed = sum(r.status == "fail" for r in rows)
        atomic_write_json(args.out, {
            "format": FORMAT, **provenance(device=device, seconds=time.perf_counter() - t_start),
            "toy": toy, "checks": {c: c in only and c not in skip for c in CHECKS},
            "args": {k: v for k, v in vars(args).items()},
            "result": "fail" if failed else "pass", "failed": failed,
            "rows": [r.to_dict() for r in rows]})

    for check in CHECKS:
        if check not in only or check in skip:
            ran_all = False
            why = f"skipped: --skip {check}" if check in skip else f"skipped: --only {args.only}"
            for i, n in _planned(ctx, check):
                r = Row(i, n, "not run", note=why)
                _print_row(r)
                rows.append(r)
        else:
            rows.extend(RUNNERS[check](ctx))
        write()
    wall = time.perf_counter() - t_start
    wrow = target_row(ctx, "wall", "wall time of the whole run", f"{wall:.0f} s",
                      wall <= WALL_TARGET_S, f"<= {WALL_TARGET_S:.0f} s",
                      "" if ran_all else "not every check ran", {"seconds": wall})
    if ctx.judged and not ran_all:
        wrow.status = "info"
    _print_row(wrow)
    rows.append(wrow)
    write()
    print_table(rows)
    print(f"JSON: {args.out}")
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
