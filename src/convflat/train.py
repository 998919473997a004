"""Floor 2: training, with the whole dataset on the device and augmentation on tensors.

One run = :func:`train` (spec, prepared data, :class:`TrainConfig`, output directory). It
writes, in ``out_dir``:

``init.pt``        the initial weights (``convflat-model/1``; distance-from-init measures)
``checkpoint.pt``  after every epoch, atomically: weights, optimizer, scheduler, the data
                   generator and the global RNG states, history; removed when the run ends
``model.pt``       the final weights (``convflat-model/1``: ``{"format", "spec", "state_dict"}``)
``train.json``     spec, hyperparameters, stopping, metrics and provenance (see :func:`train`;
                   the format is :mod:`convflat.records`)

Steps: :func:`plan_run` (settings resolved against the data) -> :func:`setup_run` (weights,
device data, initial loss, optimizer, a checkpoint restored) -> :func:`fit` (the epoch loop,
with the divergence rule :func:`divergence_reason`) -> :func:`finish_run` (final metrics) ->
:func:`record_run` (train.json), over one :class:`Run` and its :class:`RunState`.

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
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from convflat.data import (
    DeviceData,
    Prepared,
    data_identity,
    load_prepared,
    normalize,
    seeded_generator,
)
from convflat.io import (
    METRICS,
    atomic_torch_save,
    first_difference,
    iter_batches,
    provenance,
    resolve_device,
)
from convflat.models import build_model, normalize_spec, save_checkpoint
from convflat.records import (
    CHECKPOINT_FILE,
    DIVERGED_REASONS,
    FLATNESS_KEYS,
    INIT_FILE,
    MODEL_FILE,
    RECORD_FILE,
    STOP_REASONS,
    TRAIN_FORMAT,
    RecordError,
    error_text,
    read_train_record,
    write_train_record,
)
from convflat.tracking import FLATNESS_SEED, FlatnessTracker
from convflat.train_config import TrainConfig

__all__ = [  # DeviceData, the records' names and the tracker are re-exported from here
    "CHECKPOINT_FILE", "DIVERGED_REASONS", "FAILED_FORMAT", "FLATNESS_KEYS", "FLATNESS_SEED",
    "INIT_FILE", "MODEL_FILE", "RECORD_FILE", "STALE_CHECKPOINT_FILE", "STOP_REASONS",
    "TRAIN_FORMAT", "DeviceData", "FlatnessTracker", "Run", "RunState", "TrainConfig",
    "divergence_reason", "error_text", "evaluate", "finish_run", "fit", "lr_factor",
    "make_optimizer", "make_scheduler", "plan_run", "record_run", "run_hash_of",
    "run_identity", "setup_run", "spec_for", "train", "train_or_record_failure", "train_step",
    "watched_loss",
]

log = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------------------------
# The run object: plan, set up, fit, record
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """What a run has done so far; saved in ``checkpoint.pt`` after every epoch and restored
    from it on resume. ``stop_reason`` is one of :data:`STOP_REASONS` once the run stops."""

    epoch: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stop_reason: str | None = None
    resumes: int = 0

    @property
    def diverged(self) -> bool:
        """Whether the run stopped by a divergence rule (:func:`divergence_reason`)."""
        return self.stop_reason in DIVERGED_REASONS


@dataclasses.dataclass
class Run:
    """One training run: its settings (:func:`plan_run`), the objects :func:`setup_run`
    builds (model, optimizer, scheduler, the data generator, the device data, the flatness
    tracker, the initial loss and parameter count) and its :class:`RunState`."""

    spec: dict[str, Any]
    cfg: TrainConfig
    prepared: Prepared
    out_dir: Path
    device: torch.device
    identity: dict[str, Any]
    progress: bool | None = None
    t_start: float = dataclasses.field(default_factory=time.perf_counter)
    seconds_before: float = 0.0  # wall time of earlier sessions of a resumed run
    model: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
    gen: torch.Generator | None = None
    data: DeviceData | None = None
    tracker: FlatnessTracker | None = None
    initial_loss: float | None = None
    n_params: int | None = None
    state: RunState = dataclasses.field(default_factory=RunState)

    @property
    def amp(self) -> bool:
        """bf16 autocast for the training steps (CUDA only)."""
        return self.cfg.amp and self.device.type == "cuda"

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (:meth:`DeviceData.steps_per_epoch`)."""
        return self.data.steps_per_epoch(self.cfg.batch_size)

    def seconds(self) -> float:
        """Wall time over all sessions so far."""
        return self.seconds_before + time.perf_counter() - self.t_start


