"""Training throughput: the device-resident tensor pipeline against torchvision DataLoaders.

``python -m convflat.bench train [--datasets cifar-synthetic digits] [--repeats 3] ...``

For each dataset, the same model (same initial weights) is trained with the same
augmentation (random crop after zero-padding, horizontal flip) fed by:

* ``resident``: :class:`convflat.train.DeviceData`, the whole uint8 dataset on the device,
  one gather per batch (what ``convflat train`` uses);
* ``loader/tensor/wN``: ``torch.utils.data.DataLoader`` over the uint8 tensors with
  per-image ``torchvision.transforms.v2`` (RandomCrop(padding), RandomHorizontalFlip,
  ToDtype(scale), Normalize), ``num_workers`` N;
* ``loader/pil/wN``: the same over PIL images, as ``torchvision.datasets.CIFAR10`` serves
  them (``Image.fromarray`` per item, then ToImage first).

Each repeat times ``--steps`` optimizer steps after ``--warmup`` steps, round-robin over the
pipelines so background load hits them alike; the table gives median images/s of full
training steps and of the data alone, and the ratio resident / pipeline. Nothing is
asserted: the figures are for docs/training.md.

``python -m convflat.bench train --flatness [--n-synthetic 2048] [--repeats 3]`` instead times
what tracking the flatness over training adds to an epoch's end: the stopping rule's
evaluation pass over the whole training split (:func:`convflat.train.evaluate`, eval mode)
alone, and followed by :class:`convflat.train.FlatnessTracker` (the exact conv trace and
relative flatness on its 1,024-image subset, what ``track_flatness`` does), in turn within
each repeat; the ratio is the median of the per-repeat ratios. Models: the CIFAR ResNet-18
of ``bench curvature`` on synthetic CIFAR-shaped images (``--n-synthetic`` of them are the
training split; the last column projects the ratio to CIFAR-10's 50,000, the evaluation
growing with N and the flatness not), and the quick study's gapcnn nets on the digits.
The figures are for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from convflat.bench.timing import interleaved, median_ratio
from convflat.data import load_prepared, prepare
from convflat.io import resolve_device
from convflat.models import build_model
from convflat.train import (
    DeviceData,
    FlatnessTracker,
    TrainConfig,
    evaluate,
    make_optimizer,
    train_step,
)

#: The models of ``--flatness``: (dataset, name, spec without the data's keys).
FLATNESS_MODELS = (
    ("cifar-synthetic", "resnet18-cifar", {"family": "resnet", "depth": 18}),
    *(("digits", f"gapcnn-w{w}-d{d}-bn", {"family": "gapcnn", "width": w, "depth": d,
                                           "batchnorm": True})
      for w in (8, 16) for d in (2, 3)),
    ("digits", "gapcnn-w16-d3", {"family": "gapcnn", "width": 16, "depth": 3,
                                 "batchnorm": False}),
)
#: The training split the ResNet-18 row is projected to (CIFAR-10).
CIFAR_TRAIN = 50_000


class _TensorImages(Dataset):
    """uint8 (N, C, H, W) images with a per-image transform, like TensorDataset + transform."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), int(self.y[i])


