"""The flatness of the model after every epoch, for train.json's history
(``TrainConfig.track_flatness``): :class:`FlatnessTracker`.

The history keys it fills are :data:`convflat.records.FLATNESS_KEYS`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from convflat.data import DeviceData, normalize, seeded_subset
from convflat.records import FLATNESS_KEYS, error_text

__all__ = ["FLATNESS_KEYS", "FLATNESS_SEED", "FlatnessTracker"]

log = logging.getLogger(__name__)

#: The seed of the training subset the flatness is tracked on: the same images for every
#: run (and, at equal size, the subset the workflow's measures see with their default seed).
FLATNESS_SEED = 0


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