def plan_run(spec: dict[str, Any], prepared: Prepared | str | os.PathLike,
             cfg: TrainConfig | dict[str, Any], out_dir: str | os.PathLike,
             progress: bool | None = None) -> Run:
    """The settings of a run, resolved against the data (spec keys, augmentation, device),
    and its output directory made, without the temporary files a killed job left there."""
    t_start = time.perf_counter()
    prepared = prepared if isinstance(prepared, Prepared) else load_prepared(prepared)
    cfg = cfg if isinstance(cfg, TrainConfig) else TrainConfig.from_dict(cfg)
    cfg = cfg.resolve(prepared)
    spec = spec_for(spec, prepared)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (MODEL_FILE, INIT_FILE, CHECKPOINT_FILE, RECORD_FILE):
        for stale in out_dir.glob(f".{name}.*.tmp"):  # left by a job killed mid-write
            stale.unlink(missing_ok=True)
    return Run(spec=spec, cfg=cfg, prepared=prepared, out_dir=out_dir,
               device=resolve_device(cfg.device), identity=run_identity(spec, cfg, prepared),
               progress=progress, t_start=t_start)


def setup_run(run: Run, *, resume: bool = True) -> None:
    """Build the run's objects, in the order that fixes its random numbers: the weights
    right after ``torch.manual_seed(seed)`` (written to init.pt), then the data generator,
    the device data, the initial loss (eval mode, no random numbers), the tracker, the
    optimizer and the scheduler; then, if ``resume`` and a checkpoint exists, its state.
    Call it inside ``torch.random.fork_rng``."""
    cfg = run.cfg
    torch.manual_seed(cfg.seed)
    model = build_model(run.spec).to(run.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    save_checkpoint(run.out_dir / INIT_FILE, model, run.spec,  # the same file on resume
                    data=data_identity(run.prepared))
    run.model, run.gen = model, seeded_generator(cfg.seed, "train_data")
    p = run.prepared
    run.data = DeviceData(p.x_train, p.y_train, p.mean, p.std, crop_padding=cfg.crop_padding,
                          flip=cfg.flip, device=run.device, channels_last=cfg.channels_last)
    run.initial_loss = evaluate(model, run.data.eval_batches(cfg.eval_batch_size))[0]
    run.n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.track_flatness:
        tracked = cfg.tracked_measures  # the weights now are the initial ones (init.pt)
        run.tracker = FlatnessTracker(
            run.data, cfg.track_flatness, cfg.eval_batch_size, measures=tracked,
            init_model=copy.deepcopy(model) if tracked else None, every=cfg.track_every)
    else:
        run.tracker = None
    run.optimizer = make_optimizer(model, cfg)
    run.scheduler = make_scheduler(run.optimizer, cfg, run.steps_per_epoch)
    ckpt = run.out_dir / CHECKPOINT_FILE
    if resume and ckpt.is_file():
        run.state = _restore(ckpt, run)
        run.state.resumes += 1
        log.info("resuming %s after epoch %d", run.out_dir, run.state.epoch)
    run.seconds_before = run.state.seconds


def divergence_reason(losses: list[float], initial_loss: float | None,
                      cfg: TrainConfig) -> str | None:
    """The divergence rule (docs/training.md) on a run's per-epoch training losses so far
    (``losses[-1]``: the epoch just trained): "diverged_non_finite" when the last is NaN or
    infinite; "diverged_factor" when it exceeds ``cfg.divergence_factor`` times
    ``initial_loss``; "diverged_patience" when each of the last ``cfg.divergence_patience``
    exceeds ``initial_loss``; else None. A factor or patience of 0 (or None) turns that rule
    off; so does an initial loss that is not finite."""
    last = losses[-1]
    if not math.isfinite(last):
        return "diverged_non_finite"
    if initial_loss is None or not math.isfinite(initial_loss):
        return None
    if cfg.divergence_factor and last > cfg.divergence_factor * initial_loss:
        return "diverged_factor"
    n = cfg.divergence_patience
    if n and len(losses) >= n and all(v > initial_loss for v in losses[-n:]):
        return "diverged_patience"
    return None


def watched_loss(entry: dict[str, Any]) -> float:
    """The training loss of a history entry that the divergence rule reads: the eval-mode
    loss on the whole training split where the run measures it (with ``stop_loss``), else the
    epoch's mean minibatch loss (NaN when it was not finite)."""
    value = entry["train_loss_eval"] if entry["train_loss_eval"] is not None else entry["loss"]
    return math.nan if value is None else float(value)


def fit(run: Run) -> None:
    """The epoch loop: train an epoch, measure the training loss when stopping on it, apply
    the divergence rule and the stopping rule, measure the flatness (tracker), checkpoint."""
    cfg, state = run.cfg, run.state
    bar = tqdm(total=cfg.epochs, initial=state.epoch, desc=run.out_dir.name or "train",
               unit="epoch", disable=None if run.progress is None else not run.progress,
               leave=False)
    try:
        while state.stop_reason is None and state.epoch < cfg.epochs:
            t0 = time.perf_counter()
            entry = _train_epoch(run)
            state.epoch += 1
            state.stop_reason = _stop_reason(run, entry)
            if run.tracker is not None and not state.diverged:
                entry.update(run.tracker.measure(
                    run.model, run.tracker.due(state.epoch, state.stop_reason is not None)))
            entry["seconds"] = time.perf_counter() - t0
            state.history.append(entry)
            state.seconds = run.seconds()
            if not state.diverged:
                _save_state(run)
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4g}", acc=f"{entry['acc']:.3f}",
                            lr=f"{entry['lr']:.3g}")
            log.info("epoch %d/%d: loss %.4g, acc %.4f%s, lr %.3g, %.2f s", entry["epoch"],
                     cfg.epochs, entry["loss"], entry["acc"],
                     "" if entry["train_loss_eval"] is None
                     else f", eval train loss {entry['train_loss_eval']:.4g}",
                     entry["lr"], entry["seconds"])
    finally:
        bar.close()


