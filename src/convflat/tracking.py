"""The flatness of the model after every epoch, for train.json's history
(``TrainConfig.track_flatness``): :class:`FlatnessTracker`.

The history keys it fills are :data:`convflat.records.FLATNESS_KEYS` and, with
``TrainConfig.track_measures``, the names of the tracked measures of the registry
(:data:`convflat.measures.MEASURES`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from convflat.data import DeviceData, normalize, seeded_subset
from convflat.errors import OptionError
from convflat.records import FLATNESS_KEYS, error_text
from convflat.train_config import TRACK_CHEAP, TRACK_DENSE_EPOCHS

__all__ = ["FLATNESS_KEYS", "FLATNESS_SEED", "TRACK_CHEAP", "FlatnessTracker",
           "check_tracked_measures"]

log = logging.getLogger(__name__)

#: The seed of the training subset the flatness is tracked on: the same images for every
#: run (and, at equal size, the subset the workflow's measures see with their default seed).
FLATNESS_SEED = 0


def check_tracked_measures(names: list[str] | tuple[str, ...]) -> list[str]:
    """``names`` as a list, each a registered measure other than the two tracked always
    (:data:`FLATNESS_KEYS`); else an :class:`convflat.errors.OptionError` whose key is
    ``track_measures``."""
    from convflat.measures import MEASURES

    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise OptionError("track_measures", (
            f"TrainConfig.track_measures: unknown measure(s) {', '.join(map(repr, unknown))} "
            f"(registered: {', '.join(MEASURES)})"))
    twice = [n for n in names if n in FLATNESS_KEYS]
    if twice:
        raise OptionError("track_measures", (
            f"TrainConfig.track_measures: {', '.join(map(repr, twice))} "
            "is tracked by track_flatness already; leave it out"))
    return list(names)


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

    ``measures`` (``TrainConfig.track_measures``): registry names measured at the same time,
    in the same block, on the same images, through
    :meth:`convflat.measures.Measure.run` on one :class:`convflat.measures.Context` (with
    its default parameters and seed 0, so each value is what
    ``compute_measures(model, (x, y), init_model=init, names=[name])`` gives on the
    subset). The Context shares the exact curvature with the conv keys, so the
    classifier-layer measures cost nothing more. ``init_model`` (the weights at
    initialisation) is needed by ``distance_from_init``. A measure that fails at an epoch
    gives None there; its first error is kept in :attr:`measure_errors` (and said once in
    the log), and it is tried again at the next epoch. ``every``
    (``TrainConfig.track_every``): after the first :data:`TRACK_DENSE_EPOCHS` epochs the
    tracked measures are taken every ``every`` epochs and at the last one only
    (:meth:`due`); the conv keys every epoch.
    """

    def __init__(self, data: DeviceData, n: int, batch_size: int,
                 measures: list[str] | tuple[str, ...] = (),
                 init_model: nn.Module | None = None, every: int = 1):
        x, y = seeded_subset(data.images, data.y, n=n, seed=FLATNESS_SEED)
        self.x, self.y = x, y  # uint8 (n, C, H, W) and labels, on the device
        self.mean, self.std = data.mean, data.std
        self.batch_size = batch_size
        self.n = int(x.shape[0])
        self.error: str | None = None  # set when the model cannot be measured
        self.measures = check_tracked_measures(measures)
        self.init_model = init_model
        self.measure_errors: dict[str, str] = {}  # name -> its first failure
        self.every = int(every)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The subset as normalized float32 batches (NCHW), in order."""
        for i in range(0, self.n, self.batch_size):
            yield (normalize(self.x[i : i + self.batch_size], self.mean, self.std),
                   self.y[i : i + self.batch_size])

    def describe(self) -> dict[str, Any]:
        """For train.json: the subset, the history keys, whether the model could be
        measured (``error``), and the first error of each tracked measure that failed."""
        return {"n_samples": self.n, "subset_seed": FLATNESS_SEED,
                "keys": [*FLATNESS_KEYS, *self.measures], "error": self.error,
                "measure_errors": dict(self.measure_errors)}

    def keys(self) -> list[str]:
        """The history keys this tracker fills."""
        return [*FLATNESS_KEYS, *self.measures]

    def due(self, epoch: int, last: bool) -> bool:
        """Whether the tracked measures are taken after ``epoch`` (1-based): within the first
        :data:`TRACK_DENSE_EPOCHS`, at every ``every``-th epoch, and at the last one."""
        return last or epoch <= TRACK_DENSE_EPOCHS or epoch % self.every == 0

    def measure(self, model: nn.Module, measures: bool = True) -> dict[str, float | None]:
        """``{conv_trace, conv_relative_flatness, <tracked measures>}`` of ``model`` now
        (the conv keys None once they failed; a tracked measure None where it failed, and
        all of them None when ``measures`` is false)."""
        from convflat.curvature import OutOfClassError
        from convflat.measures import MEASURES, Context

        out: dict[str, float | None] = dict.fromkeys(self.keys())
        todo = self.measures if measures else []
        if self.error is not None and not todo:
            return out
        dev = self.x.device
        devices = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            ctx = Context(model, list(self.batches()), init_model=self.init_model,
                          device=dev, seed=FLATNESS_SEED)
            if self.error is None:
                try:
                    res = ctx.exact()
                    out.update({key: getattr(res, field)
                                for key, field in FLATNESS_KEYS.items()})
                except OutOfClassError as exc:
                    self.error = f"not in the measured class: {exc}"
                except ValueError as exc:  # non-finite logits: a net gone bad, not a bug
                    self.error = error_text(exc)
                if self.error is not None:
                    log.warning("flatness over training is off for this run (%s); training "
                                "goes on", self.error)
            for name in todo:
                entry = MEASURES[name].run(ctx)
                if entry["status"] == "ok":
                    out[name] = entry["value"]
                elif name not in self.measure_errors:
                    self.measure_errors[name] = entry["error"] or entry["status"]
                    log.warning("tracked measure %s failed (%s); it is None where it fails",
                                name, self.measure_errors[name])
        return out
