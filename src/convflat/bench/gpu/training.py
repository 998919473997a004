"""``bench gpu``'s check ``train``: training throughput (``bench train``'s protocol,
:func:`convflat.bench.train.time_training`), the resident pipeline against DataLoaders
(``bench train`` itself, in-process) and a seeded digits run's accuracy."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from convflat.bench.gpu.common import Ctx, Row, guarded

ACC_MIN, ACC_DELTA = 0.93, 0.03
TRAIN_MODELS: dict[str, dict[str, Any]] = {
    "resnet20-cifar": {"family": "resnet", "depth": 20},
    "gapcnn-w64": {"family": "gapcnn", "width": 64, "depth": 6},
    "resnet8-w4": {"family": "resnet", "depth": 8, "width": 4},
    "gapcnn-w8": {"family": "gapcnn", "width": 8, "depth": 2},
}
DIGITS_SPEC = {"family": "gapcnn", "width": 16, "depth": 3}
DIGITS_TRAIN = {"epochs": 10, "batch_size": 64, "lr": 0.1, "seed": 0}
ACCURACY = ("train/accuracy", "train: seeded digits run reaches the accuracy band")


def planned(ctx: Ctx) -> list[tuple[str, str]]:
    """The (id, name) pairs of the check's rows."""
    out = []
    for name in ctx.args.train_models.split(","):
        out += [(f"train/{name}/throughput", f"train {name}: images/s amp vs fp32"),
                (f"train/{name}/dataloader", f"train {name}: resident vs DataLoader")]
    return [*out, ACCURACY]


def synthetic_uint8(n: int, size: int, classes: int = 10, seed: int = 0):
    """``n`` random CIFAR-shaped uint8 images of side ``size`` and their random labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _variants(ctx: Ctx, name: str) -> dict[str, tuple]:
    """variant -> (endless batch stream, training step): amp+cl (CUDA only), fp32+cl, fp32."""
    from convflat.models import build_model
    from convflat.train import DeviceData, TrainConfig, make_optimizer, train_step

    a = ctx.args
    x, y = synthetic_uint8(a.train_n, a.train_size)
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

        def batches(data=data):
            gen = torch.Generator().manual_seed(0)
            while True:
                yield from data.epoch(gen, a.train_batch)

        runs[key] = (batches(), lambda xb, yb, m=model, o=opt, amp=amp:
                     train_step(m, o, xb, yb, autocast=amp))
    return runs


def _throughput(ctx: Ctx, name: str, row: tuple[str, str]) -> list[Row]:
    from convflat.bench.train import time_training

    a = ctx.args
    times = time_training(_variants(ctx, name), ctx.device, repeats=a.repeats,
                          warmup=2 if ctx.toy else 5, steps=a.train_steps, data=False)
    ips = {k: a.train_steps * a.train_batch / statistics.median(v) for k, v in times.items()}
    base = "amp+cl" if ctx.cuda else "fp32+cl"
    speedup = ips[base] / ips["fp32"]
    value = ", ".join(f"{k} {v:.0f}" for k, v in ips.items()) + " img/s"
    note = f"{base} / fp32 = {speedup:.2f}x; batch {a.train_batch}, {a.train_size}px"
    if not ctx.cuda:
        note += "; amp not run: bf16 autocast in convflat.train is CUDA-only"
    return [Row(*row, "info", value, "report", note,
                {"images_per_s": ips, "speedup": speedup, "batch": a.train_batch,
                 "image": a.train_size, "steps": a.train_steps})]


def _dataloader(ctx: Ctx, name: str, row: tuple[str, str]) -> list[Row]:
    from convflat.bench import train as bench_train

    a = ctx.args
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train.json"
        argv = ["--datasets", "cifar-synthetic", "--spec", json.dumps(TRAIN_MODELS[name]),
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
    return [Row(*row, "info", value, "report",
                "python -m convflat.bench train (fp32, channels-last, 32px synthetic); "
                "(ratio) = resident / pipeline", {"rows": res, "ratios": ratios})]


def _accuracy(ctx: Ctx) -> list[Row]:
    from convflat.data import load_prepared, prepare
    from convflat.train import TrainConfig, train

    accs = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = load_prepared(prepare("sklearn-digits", root=tmp))
        for dev in [ctx.device] + ([torch.device("cpu")] if ctx.cuda else []):
            cfg = TrainConfig(**DIGITS_TRAIN, device=str(dev))
            rec = train(DIGITS_SPEC, prepared, cfg, Path(tmp) / dev.type, progress=False)
            if rec.get("status") != "ok":
                raise RuntimeError(f"training on {dev} ended with status {rec.get('status')}")
            accs[str(dev)] = float(rec["test_acc"])
    acc = accs[str(ctx.device)]
    ok = acc >= ACC_MIN
    target = f"test acc >= {ACC_MIN}"
    if ctx.cuda:
        ok = ok and accs["cpu"] >= ACC_MIN and abs(acc - accs["cpu"]) <= ACC_DELTA
        target += f", |device - cpu| <= {ACC_DELTA}"
    return [Row(*ACCURACY, "pass" if ok else "fail",
                ", ".join(f"{d} {v:.3f}" for d, v in accs.items()), target,
                f"gapcnn w16 d3, {DIGITS_TRAIN['epochs']} epochs, seed 0, sklearn digits",
                {"test_acc": accs})]


def check_train(ctx: Ctx) -> list[Row]:
    """Rows ``train/...`` (see :mod:`convflat.bench.gpu`)."""
    rows: list[Row] = []
    plan = planned(ctx)
    for i, name in enumerate(ctx.args.train_models.split(",")):
        r1, r2 = plan[2 * i], plan[2 * i + 1]
        guarded(rows, [r1], lambda name=name, r1=r1: _throughput(ctx, name, r1))
        guarded(rows, [r2], lambda name=name, r2=r2: _dataloader(ctx, name, r2))
    guarded(rows, [ACCURACY], lambda: _accuracy(ctx))
    return rows