def _train_epoch(run: Run) -> dict[str, Any]:
    """One epoch of steps; its history entry (mean minibatch loss and accuracy, the learning
    rates of its first and last steps), with one host sync."""
    model, optimizer, data = run.model, run.optimizer, run.data
    lr = optimizer.param_groups[0]["lr"]  # at the epoch's first step
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.device)
    count = 0
    lr_end = lr
    for xb, yb in data.epoch(run.gen, run.cfg.batch_size):
        lr_end = optimizer.param_groups[0]["lr"]  # of the step about to be taken
        loss, right = train_step(model, optimizer, xb, yb, run.scheduler, autocast=run.amp)
        loss_sum += loss.double() * yb.shape[0]
        correct += right
        count += int(yb.shape[0])
    entry = {"epoch": run.state.epoch + 1, "lr": lr, "lr_end": lr_end,
             "loss": float(loss_sum) / count, "acc": int(correct) / count,
             "train_loss_eval": None, "train_acc_eval": None}
    if run.tracker is not None:
        entry.update(dict.fromkeys(run.tracker.keys()))
    return entry


def _stop_reason(run: Run, entry: dict[str, Any]) -> str | None:
    """After the epoch of ``entry``: measure the training loss if the run stops on it, then
    the divergence rule, the target loss and the epoch cap, in this order."""
    cfg, state = run.cfg, run.state
    if math.isfinite(entry["loss"]) and cfg.stop_loss is not None:
        loss_eval, acc_eval = evaluate(run.model, run.data.eval_batches(cfg.eval_batch_size))
        entry.update(train_loss_eval=loss_eval, train_acc_eval=acc_eval)
    losses = [watched_loss(e) for e in (*state.history, entry)]
    reason = divergence_reason(losses, run.initial_loss, cfg)
    if reason is None and cfg.stop_loss is not None and entry["train_loss_eval"] < cfg.stop_loss:
        reason = "target_loss"
    if reason is None and state.epoch >= cfg.epochs:
        reason = "epochs" if cfg.stop_loss is None else "cap"
    return reason


