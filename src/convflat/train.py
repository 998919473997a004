"""Floor 2: training, with the whole dataset on the device and augmentation on tensors.

One run = :func:`train` (spec, prepared data, :class:`TrainConfig`, output directory). It
writes, in ``out_dir``:

``init.pt``        the initial weights (``convflat-model/1``; distance-from-init measures)
``checkpoint.pt``  after every epoch, atomically: weights, optimizer, scheduler, the data
                   generator and the global RNG states, history; removed when the run ends
``model.pt``       the final weights (``convflat-model/1``: ``{"format", "spec", "state_dict"}``)
``train.json``     spec, hyperparameters, stopping, metrics and provenance (see :func:`train`)

Pipeline (in the style of cifar10-airbench): the uint8 training images are zero-padded once
and kept on the device; each epoch draws one permutation, one crop offset and one flip bit
per image from a ``torch.Generator`` the run owns, and each batch is gathered, cropped,
flipped and normalized there with a single indexing op, so no Python runs per image.

Hardware: training runs in the channels-last memory format (faster with cuDNN and with oneDNN
on CPU) and, on CUDA, under bf16 autocast; measurements run in eval mode in float32 with
float64 sums.

Reproducibility: the weights are initialised right after ``torch.manual_seed(seed)``; the
data order and augmentation come from their own generator derived from the seed; dropout
uses the global RNG, whose state is saved in the checkpoint. The caller's global RNG is left
as it was (``torch.random.fork_rng``). On CPU the same seed gives bit-identical weights, and a
run killed at any point and started again ends with the same weights as one never killed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from convflat.data import Prepared, load_prepared, normalize, seeded_generator
from convflat.io import (
    METRICS,
    atomic_torch_save,
    atomic_write_json,
    first_difference,
    iter_batches,
    provenance,
    resolve_device,
)
from convflat.models import build_model, normalize_spec, save_checkpoint
from convflat.train_config import TrainConfig

log = logging.getLogger(__name__)

TRAIN_FORMAT = "convflat-train/1"
STOP_REASONS = ("epochs", "target_loss", "cap", "diverged")

MODEL_FILE, INIT_FILE, CHECKPOINT_FILE, RECORD_FILE = (
    "model.pt", "init.pt", "checkpoint.pt", "train.json")


# --------------------------------------------------------------------------------------------
# The device-resident data pipeline
# --------------------------------------------------------------------------------------------


class DeviceData:
    """A labelled uint8 image set held on the device, producing augmented, normalized batches.

    ``x`` uint8 (N, C, H, W) is zero-padded once to (N, C, H + 2p, W + 2p) (zero = black, as
    torchvision's ``RandomCrop(padding=p)``); batch image b is
    ``x_pad[i_b, :, oy_b + r, ox_b + s']`` for r < H, s < W, with s' = s, or W - 1 - s when b is
    flipped (two ``gather`` calls on the device), followed by ``(x / 255 - mean) / std`` in
    ``dtype``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 *, crop_padding: int = 0, flip: bool = False,
                 device: str | torch.device = "cpu", channels_last: bool = False,
                 dtype: torch.dtype = torch.float32):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError("DeviceData needs uint8 images (N, C, H, W), got "
                             f"{x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels of shape {tuple(y.shape)} do not match {x.shape[0]} images")
        self.device = torch.device(device)
        self.pad, self.flip = int(crop_padding), bool(flip)
        self.n, self.c, self.h, self.w = (int(s) for s in x.shape)
        p = self.pad
        self.x_pad = F.pad(x, (p, p, p, p)).to(self.device) if p else x.to(self.device)
        self.y = y.to(self.device, torch.int64)
        self.mean, self.std = mean.to(self.device), std.to(self.device)
        self.channels_last, self.dtype = channels_last, dtype
        self._rows = torch.arange(self.h, device=self.device)
        self._cols = torch.arange(self.w, device=self.device)

    def __len__(self) -> int:
        return self.n

    @property
    def images(self) -> torch.Tensor:
        """The un-augmented uint8 images (N, C, H, W), a view of the padded store."""
        p = self.pad
        return self.x_pad[:, :, p : p + self.h, p : p + self.w] if p else self.x_pad

    def steps_per_epoch(self, batch_size: int) -> int:
        """Full batches per epoch (a partial last batch is dropped), at least one."""
        return max(1, self.n // batch_size)

    def epoch(self, generator: torch.Generator,
              batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``steps_per_epoch`` augmented batches ``(x (B, C, H, W) dtype, y (B,))``.

        Draws, in this order and on the CPU: a permutation of N, then (if cropping) N crop
        offsets in [0, 2p], then (if flipping) N flip bits, so the stream is independent of
        the device.
        """
        perm = torch.randperm(self.n, generator=generator)
        offsets = (torch.randint(0, 2 * self.pad + 1, (self.n, 2), generator=generator)
                   if self.pad else None)
        flips = torch.randint(0, 2, (self.n,), generator=generator).bool() if self.flip else None
        perm = perm.to(self.device, non_blocking=True)
        offsets = None if offsets is None else offsets.to(self.device, non_blocking=True)
        flips = None if flips is None else flips.to(self.device, non_blocking=True)
        b = min(batch_size, self.n)
        for i in range(self.steps_per_epoch(batch_size)):
            sl = slice(i * b, (i + 1) * b)
            idx = perm[sl]
            yield self.batch(idx, None if offsets is None else offsets[sl],
                             None if flips is None else flips[sl])

    def batch(self, idx: torch.Tensor, offsets: torch.Tensor | None = None,
              flips: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``idx`` (B,), cropped at ``offsets`` (B, 2) = (row, col) into the padded
        store (None: the un-augmented centre) and mirrored where ``flips`` (B,) is true ->
        normalized (B, C, H, W), labels (B,)."""
        if offsets is None:
            xb = self.images[idx]                                           # (B, C, H, W)
            if flips is not None:
                xb = torch.where(flips.view(-1, 1, 1, 1), xb.flip(3), xb)
        else:
            b, c, wp = idx.numel(), self.c, self.x_pad.shape[3]
            rows = self._rows + offsets[:, :1]                              # (B, H)
            cols = self._cols + offsets[:, 1:]                              # (B, W)
            if flips is not None:
                cols = torch.where(flips[:, None], cols.flip(1), cols)
            # two gathers: faster than one 4-index advanced indexing (docs/benchmarks.md)
            xb = self.x_pad[idx]                                            # (B, C, H+2p, W+2p)
            xb = xb.gather(2, rows[:, None, :, None].expand(b, c, self.h, wp))
            xb = xb.gather(3, cols[:, None, None, :].expand(b, c, self.h, self.w))
        xb = normalize(xb, self.mean, self.std, self.dtype)
        if self.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb, self.y[idx]

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Un-augmented normalized batches in order, for measurement."""
        for i in range(0, self.n, batch_size):
            xb = normalize(self.images[i : i + batch_size], self.mean, self.std, self.dtype)
            yield xb, self.y[i : i + batch_size]


# --------------------------------------------------------------------------------------------
# Steps, schedules, evaluation
# --------------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, coupled L2) or Adam (beta1 = momentum, coupled L2) over all parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999),
                            weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based).

    Warm-up: (step + 1) / W for the first W = round(warmup_epochs * steps_per_epoch) steps.
    Then, with t = (step - W) / (T - W), T = epochs * steps_per_epoch: constant 1; cosine
    (1 + cos(pi t)) / 2; step: gamma ** (number of milestones m with step >= round(m * epochs)
    * steps_per_epoch).
    """
    total = cfg.epochs * steps_per_epoch
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    passed = sum(step >= round(m * cfg.epochs) * steps_per_epoch for m in cfg.step_milestones)
    return cfg.step_gamma**passed


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR of :func:`lr_factor` (call ``step()`` after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, scheduler: Any = None,
               autocast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD/Adam step on mean cross-entropy; returns (batch loss, correct count) as device
    tensors (no host sync). ``autocast``: bf16 autocast on CUDA; the loss is taken in float32."""
    ctx = (torch.autocast(device_type="cuda", dtype=torch.bfloat16) if autocast
           else contextlib.nullcontext())
    with ctx:
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return loss.detach(), (logits.detach().argmax(1) == y).sum()


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, batch_size: int | None = None) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy in [0, 1]) of ``model`` in eval mode over
    ``data`` (a pair of tensors, a DataLoader or an iterable of ``(x, y)`` batches). Logits
    are computed in the model's dtype, the loss is summed in float64. The model's mode is
    restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    try:
        for xb, yb in iter_batches(data, batch_size):
            logits = model(xb).double()
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
            count += int(yb.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate got no samples")
    return loss_sum / count, correct / count


#: The seed of the training subset the flatness is tracked on: the same images for every
#: run (and, at equal size, the subset the workflow's measures see with their default seed).
FLATNESS_SEED = 0
#: The per-epoch history keys of the tracked flatness (CurvatureResult fields in brackets).
FLATNESS_KEYS = {"conv_trace": "trace", "conv_relative_flatness": "relative_flatness"}


class FlatnessTracker:
    """The exact conv trace and relative flatness (docs/math.md Eqs. (7), (9)) of the model
    after each epoch, on a fixed seeded subset of the training split.

    The subset is the first ``n`` images of :func:`convflat.data.seeded_subset` with
    :data:`FLATNESS_SEED`, un-augmented, drawn once from its own generator. Each
    :meth:`measure` is one :func:`convflat.curvature.exact_curvature` call (float64
    products) in a ``torch.random.fork_rng`` block: it draws nothing from the training
    generator or the global RNG, leaves the model in the mode it found it in and touches no
    parameter or gradient, so training goes exactly as without it.

    The call is separate from the stopping rule's evaluation pass: sharing the trunk would
    save the forward pass of the subset's images only (1,024 of the 50,000 of CIFAR-10) and
    would make the stopping loss of those images come from the float64 head instead of the
    model's own forward, so the stop could differ with tracking on and off.

    A model outside the measured class (:class:`convflat.curvature.OutOfClassError`) is
    said once in the log; then :meth:`measure` returns None values and training goes on.
    """

    def __init__(self, data: DeviceData, n: int, batch_size: int):
        from convflat.data import seeded_subset

        x, y = seeded_subset(data.images, data.y, n=n, seed=FLATNESS_SEED)
        self.x, self.y = x, y  # uint8 (n, C, H, W) and labels, on the device
        self.mean, self.std = data.mean, data.std
        self.batch_size = batch_size
        self.n = int(x.shape[0])
        self.error: str | None = None  # set when the model cannot be measured

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The subset as normalized float32 batches (NCHW), in order."""
        for i in range(0, self.n, self.batch_size):
            yield (normalize(self.x[i : i + self.batch_size], self.mean, self.std),
                   self.y[i : i + self.batch_size])

    def describe(self) -> dict[str, Any]:
        """For train.json: the subset and whether the model could be measured."""
        return {"n_samples": self.n, "subset_seed": FLATNESS_SEED,
                "keys": list(FLATNESS_KEYS), "error": self.error}

    def measure(self, model: nn.Module) -> dict[str, float | None]:
        """``{conv_trace, conv_relative_flatness}`` of ``model`` now (None once it failed)."""
        from convflat.curvature import OutOfClassError, exact_curvature

        if self.error is None:
            dev = self.x.device
            devices = [dev.index if dev.index is not None else torch.cuda.current_device()] \
                if dev.type == "cuda" else []
            try:
                with torch.random.fork_rng(devices=devices):
                    res = exact_curvature(model, self.batches(), device=dev)
                return {key: getattr(res, field) for key, field in FLATNESS_KEYS.items()}
            except OutOfClassError as exc:
                self.error = f"not in the measured class: {exc}"
            except ValueError as exc:  # non-finite logits: a net gone bad, not a code error
                self.error = error_text(exc)
            log.warning("flatness over training is off for this run (%s); training goes on",
                        self.error)
        return dict.fromkeys(FLATNESS_KEYS)


# --------------------------------------------------------------------------------------------
# train()
# --------------------------------------------------------------------------------------------


def spec_for(spec: dict[str, Any], prepared: Prepared) -> dict[str, Any]:
    """Fill ``in_channels``, ``num_classes`` (and ``image_size`` for gapcnn/resnet) from the
    data; a value given that contradicts the data is an error naming the key."""
    spec = dict(spec)
    facts = {"in_channels": prepared.in_channels, "num_classes": prepared.num_classes}
    if spec.get("family") in ("gapcnn", "resnet"):
        facts["image_size"] = list(prepared.image_size)
    for key, value in facts.items():
        given = spec.get(key)
        if given is None:
            spec[key] = value
            continue
        if key == "image_size" and isinstance(given, int):
            given = [given, given]
        if (list(given) if key == "image_size" else given) != value:
            raise ValueError(f"spec key {key!r} is {spec[key]!r} but dataset {prepared.name} "
                             f"has {value!r}")
    return normalize_spec(spec)


def run_hash_of(identity: dict[str, Any]) -> str:
    """train.json's ``run_hash``: 16 hex digits of the SHA-256 of :func:`run_identity` as
    sorted-key JSON."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(spec: dict[str, Any], cfg: TrainConfig, prepared: Prepared) -> dict[str, Any]:
    """What makes two runs the same run: the spec, the result-relevant hyperparameters and
    the data. A checkpoint is resumed only if this matches; its hash is ``run_hash``."""
    hp = cfg.to_dict()
    for key in ("device", "eval_batch_size"):
        hp.pop(key)
    data = {"name": prepared.name, "n_train": int(prepared.x_train.shape[0]),
            "n_test": int(prepared.x_test.shape[0]),
            "request": prepared.meta.get("request"),
            "labels": int((prepared.y_train * torch.arange(1, prepared.y_train.numel() + 1)).sum())}
    return json.loads(json.dumps({"spec": spec, "config": hp, "data": data}))


def _first_difference(a: Any, b: Any) -> str | None:
    diff = first_difference(a, b)
    return None if diff is None else f"{diff[0]}: {diff[1]!r} in the checkpoint, {diff[2]!r} now"


def train(spec: dict[str, Any], prepared: Prepared | str | os.PathLike,
          cfg: TrainConfig | dict[str, Any], out_dir: str | os.PathLike,
          progress: bool | None = None, *, resume: bool = True) -> dict[str, Any]:
    """Train the model ``spec`` describes on ``prepared`` and write ``out_dir``; return the
    content of ``train.json``.

    Stopping: without ``cfg.stop_loss``, exactly ``cfg.epochs`` epochs (``stop_reason``
    "epochs"); with it, after the first epoch whose training cross-entropy, measured in eval
    mode on the full un-augmented training split, is below ``stop_loss`` ("target_loss"), or
    after ``cfg.epochs`` epochs ("cap", ``converged`` false). A non-finite loss stops the run
    with ``status`` "diverged" (metrics null); this is not an exception. Another error writes
    ``status`` "failed" with the message and is re-raised.

    Resume: if ``out_dir/checkpoint.pt`` exists (and ``resume``), the run continues after the
    last completed epoch; the checkpoint must come from the same spec, hyperparameters and
    data (else ValueError naming the first difference).

    ``train.json``: ``format``, provenance (versions, ``device``, ``seed``, ``seconds`` of wall
    time over all sessions, ``status``), ``spec``, ``config`` (with the augmentation
    resolved), ``run_hash``, ``dataset``, ``stopping`` {criterion, target, cap},
    ``epochs_run``, ``stop_reason``, ``converged``, ``steps``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (eval mode, full splits, losses in nats), ``loss_gap`` = test
    - train loss, ``acc_gap`` = train - test accuracy, ``test_error``, ``train_loss_clean`` /
    ``train_acc_clean`` (against the labels before noise), ``lr_at_stop`` (the learning
    rate of the last step taken), ``flatness_tracking`` (None when off; else the subset's
    ``n_samples``, ``subset_seed``, ``keys`` and ``error``, why the model could not be
    measured, or None), ``history`` (per epoch: ``lr`` and ``lr_end``, the learning rates of
    its first and last steps, mean minibatch ``loss`` and ``acc`` in train mode, eval-mode
    ``train_loss_eval`` / ``train_acc_eval`` when stopping on it, ``conv_trace`` and
    ``conv_relative_flatness`` at the epoch's end on the subset when tracking, None where the
    model cannot be measured (:class:`FlatnessTracker`), ``seconds``), ``resumes``,
    ``files``, ``error``.

    ``progress``: None shows a bar only on a terminal, True always, False never.
    """
    t_start = time.perf_counter()
    prepared = prepared if isinstance(prepared, Prepared) else load_prepared(prepared)
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    cfg = cfg.resolve(prepared)
    spec = spec_for(spec, prepared)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    amp = cfg.amp and device.type == "cuda"
    channels_last = cfg.channels_last
    identity = run_identity(spec, cfg, prepared)
    run_hash = run_hash_of(identity)
    ckpt_path = out_dir / CHECKPOINT_FILE
    for name in (MODEL_FILE, INIT_FILE, CHECKPOINT_FILE, RECORD_FILE):
        for stale in out_dir.glob(f".{name}.*.tmp"):  # left by a job killed mid-write
            stale.unlink(missing_ok=True)

    record: dict[str, Any] = {
        "format": TRAIN_FORMAT, "spec": spec, "config": cfg.to_dict(), "run_hash": run_hash,
        "dataset": prepared.describe(),
        "stopping": {"criterion": "epochs" if cfg.stop_loss is None else "train_loss",
                     "target": cfg.stop_loss, "cap": cfg.epochs},
        "files": {"model": MODEL_FILE, "init": INIT_FILE},
    }
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        model = build_model(spec).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        save_checkpoint(out_dir / INIT_FILE, model, spec)  # deterministic: same file on resume
        gen = seeded_generator(cfg.seed, "train_data")
        train_data = DeviceData(prepared.x_train, prepared.y_train, prepared.mean, prepared.std,
                                crop_padding=cfg.crop_padding, flip=cfg.flip, device=device,
                                channels_last=channels_last)
        steps = train_data.steps_per_epoch(cfg.batch_size)
        tracker = FlatnessTracker(train_data, cfg.track_flatness, cfg.eval_batch_size) \
            if cfg.track_flatness else None
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, steps)
        state = {"epoch": 0, "history": [], "seconds": 0.0, "stop_reason": None, "resumes": 0}
        if resume and ckpt_path.is_file():
            state = _restore(ckpt_path, identity, model, optimizer, scheduler, gen, device)
            state["resumes"] += 1
            log.info("resuming %s after epoch %d", out_dir, state["epoch"])
        seconds_before = state["seconds"]
        try:
            _fit(model, optimizer, scheduler, gen, train_data, prepared, cfg, state, amp,
                 out_dir, spec, identity, progress, seconds_before, t_start, tracker)
            status = "diverged" if state["stop_reason"] == "diverged" else "ok"
            metrics = _final_metrics(model, train_data, prepared, cfg, device) \
                if status == "ok" else _null_metrics()
            if status == "ok" and not math.isfinite(metrics["train_loss"]):
                status, state["stop_reason"], metrics = "diverged", "diverged", _null_metrics()
        except Exception as exc:
            seconds = seconds_before + time.perf_counter() - t_start
            record.update(provenance(device=device, seed=cfg.seed, seconds=seconds,
                                     status="failed"))
            record.update(epochs_run=state["epoch"], stop_reason=state["stop_reason"],
                          converged=False, steps=state["epoch"] * steps, **_null_metrics(),
                          lr_at_stop=_lr_at_stop(state["history"]),
                          flatness_tracking=tracker and tracker.describe(),
                          history=state["history"], resumes=state["resumes"],
                          error=f"{type(exc).__name__}: {exc}")
            atomic_write_json(out_dir / RECORD_FILE, _with_versions(record))
            raise

    save_checkpoint(out_dir / MODEL_FILE, model, spec)
    seconds = seconds_before + time.perf_counter() - t_start
    converged = status == "ok" and state["stop_reason"] in ("epochs", "target_loss")
    record.update(provenance(device=device, seed=cfg.seed, seconds=seconds, status=status))
    record.update(epochs_run=state["epoch"], stop_reason=state["stop_reason"],
                  converged=converged, steps=state["epoch"] * steps, **metrics,
                  lr_at_stop=_lr_at_stop(state["history"]),
                  flatness_tracking=tracker and tracker.describe(),
                  history=state["history"], resumes=state["resumes"], error=None)
    atomic_write_json(out_dir / RECORD_FILE, _with_versions(record))
    ckpt_path.unlink(missing_ok=True)
    log.info("%s: %s after %d epochs (%s), train acc %s, test acc %s, %.1f s", out_dir, status,
             state["epoch"], state["stop_reason"], metrics["train_acc"], metrics["test_acc"],
             seconds)
    return json.loads((out_dir / RECORD_FILE).read_text())


# --------------------------------------------------------------------------------------------
# The workflow's policy: a run that fails is recorded, not raised
# --------------------------------------------------------------------------------------------

#: Format of the small stand-in files written for ``model.pt`` / ``init.pt`` of a failed run.
FAILED_FORMAT = "convflat-failed/1"
STALE_CHECKPOINT_FILE = "checkpoint.stale.pt"


def error_text(exc: BaseException) -> str:
    """One line for a JSON record: ``TypeName: message``."""
    return f"{type(exc).__name__}: {exc}".strip()


def train_or_record_failure(spec: dict[str, Any], prepared: Prepared | str | os.PathLike,
                            cfg: dict[str, Any], out_dir: str | os.PathLike, *,
                            run_id: str | None = None,
                            progress: bool | None = False) -> dict[str, Any]:
    """:func:`train` one run of a study, and never raise: return the content of train.json.

    A run that diverges is recorded by :func:`train` (status "diverged"). A checkpoint that
    cannot be resumed (another run's, or unreadable) fails before training starts and
    before train.json exists: it is moved to ``checkpoint.stale.pt`` and the run starts
    again. Any other error is recorded: train.json gets status "failed", the error
    (``TypeName: message``) and ``run_id``; ``model.pt`` and ``init.pt``, if training never
    wrote them, become small stand-ins (format :data:`FAILED_FORMAT`) that say so. Every
    output then exists, so a workflow sees the job as done and the rest of the study goes
    on; the tables count the run as failed. ``cfg`` is a TrainConfig as a dict.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    ckpt, record_path = out_dir / CHECKPOINT_FILE, out_dir / RECORD_FILE
    try:
        had_checkpoint = ckpt.is_file()
        try:
            return train(spec, prepared, cfg, out_dir, progress=progress)
        except ValueError:
            if not (had_checkpoint and not record_path.is_file()):
                raise
            log.exception("resuming from %s failed", ckpt)
            log.warning("moving %s to %s and starting the run from scratch", ckpt,
                        STALE_CHECKPOINT_FILE)
            ckpt.replace(ckpt.with_name(STALE_CHECKPOINT_FILE))
            return train(spec, prepared, cfg, out_dir, progress=progress)
    except Exception as exc:  # recorded, not raised: one failed run must not stop the study
        log.exception("training failed")
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        if record.get("status") != "failed":
            record = {
                **provenance(device=cfg.get("device"), seed=cfg.get("seed"),
                             seconds=time.perf_counter() - start, status="failed"),
                "format": TRAIN_FORMAT, "spec": spec, "config": cfg,
                "epochs_run": 0, "converged": False, **dict.fromkeys(METRICS),
            }
        record["error"] = error_text(exc)
        record["run_id"] = run_id
        atomic_write_json(record_path, record)
        for name in (MODEL_FILE, INIT_FILE):
            if not (out_dir / name).is_file():
                atomic_torch_save(out_dir / name, {"format": FAILED_FORMAT, "status": "failed",
                                                   "error": record["error"], "spec": spec})
        log.info("run recorded as failed: %s", record["error"])
        return record


def _lr_at_stop(history: list[dict]) -> float | None:
    """The learning rate of the last step taken (None before the first epoch)."""
    return history[-1]["lr_end"] if history else None


def _fit(model, optimizer, scheduler, gen, data: DeviceData, prepared: Prepared,
         cfg: TrainConfig, state: dict, amp: bool, out_dir: Path, spec: dict, identity: dict,
         progress: bool | None, seconds_before: float, t_start: float,
         tracker: FlatnessTracker | None = None) -> None:
    """The epoch loop: train, maybe measure the train loss and the flatness (``tracker``),
    checkpoint, decide to stop."""
    bar = tqdm(total=cfg.epochs, initial=state["epoch"], desc=out_dir.name or "train",
               unit="epoch", disable=None if progress is None else not progress, leave=False)
    try:
        while state["stop_reason"] is None and state["epoch"] < cfg.epochs:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
            correct = torch.zeros((), dtype=torch.int64, device=data.device)
            count = 0
            lr_end = lr
            for xb, yb in data.epoch(gen, cfg.batch_size):
                lr_end = optimizer.param_groups[0]["lr"]  # of the step about to be taken
                loss, right = train_step(model, optimizer, xb, yb, scheduler, autocast=amp)
                loss_sum += loss.double() * yb.shape[0]
                correct += right
                count += int(yb.shape[0])
            mean_loss = float(loss_sum) / count  # one host sync per epoch
            entry = {"epoch": state["epoch"] + 1, "lr": lr, "lr_end": lr_end,
                     "loss": mean_loss, "acc": int(correct) / count,
                     "train_loss_eval": None, "train_acc_eval": None}
            if tracker is not None:
                entry.update(dict.fromkeys(FLATNESS_KEYS))
            state["epoch"] += 1
            if not math.isfinite(mean_loss):
                state["stop_reason"] = "diverged"
            elif cfg.stop_loss is not None:
                loss_eval, acc_eval = evaluate(model, data.eval_batches(cfg.eval_batch_size))
                entry.update(train_loss_eval=loss_eval, train_acc_eval=acc_eval)
                if not math.isfinite(loss_eval):
                    state["stop_reason"] = "diverged"
                elif loss_eval < cfg.stop_loss:
                    state["stop_reason"] = "target_loss"
            if state["stop_reason"] is None and state["epoch"] >= cfg.epochs:
                state["stop_reason"] = "epochs" if cfg.stop_loss is None else "cap"
            if tracker is not None and state["stop_reason"] != "diverged":
                entry.update(tracker.measure(model))
            entry["seconds"] = time.perf_counter() - t0
            state["history"].append(entry)
            state["seconds"] = seconds_before + time.perf_counter() - t_start
            if state["stop_reason"] != "diverged":
                _save_state(out_dir / CHECKPOINT_FILE, model, spec, optimizer, scheduler, gen,
                            state, identity, data.device)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4g}", acc=f"{entry['acc']:.3f}",
                            lr=f"{entry['lr']:.3g}")
            log.info("epoch %d/%d: loss %.4g, acc %.4f%s, lr %.3g, %.2f s", entry["epoch"],
                     cfg.epochs, mean_loss, entry["acc"],
                     "" if entry["train_loss_eval"] is None
                     else f", eval train loss {entry['train_loss_eval']:.4g}",
                     entry["lr"], entry["seconds"])
    finally:
        bar.close()


def _save_state(path: Path, model, spec, optimizer, scheduler, gen: torch.Generator,
                state: dict, identity: dict, device: torch.device) -> None:
    """The resumable checkpoint: a ``convflat-model/1`` file plus ``train_state``."""
    train_state = {
        "identity": identity,
        "epoch": state["epoch"], "history": state["history"], "seconds": state["seconds"],
        "stop_reason": state["stop_reason"], "resumes": state["resumes"],
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "data_rng": gen.get_state(), "cpu_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }
    save_checkpoint(path, model, spec, train_state=train_state)


def _restore(path: Path, identity: dict, model, optimizer, scheduler, gen: torch.Generator,
             device: torch.device) -> dict:
    """Load a checkpoint written by :func:`_save_state` into the freshly built objects."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        ts = ckpt["train_state"]
    except Exception as exc:  # any unreadable checkpoint gets one message
        raise ValueError(f"{path} is not a resumable convflat checkpoint ({exc}); delete it "
                         "to start the run again") from exc
    diff = _first_difference(ts["identity"], identity)
    if diff:
        raise ValueError(f"{path} belongs to another run ({diff}); delete it or choose "
                         "another output directory")
    model.load_state_dict(ckpt["state_dict"])
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    gen.set_state(ts["data_rng"].cpu())
    torch.set_rng_state(ts["cpu_rng"].cpu())
    if ts["cuda_rng"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(ts["cuda_rng"].cpu(), device)
    return {k: ts[k] for k in ("epoch", "history", "seconds", "stop_reason", "resumes")}


def _final_metrics(model, train_data: DeviceData, prepared: Prepared, cfg: TrainConfig,
                   device: torch.device) -> dict[str, Any]:
    """Losses (nats) and accuracies in eval mode on the full train and test splits."""
    bs = cfg.eval_batch_size
    train_loss, train_acc = evaluate(model, train_data.eval_batches(bs))
    test_loss, test_acc = evaluate(model, _normalized_batches(prepared, "test", device, bs))
    if prepared.meta.get("n_noisy"):
        clean_loss, clean_acc = evaluate(
            model, _normalized_batches(prepared, "train_clean", device, bs))
    else:
        clean_loss, clean_acc = train_loss, train_acc
    return {"train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
            "test_acc": test_acc, "loss_gap": test_loss - train_loss,
            "acc_gap": train_acc - test_acc, "test_error": 1.0 - test_acc,
            "train_loss_clean": clean_loss, "train_acc_clean": clean_acc}


def _null_metrics() -> dict[str, Any]:
    """The metrics of a run that has none (diverged or failed): every key, null."""
    return dict.fromkeys((*METRICS, "train_loss_clean", "train_acc_clean"))


def _normalized_batches(prepared: Prepared, split: str, device: torch.device,
                        batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    x, y = prepared.split(split)
    for i in range(0, x.shape[0], batch_size):
        xb = normalize(x[i : i + batch_size].to(device), prepared.mean, prepared.std)
        yield xb, y[i : i + batch_size].to(device)


def _with_versions(record: dict[str, Any]) -> dict[str, Any]:
    import torchvision

    record["torchvision_version"] = torchvision.__version__
    return record
