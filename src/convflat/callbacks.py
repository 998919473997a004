"""Exact flatness inside your own training loop: :class:`FlatnessCallback`.

Call it after each epoch with the model; every ``every`` epochs it measures the exact conv
trace and relative flatness (docs/math.md Eqs. (7), (9)) and the classifier's, with
:func:`convflat.curvature.exact_curvature` on the data it was given, and returns and logs
them::

    from convflat import FlatnessCallback

    flatness = FlatnessCallback((x_val, y_val), every=1, log=print)
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, ...)
        values = flatness(model, epoch)   # None at the epochs it skips
    flatness.history                      # one dict per measured epoch

The measurement leaves training exactly as it would go without it: the model's weights,
gradients and train/eval flags are untouched (exact_curvature measures in eval mode and
restores the flags), and the torch RNG state is forked around it, so a shuffling
DataLoader passed as ``data`` draws nothing from the training's global generator.
:class:`convflat.lightning.FlatnessLightningCallback` is the same for Lightning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from convflat.curvature import exact_curvature
from convflat.io import resolve_device

__all__ = ["CALLBACK_KEYS", "FlatnessCallback"]

log = logging.getLogger(__name__)

#: The values each measurement returns (besides ``epoch``), with the
#: :class:`convflat.curvature.CurvatureResult` field each one holds.
CALLBACK_KEYS = {
    "conv_trace": "trace",
    "conv_relative_flatness": "relative_flatness",
    "classifier_trace": "classifier_trace",
    "classifier_relative_flatness": "classifier_relative_flatness",
    "loss": "loss",
    "accuracy": "accuracy",
}


class FlatnessCallback:
    """The exact flatness of a model every ``every`` epochs of your own training loop.

    Args:
        data: what the curvature is measured on: a pair of tensors ``(X, Y)``, a DataLoader,
            or any re-iterable of ``(x, y)`` batches (a one-shot iterator is read into a list
            once, here). The same data at every epoch, so the values are comparable.
        every: measure when ``epoch % every == 0`` (epochs counted from 1: with ``every=1``
            every epoch, with ``every=5`` epochs 5, 10, ...).
        layer: the conv to measure (a name from ``model.named_modules()``); the conv that
            feeds global average pooling is found when None.
        batch_size: the batch size when ``data`` is a pair of tensors (default 256).
        device: where to measure: "auto" (CUDA when present), "cpu", "cuda:0", ... or None
            for the device of the model's parameters. A model elsewhere is measured as a copy.
        log: where each measurement goes: None logs one INFO line on the ``convflat.callbacks``
            logger; a callable is called with the returned dict (``print``, ``wandb.log``, a
            list's ``append``); False logs nothing.

    Calling it (``values = callback(model, epoch)``) returns None at the epochs it skips,
    else ``{"epoch", "conv_trace", "conv_relative_flatness", "classifier_trace",
    "classifier_relative_flatness", "loss", "accuracy"}`` (floats; ``loss`` and ``accuracy``
    are the model's on ``data``), also appended to :attr:`history`; :attr:`last` is the
    full :class:`convflat.curvature.CurvatureResult` of the latest measurement (block traces,
    the layer's name). A model outside the measured class raises
    :class:`convflat.curvature.OutOfClassError` at its first measurement, naming the op.
    """

    def __init__(self, data: Any, *, every: int = 1, layer: str | None = None,
                 batch_size: int | None = None, device: str | torch.device | None = "auto",
                 log: Callable[[dict[str, Any]], Any] | bool | None = None):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"FlatnessCallback: every must be a positive integer, got {every!r}")
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError("FlatnessCallback: batch_size must be a positive integer or None, "
                             f"got {batch_size!r}")
        if not (log is None or log is False or callable(log)):
            raise ValueError("FlatnessCallback: log must be None, False or a callable taking "
                             f"the values dict, got {log!r}")
        if isinstance(data, Iterator):  # a generator would be empty at the second epoch
            data = list(data)
        self.data = data
        self.every = every
        self.layer = layer
        self.batch_size = batch_size
        self.device = None if device is None else resolve_device(device)
        self.log = log
        self.history: list[dict[str, Any]] = []
        self.last = None  # the CurvatureResult of the latest measurement

    def due(self, epoch: int) -> bool:
        """Whether ``epoch`` (counted from 1) is one that is measured."""
        return epoch % self.every == 0

    def measure(self, model: nn.Module) -> dict[str, float]:
        """The values of ``model`` now, whatever the epoch (nothing added to the history)."""
        device = self.device
        if device is None:
            param = next(model.parameters(), None)
            device = param.device if param is not None else torch.device("cpu")
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            res = exact_curvature(model, self.data, layer=self.layer, device=device,
                                  batch_size=self.batch_size)
        self.last = res
        return {key: float(getattr(res, field)) for key, field in CALLBACK_KEYS.items()}

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, Any] | None:
        """Measure ``model`` after ``epoch`` (counted from 1) when it is due; the values
        (with ``epoch``) or None."""
        if not self.due(epoch):
            return None
        values = {"epoch": int(epoch), **self.measure(model)}
        self.history.append(values)
        if self.log is None:
            log.info("epoch %d: conv trace %.6g, conv relative flatness %.6g, classifier "
                     "trace %.6g, classifier relative flatness %.6g (%s)", epoch,
                     values["conv_trace"], values["conv_relative_flatness"],
                     values["classifier_trace"], values["classifier_relative_flatness"],
                     self.last.layer)
        elif self.log is not False:
            self.log(dict(values))
        return values