def finish_run(run: Run) -> tuple[str, dict[str, Any]]:
    """The run's status ("ok" or "diverged") and its final metrics (null when diverged)."""
    if run.state.diverged:
        return "diverged", _null_metrics()
    metrics = _final_metrics(run.model, run.data, run.prepared, run.cfg, run.device)
    if not math.isfinite(metrics["train_loss"]):
        run.state.stop_reason = "diverged_non_finite"
        return "diverged", _null_metrics()
    return "ok", metrics


def record_run(run: Run, status: str, metrics: dict[str, Any],
               error: str | None = None) -> dict[str, Any]:
    """Write train.json (through :func:`convflat.records.write_train_record`) and return
    its content; the keys are those of :func:`train`'s docstring."""
    cfg, state = run.cfg, run.state
    record: dict[str, Any] = {
        "format": TRAIN_FORMAT, "spec": run.spec, "config": cfg.to_dict(),
        "run_hash": run_hash_of(run.identity), "dataset": run.prepared.describe(),
        "stopping": {"criterion": "epochs" if cfg.stop_loss is None else "train_loss",
                     "target": cfg.stop_loss, "cap": cfg.epochs},
        "files": {"model": MODEL_FILE, "init": INIT_FILE},
        **provenance(device=run.device, seed=cfg.seed, seconds=run.seconds(), status=status),
        "epochs_run": state.epoch, "stop_reason": state.stop_reason,
        "converged": status == "ok" and state.stop_reason in ("epochs", "target_loss"),
        "steps": state.epoch * run.steps_per_epoch, **metrics,
        "initial_loss": run.initial_loss, "n_params": run.n_params,
        "lr_at_stop": _lr_at_stop(state.history),
        "flatness_tracking": run.tracker and run.tracker.describe(),
        "history": state.history, "resumes": state.resumes, "error": error,
    }
    return write_train_record(run.out_dir / RECORD_FILE, _with_versions(record))


def train(spec: dict[str, Any], prepared: Prepared | str | os.PathLike,
          cfg: TrainConfig | dict[str, Any], out_dir: str | os.PathLike,
          progress: bool | None = None, *, resume: bool = True) -> dict[str, Any]:
    """Train the model ``spec`` describes on ``prepared`` and write ``out_dir``; return the
    content of ``train.json``.

    Stopping: without ``cfg.stop_loss``, exactly ``cfg.epochs`` epochs (``stop_reason``
    "epochs"); with it, after the first epoch whose training cross-entropy, measured in eval
    mode on the full un-augmented training split, is below ``stop_loss`` ("target_loss"), or
    after ``cfg.epochs`` epochs ("cap", ``converged`` false). A run that diverges
    (:func:`divergence_reason`: a non-finite loss, a loss above ``divergence_factor`` times
    the initial loss, or above the initial loss for ``divergence_patience`` epochs) stops
    with ``status`` "diverged", ``stop_reason`` naming the rule and null metrics; this is not
    an exception. Another error writes ``status`` "failed" with the message and is
    re-raised.

    Resume: if ``out_dir/checkpoint.pt`` exists (and ``resume``), the run continues after the
    last completed epoch; the checkpoint must come from the same spec, hyperparameters and
    data (else ValueError naming the first difference).

    ``train.json`` (:data:`convflat.records.TRAIN_KEYS`): ``format``, provenance (versions,
    ``device``, ``seed``, ``seconds`` of wall time over all sessions, ``status``), ``spec``,
    ``config`` (with the augmentation resolved), ``run_hash``, ``dataset``, ``stopping``
    {criterion, target, cap}, ``epochs_run``, ``stop_reason``, ``converged``, ``steps``,
    ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (eval mode, full splits,
    losses in nats), ``loss_gap`` = test - train loss, ``acc_gap`` = train - test accuracy,
    ``test_error``, ``train_loss_clean`` / ``train_acc_clean`` (against the labels before
    noise), ``initial_loss`` (the training cross-entropy of the initial weights, measured as
    ``train_loss_eval``), ``n_params`` (trainable parameters), ``lr_at_stop`` (the learning
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
    run = plan_run(spec, prepared, cfg, out_dir, progress)
    with torch.random.fork_rng(devices=_cuda_devices(run.device)):
        setup_run(run, resume=resume)
        try:
            fit(run)
            status, metrics = finish_run(run)
        except Exception as exc:
            record_run(run, "failed", _null_metrics(), error=f"{type(exc).__name__}: {exc}")
            raise
    save_checkpoint(run.out_dir / MODEL_FILE, run.model, run.spec,
                    data=data_identity(run.prepared))
    record = record_run(run, status, metrics)
    (run.out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    log.info("%s: %s after %d epochs (%s), train acc %s, test acc %s, %.1f s", run.out_dir,
             status, run.state.epoch, run.state.stop_reason, metrics["train_acc"],
             metrics["test_acc"], record["seconds"])
    return record


def _cuda_devices(device: torch.device) -> list[int]:
    """The CUDA devices whose RNG ``fork_rng`` saves and restores for ``device``."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


