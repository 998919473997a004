"""The training hyperparameters, :class:`TrainConfig`, in a module without torch.

``convflat train --help`` builds its flags from these fields and the workflow's schema is
checked against them, so they live apart from :mod:`convflat.train`, which imports torch;
:mod:`convflat.train` re-exports :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Protocol

from convflat.errors import OptionError

__all__ = ["OPTIMIZERS", "SCHEDULES", "TrainConfig"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")


class _Augmented(Protocol):
    """What :meth:`TrainConfig.resolve` reads of a dataset (a :class:`convflat.data.Prepared`
    has it): its default augmentation, ``{"crop_padding": int, "flip": bool}``."""

    @property
    def augment(self) -> Mapping[str, Any]: ...


def _option(default: Any, help: str, **meta: Any) -> Any:
    """A TrainConfig field: its default and its help text (with units), which the command
    line (``convflat train --help``) and the tests of the workflow's schema read."""
    return dataclasses.field(default=default, metadata={"help": help, **meta})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every training hyperparameter, with its unit. The loss is plain cross-entropy (no
    label smoothing): the flatness measures are of that loss.

    Each field's ``metadata["help"]`` is its documentation; ``convflat train`` turns every
    field into a flag with that help, and the workflow's config schema (the ``train`` block
    of a study) must list the same fields with the same defaults (tests/test_workflow.py).
    """

    # -- length and stopping
    epochs: int = _option(30, "epochs to run; with stop_loss, the cap")
    stop_loss: float | None = _option(
        None, "stop after the first epoch whose training cross-entropy (eval mode, full "
        "split, nats) is below this, e.g. 0.01 (unset: run all epochs)")
    divergence_factor: float | None = _option(
        10.0, "diverged: stop as soon as an epoch's training loss exceeds this many times the "
        "initial loss (the loss is the eval-mode one of stop_loss when set, else the epoch's "
        "mean minibatch loss; docs/training.md); 0 or unset: off")
    divergence_patience: int | None = _option(
        10, "diverged: stop when the training loss stays above the initial loss for this "
        "many epochs in a row; 0 or unset: off")
    # -- optimisation
    batch_size: int = _option(128, "images per step (the last partial batch is dropped)")
    optimizer: str = _option("sgd", "sgd (heavy-ball momentum) or adam",
                             choices=OPTIMIZERS)
    lr: float = _option(0.1, "peak learning rate (per step)")
    momentum: float = _option(0.9, "SGD momentum; Adam's beta1 (beta2 = 0.999)")
    nesterov: bool = _option(False, "Nesterov momentum (SGD only)")
    weight_decay: float = _option(5e-4, "L2 coefficient added to the gradient (not decoupled)")
    schedule: str = _option("cosine", "learning-rate schedule: constant, step, or cosine (to "
                            "0 at the last epoch)", choices=SCHEDULES)
    warmup_epochs: float = _option(0.0, "linear warm-up from lr / steps to lr, in epochs")
    step_milestones: tuple[float, ...] = _option(
        (0.5, 0.75), "step schedule: fractions of the epochs at which lr decays")
    step_gamma: float = _option(0.1, "step schedule: factor of each decay")
    # -- augmentation, on tensors on the device
    crop_padding: int | None = _option(
        None, "random crop after zero-padding by this many pixels per side; 0 turns it off "
        "(unset: the dataset's, 4 for CIFAR, 0 for the 8 x 8 digits)")
    flip: bool | None = _option(
        None, "random horizontal flips, p = 1/2 (unset: the dataset's, on for CIFAR-10/100, "
        "off for digits)")
    # -- reproducibility and hardware
    seed: int = _option(0, "seed of the initial weights, data order, augmentation and dropout")
    amp: bool = _option(True, "on CUDA, bf16 autocast for the training steps")
    channels_last: bool = _option(
        True, "train in the channels-last memory format (faster steps with cuDNN, and with "
        "oneDNN on a CPU: docs/benchmarks.md)")
    eval_batch_size: int = _option(1000, "images per forward pass when measuring losses")
    # -- measurement along the way
    track_flatness: int | None = _option(
        1024, "after every epoch, the exact conv trace and relative flatness (docs/math.md "
        "Eqs. (7), (9)) on this many training images (a seeded subset, seed 0, the same for "
        "every run) into the history; 0 or unset: off")
    device: str = _option("auto", "auto, cpu, cuda or cuda:<i>")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> None:
            raise OptionError(key, f"TrainConfig.{key} {why}, got {getattr(self, key)!r}")

        for key in ("epochs", "batch_size", "eval_batch_size"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be a positive integer")
        if self.stop_loss is not None and not self.stop_loss > 0:
            bad("stop_loss", "must be positive or None")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"must be one of {SCHEDULES}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be positive and finite")
        if not 0 <= self.momentum < 1:
            bad("momentum", "must be in [0, 1)")
        if not self.weight_decay >= 0:
            bad("weight_decay", "must be >= 0")
        if not 0 <= self.warmup_epochs <= self.epochs:
            bad("warmup_epochs", "must be in [0, epochs]")
        if not (isinstance(self.step_milestones, tuple)
                and all(0 < m <= 1 for m in self.step_milestones)):
            bad("step_milestones", "must be a tuple of fractions in (0, 1]")
        if not self.step_gamma > 0:
            bad("step_gamma", "must be positive")
        if self.crop_padding is not None and (not isinstance(self.crop_padding, int)
                                              or self.crop_padding < 0):
            bad("crop_padding", "must be a non-negative integer or None")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            bad("nesterov", "needs optimizer='sgd' and momentum > 0")
        for key in ("track_flatness", "divergence_patience"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                bad(key, "must be a non-negative integer or None")
        factor = self.divergence_factor
        if factor is not None and (isinstance(factor, bool)
                                   or not isinstance(factor, (int, float))
                                   or not (factor == 0 or (factor > 1 and math.isfinite(factor)))):
            bad("divergence_factor", "must be 0 (off), None (off) or a finite number > 1")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``step_milestones`` as a list)."""
        d = dataclasses.asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict (JSON/YAML); an unknown key or a bad value is an
        :class:`convflat.errors.OptionError` (a ValueError) whose ``key`` is the field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise OptionError(unknown[0], f"unknown training option {unknown[0]!r} "
                              f"(options: {', '.join(sorted(names))})")
        d = dict(d)
        if "step_milestones" in d:
            d["step_milestones"] = tuple(float(m) for m in d["step_milestones"])
        return cls(**d)

    def resolve(self, prepared: _Augmented) -> TrainConfig:
        """A copy with ``crop_padding`` and ``flip`` taken from the dataset when None."""
        aug = prepared.augment
        return dataclasses.replace(
            self,
            crop_padding=(int(aug["crop_padding"]) if self.crop_padding is None
                          else self.crop_padding),
            flip=bool(aug["flip"]) if self.flip is None else self.flip,
        )
