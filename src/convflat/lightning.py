"""Exact flatness logged by Lightning: :class:`FlatnessLightningCallback`.

Needs Lightning (``pip install "convflat[lightning]"``). Lightning is imported when the
class is first asked for, not before: without it, ``from convflat.lightning import
FlatnessLightningCallback`` raises an ImportError that says how to install it, while
``import convflat`` and ``import convflat.lightning`` work::

    from convflat.lightning import FlatnessLightningCallback

    trainer = lightning.Trainer(max_epochs=30, callbacks=[
        FlatnessLightningCallback((x_val, y_val), every=1)])

At the end of every ``every``-th training epoch it measures the LightningModule (or its
submodule ``module``) with :class:`convflat.callbacks.FlatnessCallback` and logs
``flatness/conv_trace``, ``flatness/conv_relative_flatness``, ``flatness/classifier_trace``
and ``flatness/classifier_relative_flatness`` through ``pl_module.log`` to the Trainer's
logger(s).
"""

from __future__ import annotations

from typing import Any

from convflat.callbacks import FlatnessCallback

# FlatnessLightningCallback is made by the module's __getattr__ on first use
__all__ = ["LOGGED_KEYS", "FlatnessLightningCallback"]  # noqa: F822

#: The values logged each measured epoch, each under ``prefix + key``.
LOGGED_KEYS = ("conv_trace", "conv_relative_flatness", "classifier_trace",
               "classifier_relative_flatness")

_built: dict[str, type] = {}  # the class, made once Lightning is imported


def _lightning() -> Any:
    """``lightning.pytorch``, or an ImportError that says how to install it."""
    try:
        import lightning.pytorch as pl
    except ImportError as exc:  # the optional extra is not installed
        raise ImportError(
            "convflat.lightning.FlatnessLightningCallback needs Lightning, which is not "
            "installed: pip install \"convflat[lightning]\" (or pip install lightning); "
            "convflat.FlatnessCallback works in a plain PyTorch loop without it") from exc
    return pl


def __getattr__(name: str) -> Any:
    if name == "FlatnessLightningCallback":
        if name not in _built:
            _built[name] = _build(_lightning())
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(pl: Any) -> type:
    """The callback class, a subclass of ``lightning.pytorch.Callback``."""

    class FlatnessLightningCallback(pl.Callback):
        """Log the exact conv and classifier trace and relative flatness every ``every`` epochs.

        Args:
            data: what the curvature is measured on (a pair of tensors, a DataLoader, an
                iterable of ``(x, y)`` batches), as :class:`convflat.callbacks.FlatnessCallback`.
            every: measure after epochs ``every``, ``2 every``, ... (counted from 1, that is
                ``trainer.current_epoch + 1``).
            layer: the conv to measure, a name in the measured module; found when None.
            batch_size: the batch size when ``data`` is a pair of tensors.
            device: where to measure; None (the default) for the LightningModule's device.
            module: the attribute of the LightningModule that is the classifier to measure (for
                example ``"model"`` when ``forward`` is ``self.model(x)``); None measures the
                LightningModule itself, whose forward must return the logits.
            prefix: put before each logged key.

        The values are logged at ``on_train_epoch_end`` with ``on_epoch=True`` (so at the
        epoch's step); :attr:`history` holds every measured epoch's values, ``epoch`` included.
        """

        def __init__(self, data: Any, *, every: int = 1, layer: str | None = None,
                     batch_size: int | None = None, device: str | None = None,
                     module: str | None = None, prefix: str = "flatness/"):
            super().__init__()
            self.flatness = FlatnessCallback(data, every=every, layer=layer,
                                             batch_size=batch_size, device=device, log=False)
            self.module = module
            self.prefix = prefix

        @property
        def history(self) -> list[dict[str, Any]]:
            """The values of every measured epoch, oldest first."""
            return self.flatness.history

        def measured_module(self, pl_module: pl.LightningModule):
            """The module whose conv is measured: ``pl_module`` or its attribute ``module``."""
            if self.module is None:
                return pl_module
            target = getattr(pl_module, self.module, None)
            if target is None:
                raise AttributeError(
                    f"FlatnessLightningCallback: module={self.module!r}: "
                    f"{type(pl_module).__name__} has no such attribute")
            return target

        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            """Measure and log when the epoch is due (skipped in the sanity check)."""
            if trainer.sanity_checking:
                return
            values = self.flatness(self.measured_module(pl_module), trainer.current_epoch + 1)
            if values is None:
                return
            pl_module.log_dict({self.prefix + key: values[key] for key in LOGGED_KEYS},
                               on_step=False, on_epoch=True)

    # found by pickle (and by Lightning's checkpoints) through this module's __getattr__
    FlatnessLightningCallback.__qualname__ = "FlatnessLightningCallback"
    return FlatnessLightningCallback