class _PILImages(_TensorImages):
    """As ``torchvision.datasets.CIFAR10``: HWC uint8 numpy -> PIL image per item."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable):
        super().__init__(x, y, transform)
        self.arrays = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
        self.mode = "L" if x.shape[1] == 1 else "RGB"

    def __getitem__(self, i: int):
        from PIL import Image

        a = self.arrays[i]
        img = Image.fromarray(a[..., 0] if self.mode == "L" else a, mode=self.mode)
        return self.transform(img), int(self.y[i])


def _v2_transform(size: tuple[int, int], padding: int, flip: bool, mean, std, pil: bool):
    from torchvision.transforms import v2

    steps = [v2.ToImage()] if pil else []
    if padding:
        steps.append(v2.RandomCrop(size, padding=padding))
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(mean=mean.tolist(), std=std.tolist())]
    return v2.Compose(steps)


def _cycle(make_epoch: Callable[[], Iterator]) -> Iterator:
    while True:
        yield from make_epoch()


def _datasets(names: list[str], n_synthetic: int, tmp: str):
    """name -> (x uint8, y, mean, std, crop padding)."""
    out = {}
    for name in names:
        if name == "cifar-synthetic":
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (n_synthetic, 3, 32, 32), generator=g, dtype=torch.uint8)
            y = torch.randint(0, 10, (n_synthetic,), generator=g)
            mean = torch.full((3,), 0.5)
            std = torch.full((3,), 0.29)
            out[name] = (x, y, mean, std, 4)
        elif name == "digits":
            d = load_prepared(prepare("sklearn-digits", root=tmp))
            out[name] = (d.x_train, d.y_train, d.mean, d.std, 1)
        else:
            raise SystemExit(f"unknown benchmark dataset {name!r} (cifar-synthetic, digits)")
    return out


def _time(batches: Iterator, step: Callable | None, n: int) -> float:
    """Seconds for n batches (each followed by a training step when ``step`` is given)."""
    t0 = time.perf_counter()
    for _ in range(n):
        xb, yb = next(batches)
        if step is not None:
            step(xb, yb)
    return time.perf_counter() - t0


def time_training(runs: Mapping[str, tuple[Iterator, Callable]], device: torch.device, *,
                  repeats: int, warmup: int, steps: int, data: bool = True
                  ) -> dict[str, list[float]]:
    """The training-throughput protocol: ``runs`` maps a name to (an endless stream of
    batches, a training step ``step(x, y)``); within every repeat, each run in turn gets
    ``warmup`` untimed steps, ``steps`` timed steps (seconds under its name) and, with
    ``data``, the stream's next ``steps`` batches alone (under ``"<name>@data"``), so that
    background load hits every run alike (:func:`convflat.bench.timing.interleaved`)."""
    fns: dict[str, Callable[[], float]] = {}
    for key, (stream, step) in runs.items():
        fns[f"{key}@warmup"] = lambda s=stream, st=step: _time(s, st, warmup)
        fns[key] = lambda s=stream, st=step: _time(s, st, steps)
        if data:
            fns[f"{key}@data"] = lambda s=stream: _time(s, None, steps)
    times = interleaved(fns, device, repeats)
    return {k: v for k, v in times.items() if not k.endswith("@warmup")}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convflat.bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["cifar-synthetic", "digits"])
    p.add_argument("--spec", default='{"family": "gapcnn", "width": 16, "depth": 3}',
                   help="model spec (JSON) without in_channels/num_classes/image_size")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                   help="DataLoader num_workers values to compare")
    p.add_argument("--no-pil", action="store_true", help="skip the PIL DataLoader rows")
    p.add_argument("--no-flip", action="store_true", help="crop only")
    p.add_argument("--no-channels-last", action="store_true",
                   help="train in NCHW instead of channels-last (both pipelines alike)")
    p.add_argument("--n-synthetic", type=int, default=10000, help="synthetic CIFAR images")
    p.add_argument("--threads", type=int, help="torch threads of the main process")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the medians to this JSON file")
    p.add_argument("--flatness", action="store_true",
                   help="time evaluation + flatness tracking against evaluation alone "
                        "(see above) instead of the data pipelines")
    p.add_argument("--flatness-images", type=int, default=1024,
                   help="--flatness: the tracked subset (TrainConfig.track_flatness)")
    p.add_argument("--eval-batch-size", type=int, default=1000,
                   help="--flatness: images per evaluation batch (TrainConfig's default)")
    p.add_argument("--models", nargs="+",
                   help="--flatness: only these rows (" +
                        ", ".join(name for _, name, _ in FLATNESS_MODELS) + ")")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with the command-line arguments ``argv``; prints the table."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.flatness:
        return _flatness_main(args, device)
    spec0 = json.loads(args.spec)
    rows = []
    print(f"device {device}, torch threads {torch.get_num_threads()}, batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} repeats, model {spec0}, "
          f"{'NCHW' if args.no_channels_last else 'channels-last'}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in _datasets(args.datasets, args.n_synthetic, tmp).items():
            rows += _bench_dataset(name, data, spec0, device, args)
    _print_table(rows)
    if args.json:
        from convflat.io import atomic_write_json, provenance

        atomic_write_json(args.json, {"rows": rows, **provenance(device=device)})
    return 0


def _bench_dataset(name: str, data: tuple, spec0: dict, device: torch.device,
                   args: argparse.Namespace) -> list[dict]:
    """Rows of one dataset (``data``: :func:`_datasets`' tuple) for every pipeline."""
    x, y, mean, std, pad = data
    flip = not args.no_flip
    size = (int(x.shape[2]), int(x.shape[3]))
    spec = {**spec0, "in_channels": int(x.shape[1]), "num_classes": int(y.max()) + 1}
    if spec["family"] in ("gapcnn", "resnet"):
        spec["image_size"] = list(size)
    torch.manual_seed(0)
    cl = not args.no_channels_last  # as convflat train does by default, for every pipeline
    model0 = build_model(spec).to(device)
    if cl:
        model0 = model0.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.01)
    bs = args.batch_size

    pipelines: dict[str, Callable[[], Iterator]] = {}
    resident = DeviceData(x, y, mean, std, crop_padding=pad, flip=flip, device=device,
                          channels_last=cl)
    gen = torch.Generator().manual_seed(0)
    pipelines["resident"] = lambda: _cycle(lambda: resident.epoch(gen, bs))
    kinds = ["tensor"] if args.no_pil else ["tensor", "pil"]
    loaders = {}
    for kind in kinds:
        tf = _v2_transform(size, pad, flip, mean, std, pil=kind == "pil")
        ds = (_PILImages if kind == "pil" else _TensorImages)(x, y, tf)
        for w in args.workers:
            loader = DataLoader(ds, batch_size=bs, shuffle=True, drop_last=True, num_workers=w,
                                persistent_workers=w > 0, pin_memory=device.type == "cuda")
            loaders[f"loader/{kind}/w{w}"] = loader
    for key, loader in loaders.items():
        pipelines[key] = (lambda ld=loader: _cycle(lambda: (
            (xb.to(device, non_blocking=True).contiguous(memory_format=fmt),
             yb.to(device, non_blocking=True)) for xb, yb in ld)))

    runs = {}
    for key, make in pipelines.items():
        model = copy.deepcopy(model0).train()
        opt = make_optimizer(model, cfg)
        runs[key] = (make(), lambda xb, yb, m=model, o=opt: _sync(train_step(m, o, xb, yb),
                                                                  device))
    times = time_training(runs, device, repeats=args.repeats, warmup=args.warmup,
                          steps=args.steps)
    runs.clear()  # ends the DataLoader iterators and their worker processes
    loaders.clear()
    rows = []
    for key in pipelines:
        n_img = args.steps * bs
        rows.append({"dataset": name, "pipeline": key,
                     "train_images_per_s": n_img / statistics.median(times[key]),
                     "data_images_per_s": n_img / statistics.median(times[f"{key}@data"])})
    return rows


