"""The run records, ``train.json`` and ``measures.json``: their keys, format versions, a writer
and a reader each. No torch: the analysis and the workflow read the records through this
module without importing it.

Writers check that a record carries its format and every key of its layout before the file
is written (atomically, :func:`convflat.io.atomic_write_json`); readers check the format and
fill the keys added after a file was written (``initial_loss`` and ``n_params`` of
train.json) with None, so code that reads records never meets a missing key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from convflat.io import METRICS, STATUSES, atomic_write_json

__all__ = [
    "CHECKPOINT_FILE", "DIVERGED_REASONS", "FLATNESS_KEYS", "INIT_FILE", "MEASURES_FILE",
    "MEASURES_FORMAT", "MEASURES_KEYS", "MODEL_FILE", "RECORD_FILE", "STOP_REASONS",
    "TRAIN_FORMAT", "TRAIN_KEYS", "RecordError", "error_text", "history", "is_diverged",
    "read_measures_record", "read_train_record", "write_measures_record",
    "write_train_record",
]

TRAIN_FORMAT = "convflat-train/1"
MEASURES_FORMAT = "convflat-measures/1"

#: The files of a run directory.
MODEL_FILE, INIT_FILE, CHECKPOINT_FILE, RECORD_FILE, MEASURES_FILE = (
    "model.pt", "init.pt", "checkpoint.pt", "train.json", "measures.json")

#: Why a run stopped, train.json's ``stop_reason``. The last three are the divergence rules
#: (docs/training.md): a non-finite training loss, a loss above ``divergence_factor`` times
#: the initial loss, a loss above the initial loss for ``divergence_patience`` epochs.
DIVERGED_REASONS = ("diverged_non_finite", "diverged_factor", "diverged_patience")
STOP_REASONS = ("epochs", "target_loss", "cap", *DIVERGED_REASONS)

#: The per-epoch history keys of the tracked flatness, with the
#: :class:`convflat.curvature.CurvatureResult` field each one holds.
FLATNESS_KEYS = {"conv_trace": "trace", "conv_relative_flatness": "relative_flatness"}

_PROVENANCE = ("convflat_version", "torch_version", "python_version", "device",
               "device_name", "seed", "seconds", "status")

#: The keys of a finished run's train.json (ok or diverged, and failed during training);
#: the meaning of each is in :func:`convflat.train.train`'s docstring and docs/training.md.
TRAIN_KEYS = (
    "format", *_PROVENANCE, "spec", "config", "run_hash", "dataset", "stopping", "files",
    "epochs_run", "stop_reason", "converged", "steps", *METRICS, "train_loss_clean",
    "train_acc_clean", "initial_loss", "n_params", "lr_at_stop", "flatness_tracking",
    "history", "resumes", "error", "torchvision_version",
)
#: What every train.json has, also that of a run recorded as failed before it trained
#: (:func:`convflat.train.train_or_record_failure`).
_TRAIN_REQUIRED = ("format", "status", "spec", "config", "epochs_run", "converged",
                   "error", *METRICS)
#: Keys added after the first records were written: None when absent.
_TRAIN_ADDED = ("initial_loss", "n_params")

#: The keys of measures.json (:func:`convflat.measures.write_measures_json`, and the
#: workflow's record of a run with nothing to measure); more (run_id, checkpoint, ...) may
#: follow as metadata.
MEASURES_KEYS = ("format", *_PROVENANCE, "values", "failed", "skipped", "measures")


class RecordError(ValueError):
    """A file that is not the record it should be; the message names the file."""


def error_text(exc: BaseException) -> str:
    """One line for a JSON record: ``TypeName: message``."""
    return f"{type(exc).__name__}: {exc}".strip()


def is_diverged(record: dict[str, Any]) -> bool:
    """Whether a train.json record is that of a diverged run."""
    return record.get("status") == "diverged"


def history(record: dict[str, Any]) -> list[dict[str, Any]]:
    """A train.json record's per-epoch history (empty for a run that never trained)."""
    return list(record.get("history") or [])


def _check(path: Path, record: dict[str, Any], fmt: str, required: tuple[str, ...]) -> None:
    if not isinstance(record, dict):
        raise RecordError(f"{path}: a {fmt} record must be a JSON object, got "
                          f"{type(record).__name__}")
    if record.get("format") != fmt:
        raise RecordError(f"{path}: format is {record.get('format')!r}, expected {fmt!r}")
    missing = [k for k in required if k not in record]
    if missing:
        raise RecordError(f"{path}: a {fmt} record lacks {', '.join(missing)}")
    if record["status"] not in STATUSES:
        raise RecordError(f"{path}: status {record['status']!r} is not one of {STATUSES}")


def _read(path: str | os.PathLike) -> tuple[Path, Any]:
    path = Path(path)
    try:
        return path, json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path} is not readable JSON ({exc})") from exc


def write_train_record(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` as train.json at ``path`` (atomically) and return it as read back
    (as :func:`convflat.io.atomic_write_json` converts it: NaN becomes null). A record of
    a run that trained must carry all of :data:`TRAIN_KEYS`; one recorded as failed before
    training, at least the required few. Raises RecordError naming the missing keys."""
    path = Path(path)
    trained = record.get("status") != "failed" or "history" in record
    _check(path, record, TRAIN_FORMAT, TRAIN_KEYS if trained else _TRAIN_REQUIRED)
    reason = record.get("stop_reason")
    if reason is not None and reason not in STOP_REASONS:
        raise RecordError(f"{path}: stop_reason {reason!r} is not one of "
                          f"{STOP_REASONS}")
    atomic_write_json(path, record)
    return read_train_record(path)


def read_train_record(path: str | os.PathLike) -> dict[str, Any]:
    """train.json at ``path`` as a dict, checked (format, required keys, status), with the
    keys of later format revisions (``initial_loss``, ``n_params``) None when absent.
    FileNotFoundError when there is none; RecordError for anything else wrong."""
    path, record = _read(path)
    _check(path, record, TRAIN_FORMAT, _TRAIN_REQUIRED)
    for key in _TRAIN_ADDED:
        record.setdefault(key, None)
    return record


def write_measures_record(path: str | os.PathLike, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` as measures.json at ``path`` (atomically; every key of
    :data:`MEASURES_KEYS` required) and return it as read back."""
    path = Path(path)
    _check(path, record, MEASURES_FORMAT, MEASURES_KEYS)
    atomic_write_json(path, record)
    return read_measures_record(path)


def read_measures_record(path: str | os.PathLike) -> dict[str, Any]:
    """measures.json at ``path`` as a dict, checked (format, :data:`MEASURES_KEYS`,
    status). FileNotFoundError when there is none; RecordError for anything else wrong."""
    path, record = _read(path)
    _check(path, record, MEASURES_FORMAT, MEASURES_KEYS)
    return record
