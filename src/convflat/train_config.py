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

__all__ = ["OPTIMIZERS", "SCHEDULES", "TRACK_CHEAP", "TRACK_DENSE_EPOCHS", "TrainConfig",
           "track_names"]

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")

#: The measures ``track_measures: cheap`` (the default) tracks every epoch: those that cost
#: nothing (norms of the weights) or one forward pass over the tracked subset (the margins,
#: the classifier layer's exact curvature, shared with the conv trace's). Every other
#: registered measure (Hessian-vector products, sharpness, PAC-Bayes, ...) is costly: it is
#: tracked only when named and ``track_costly`` is true.
TRACK_CHEAP = (
    "frobenius_norm", "spectral_norm_sum", "spectral_norm_balanced_sum",
    "spectral_norm_product", "path_norm", "distance_from_init", "inverse_margin",
    "classifier_trace", "classifier_relative_flatness",
)

#: The first epochs at which the tracked measures are measured every epoch, whatever
#: ``track_every`` says.
TRACK_DENSE_EPOCHS = 50


def track_names(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    """The measure names of a ``track_measures`` value: a comma-separated string or a list
    of names, where ``cheap`` stands for :data:`TRACK_CHEAP`; None or empty: none. The
    names are not checked here (:class:`TrainConfig` and the tracker check them)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        item = item.strip() if isinstance(item, str) else item
        for name in TRACK_CHEAP if item == "cheap" else (item,):
            if name and name not in out:
                out.append(name)
    return tuple(out)


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
    track_measures: str | tuple[str, ...] | None = _option(
        "cheap", "with track_flatness, also these measures of the registry after every epoch "
        "on the same images, each into the history under its name: a comma-separated "
        "string or a list of names; 'cheap' is the norms, spectral norms, path norm, "
        "distance from init, inverse margin and the classifier-layer trace and relative "
        "flatness (TRACK_CHEAP, about one forward pass); empty or unset: none")
    track_every: int = _option(
        10, "after the first 50 epochs, the track_measures every this many epochs (and at "
        "the last epoch; null in the history between); 1: every epoch. The conv trace and "
        "relative flatness are tracked every epoch regardless")
    track_costly: bool = _option(
        False, "allow costly measures (Hessian-vector products, sharpness, PAC-Bayes, any "
        "measure outside track_measures' 'cheap') in track_measures")
    device: str = _option("auto", "auto, cpu, cuda or cuda:<i>")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> None:
            raise OptionError(key, f"TrainConfig.{key} {why}, got {getattr(self, key)!r}")

        for key in ("epochs", "batch_size", "eval_batch_size", "track_every"):
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
        self._check_track_measures()
        factor = self.divergence_factor
        if factor is not None and (isinstance(factor, bool)
                                   or not isinstance(factor, (int, float))
                                   or not (factor == 0 or (factor > 1 and math.isfinite(factor)))):
            bad("divergence_factor", "must be 0 (off), None (off) or a finite number > 1")

    def _check_track_measures(self) -> None:
        """``track_measures`` is a string, a list of strings or None (a list is kept as a
        tuple); a name outside :data:`TRACK_CHEAP` needs ``track_costly``. Whether a name is
        registered is checked by the tracker (:mod:`convflat.tracking`), which has the
        registry (this module imports no torch)."""
        value = self.track_measures
        if isinstance(value, list):
            value = tuple(value)
            object.__setattr__(self, "track_measures", value)
        if not isinstance(self.track_costly, bool):
            raise OptionError("track_costly", f"TrainConfig.track_costly must be true or "
                              f"false, got {self.track_costly!r}")
        if value is not None and not isinstance(value, str) and not (
                isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            raise OptionError("track_measures", "TrainConfig.track_measures must be a "
                              "comma-separated string, a list of measure names or None, "
                              f"got {value!r}")
        costly = [n for n in track_names(value) if n not in TRACK_CHEAP]
        if costly and not self.track_costly:
            raise OptionError("track_measures", (
                f"TrainConfig.track_measures: {', '.join(map(repr, costly))} "
                f"{'is' if len(costly) == 1 else 'are'} not among the cheap measures tracked "
                f"every epoch ({', '.join(TRACK_CHEAP)}; 'cheap' for all of them); a costly "
                "measure (Hessian-vector products, sharpness, PAC-Bayes) is tracked only "
                "with track_costly: true"))

    @property
    def tracked_measures(self) -> tuple[str, ...]:
        """The measure names tracked every epoch besides the conv flatness (none when
        ``track_flatness`` is off)."""
        return track_names(self.track_measures) if self.track_flatness else ()

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``step_milestones`` and a ``track_measures``
        tuple as lists)."""
        d = dataclasses.asdict(self)
        d["step_milestones"] = list(self.step_milestones)
        if isinstance(self.track_measures, tuple):
            d["track_measures"] = list(self.track_measures)
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
