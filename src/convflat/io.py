"""Floor 0: devices, atomic writes, provenance and batch iteration.

Nothing here knows about models, configs or Snakemake. Every artifact convflat writes goes
through :func:`atomic_write_json` or :func:`atomic_torch_save`, so a killed job never leaves a
half-written file behind (the file is written next to its target and renamed into place).
The record vocabulary every layer shares (:data:`STATUSES`, :data:`METRICS`) lives here
because this module imports neither torch nor pandas.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: convflat.analysis writes files without it
    import torch

STATUSES = ("ok", "diverged", "failed")

#: The generalization metrics of a run, in the order of the runs table's columns: every
#: train.json carries them (null for a run that diverged or failed), the runs table has one
#: column each, and the analysis takes its targets from them. Losses are mean cross-entropy
#: in nats, accuracies in [0, 1]; loss_gap = test_loss - train_loss, acc_gap = train_acc -
#: test_acc, test_error = 1 - test_acc.
METRICS = ("train_loss", "test_loss", "train_acc", "test_acc", "loss_gap", "acc_gap",
           "test_error")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Map ``"auto"`` (or None) to CUDA when present, else CPU; validate anything else."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} was requested but CUDA is not available")
    return dev


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where Linux allows
    (``/proc/self/status``); elsewhere set and restored at once."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: errno values that mean "the filesystem has no room": full disk, exhausted quota.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """No space left on the device (or quota) while writing ``filename``. The message is one
    line naming the path; the command line prints it and exits with status 1."""

    def __init__(self, path: str | os.PathLike, detail: str = ""):
        super().__init__(errno.ENOSPC, f"no space left on device writing {path}"
                         + (f" ({detail})" if detail else ""), str(path))

    def __str__(self) -> str:
        return self.strerror


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The OSError with errno ENOSPC or EDQUOT in ``exc`` or its chain of causes and contexts
    (torch.save reports a full disk as a RuntimeError about stream positions, with the
    OSError only in its context), or None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _NO_SPACE:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def check_free_space(path: str | os.PathLike, needed: int, what: str = "") -> None:
    """Raise :class:`DiskFullError` before long work when the filesystem that ``path`` will be
    written to has fewer than ``needed`` bytes free (a lower bound of the output's size, so
    that the check never refuses a write that would fit). Missing directories are looked up
    at their nearest existing parent; a filesystem whose free space cannot be read passes."""
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise DiskFullError(path, f"{what or 'the output'}: at least {_size(needed)}, "
                                  f"{_size(free)} free")


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, then rename it into
    place; on any error the temporary file is removed and ``path`` is untouched. The file
    gets mode ``0o666 & ~umask``, as a plain ``open(path, "w")`` would give it. A full disk
    (or quota), however the writer reports it, raises :class:`DiskFullError` naming ``path``."""
    path = Path(path)
    try:
        return _atomic_write(path, write)
    except DiskFullError:
        raise
    except BaseException as exc:
        if disk_full_cause(exc) is not None:
            raise DiskFullError(path) from exc
        raise


def _atomic_write(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; give the file the mode open() would (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _jsonable(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # a tensor can only exist if torch was imported
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch is not None and isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, Path) or (torch is not None and isinstance(obj, torch.device)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON; tensors, numpy scalars and paths are converted.

    NaN becomes null and infinities the strings "inf"/"-inf", so the file stays strict JSON.
    """
    text = dumps_json(obj) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def dumps_json(obj: Any) -> str:
    """Strict, indented JSON of ``obj`` (the conversions of :func:`atomic_write_json`)."""
    return json.dumps(_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode()))


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` atomically."""
    import torch

    return atomic_write(path, lambda fh: torch.save(obj, fh))


def provenance(
    *, device: str | torch.device | None = None, seed: int | None = None,
    seconds: float | None = None, status: str = "ok",
) -> dict[str, Any]:
    """The fields every JSON artifact carries (docs/internal-api.md, floor 0)."""
    import torch

    import convflat

    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    dev = None if device is None else str(device)
    gpu = None
    if dev is not None and dev.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(dev))
    return {
        "convflat_version": convflat.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "device": dev,
        "device_name": gpu or platform.processor() or platform.machine(),
        "seed": seed,
        "seconds": seconds,
        "status": status,
    }


def iter_batches(
    data: Any, batch_size: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches from a DataLoader, an iterable of pairs, or a pair of tensors.

    A pair of tensors ``(X, Y)`` is split into batches of ``batch_size`` (default 256); any
    other input is iterated as is (``batch_size`` is then ignored). Items may be tuples, lists,
    or dicts with keys ``x``/``y``; extra tuple entries are ignored.
    """
    import torch

    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    ):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"inputs and labels differ in length: {x.shape[0]} images, {y.shape[0]} labels"
            )
        bs = int(batch_size or 256)
        if bs <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for i in range(0, x.shape[0], bs):
            yield x[i : i + bs], y[i : i + bs]
        return
    if isinstance(data, torch.Tensor):
        raise TypeError("data is a single tensor; pass (inputs, labels) or a DataLoader")
    if not isinstance(data, Iterable):
        raise TypeError(f"data of type {type(data).__name__} is not iterable")
    for item in data:
        if isinstance(item, dict):
            yield item["x"], item["y"]
        else:
            yield item[0], item[1]


def first_difference(a: Any, b: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """The first place where two nested dicts differ, as ``(dotted key, a's value, b's
    value)`` (a key missing on one side has the value None there); None when they are equal.
    Keys are visited in ``a``'s order, then those only ``b`` has."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            diff = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    return None if a == b else (path, a, b)