def _flatness_main(args, device: torch.device) -> int:
    """``--flatness``: one Markdown row per model, printed as it finishes."""
    known = [m[1] for m in FLATNESS_MODELS]
    unknown = sorted(set(args.models or ()) - set(known))
    if unknown:
        raise SystemExit(f"unknown --models {unknown}; choose from {known}")
    models = [m for m in FLATNESS_MODELS if not args.models or m[1] in args.models]
    print(f"# device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"flatness on {args.flatness_images} images, evaluation batches of "
          f"{args.eval_batch_size}, median of {args.repeats} repeats")
    print("| dataset | model | N (training split) | evaluation (s) | evaluation + flatness (s) "
          f"| ratio | ratio at N = {CIFAR_TRAIN:,} |")
    print("|---|---|---|---|---|---|---|", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sets = _datasets(sorted({m[0] for m in models}), args.n_synthetic, tmp)
        for dataset, name, spec0 in models:
            x, y, mean, std, _ = sets[dataset]
            spec = {**spec0, "in_channels": int(x.shape[1]), "num_classes": int(y.max()) + 1,
                    "image_size": [int(x.shape[2]), int(x.shape[3])]}
            torch.manual_seed(0)
            model = build_model(spec).to(device).to(memory_format=torch.channels_last)
            data = DeviceData(x, y, mean, std, device=device, channels_last=True)
            tracker = FlatnessTracker(data, args.flatness_images, args.eval_batch_size)

            def ev(model=model, data=data):
                return evaluate(model, data.eval_batches(args.eval_batch_size))

            def ev_flat(model=model, tracker=tracker, ev=ev):
                ev()
                return tracker.measure(model)

            ev_flat()  # warm-up, and the check that the model is measured
            if tracker.error:
                raise SystemExit(f"{name}: {tracker.error}")
            times = interleaved({"eval": ev, "eval+flatness": ev_flat}, device, args.repeats)
            ratio = median_ratio(times, "eval+flatness", "eval")
            n = len(data)
            projected = (1 + (ratio - 1) * n / CIFAR_TRAIN) if dataset == "cifar-synthetic" \
                else None
            row = {"dataset": dataset, "model": name, "n": n,
                   "eval_s": statistics.median(times["eval"]),
                   "eval_flatness_s": statistics.median(times["eval+flatness"]),
                   "ratio": ratio, "ratio_at_cifar10": projected}
            rows.append(row)
            print(f"| {dataset} | {name} | {n} | {row['eval_s']:.3f} | "
                  f"{row['eval_flatness_s']:.3f} | {ratio:.2f} | "
                  f"{'-' if projected is None else f'{projected:.2f}'} |", flush=True)
    if args.json:
        from convflat.io import atomic_write_json, provenance

        atomic_write_json(args.json, {"flatness_rows": rows, **provenance(device=device)})
    return 0


def _sync(out, device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out


def _print_table(rows: list[dict]) -> None:
    base = {r["dataset"]: r for r in rows if r["pipeline"] == "resident"}
    head = (f"{'dataset':<16} {'pipeline':<18} {'train img/s':>12} {'ratio':>7} "
            f"{'data img/s':>12} {'ratio':>7}")
    print(head)
    print("-" * len(head))
    for r in rows:
        b = base[r["dataset"]]
        rt = b["train_images_per_s"] / r["train_images_per_s"]
        rd = b["data_images_per_s"] / r["data_images_per_s"]
        print(f"{r['dataset']:<16} {r['pipeline']:<18} {r['train_images_per_s']:>12.0f} "
              f"{rt:>6.2f}x {r['data_images_per_s']:>12.0f} {rd:>6.2f}x")
    print("ratio = resident images/s / pipeline images/s (higher: the resident pipeline is faster)")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