# --------------------------------------------------------------------------------------------
# The workflow's policy: a run that fails is recorded, not raised
# --------------------------------------------------------------------------------------------

#: Format of the small stand-in files written for ``model.pt`` / ``init.pt`` of a failed run.
FAILED_FORMAT = "convflat-failed/1"
STALE_CHECKPOINT_FILE = "checkpoint.stale.pt"


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
        record = _failed_record(record_path)
        if record.get("status") != "failed":
            record = {
                **provenance(device=cfg.get("device"), seed=cfg.get("seed"),
                             seconds=time.perf_counter() - start, status="failed"),
                "format": TRAIN_FORMAT, "spec": spec, "config": cfg,
                "epochs_run": 0, "converged": False, **dict.fromkeys(METRICS),
            }
        record["error"] = error_text(exc)
        record["run_id"] = run_id
        write_train_record(record_path, record)
        for name in (MODEL_FILE, INIT_FILE):
            if not (out_dir / name).is_file():
                atomic_torch_save(out_dir / name, {"format": FAILED_FORMAT, "status": "failed",
                                                   "error": record["error"], "spec": spec})
        log.info("run recorded as failed: %s", record["error"])
        return record


def _failed_record(path: Path) -> dict[str, Any]:
    """The train.json that :func:`train` left at ``path`` ({} if none, or unreadable)."""
    try:
        return read_train_record(path)
    except (FileNotFoundError, RecordError):
        return {}


def _lr_at_stop(history: list[dict]) -> float | None:
    """The learning rate of the last step taken (None before the first epoch)."""
    return history[-1]["lr_end"] if history else None


def _save_state(run: Run) -> None:
    """The resumable checkpoint: a ``convflat-model/1`` file plus ``train_state``."""
    state = run.state
    train_state = {
        "identity": run.identity,
        "epoch": state.epoch, "history": state.history, "seconds": state.seconds,
        "stop_reason": state.stop_reason, "resumes": state.resumes,
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "data_rng": run.gen.get_state(), "cpu_rng": torch.get_rng_state(),
        "cuda_rng": (torch.cuda.get_rng_state(run.device) if run.device.type == "cuda"
                     else None),
    }
    save_checkpoint(run.out_dir / CHECKPOINT_FILE, run.model, run.spec, train_state=train_state)


def _restore(path: Path, run: Run) -> RunState:
    """Load a checkpoint written by :func:`_save_state` into the run's freshly built
    objects; return the state it saved."""
    try:
        ckpt = torch.load(path, map_location=run.device, weights_only=True)
        ts = ckpt["train_state"]
    except Exception as exc:  # any unreadable checkpoint gets one message
        raise ValueError(f"{path} is not a resumable convflat checkpoint ({exc}); delete it "
                         "to start the run again") from exc
    diff = _first_difference(ts["identity"], run.identity)
    if diff:
        raise ValueError(f"{path} belongs to another run ({diff}); delete it or choose "
                         "another output directory")
    run.model.load_state_dict(ckpt["state_dict"])
    run.optimizer.load_state_dict(ts["optimizer"])
    run.scheduler.load_state_dict(ts["scheduler"])
    run.gen.set_state(ts["data_rng"].cpu())
    torch.set_rng_state(ts["cpu_rng"].cpu())
    if ts["cuda_rng"] is not None and run.device.type == "cuda":
        torch.cuda.set_rng_state(ts["cuda_rng"].cpu(), run.device)
    return RunState(**{k: ts[k] for k in ("epoch", "history", "seconds", "stop_reason",
                                          "resumes")})


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
