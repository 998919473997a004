"""What every check of ``bench gpu`` shares: rows, their statuses, the context, the guard
that turns errors into rows, and the table's printing."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

STATUSES = ("pass", "fail", "info", "not run")


@dataclasses.dataclass
class Row:
    """One line of the table and of the JSON file."""

    id: str
    name: str
    status: str
    value: str = ""
    target: str = "-"
    note: str = ""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float | None = None  # wall time of the sub-check that made the row

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; a row not run carries its reason."""
        d = dataclasses.asdict(self)
        if self.status == "not run":
            d["reason"] = self.note
        return d


class NotRun(Exception):
    """Raised inside a check that cannot run here; the message is the reason."""


@dataclasses.dataclass
class Ctx:
    """What every check needs: the device, toy or full sizes, the parsed options."""

    device: torch.device
    toy: bool
    args: argparse.Namespace

    @property
    def cuda(self) -> bool:
        """Whether the device is a CUDA device."""
        return self.device.type == "cuda"

    @property
    def judged(self) -> bool:
        """Whether the performance targets are judged: on CUDA at full size only."""
        return self.cuda and not self.toy

    def sync(self) -> None:
        """Wait for the device (CUDA); timings need it."""
        if self.cuda:
            torch.cuda.synchronize(self.device)


def target_row(ctx: Ctx, id: str, name: str, value: str, ok: bool, target: str,
               note: str = "", data: dict | None = None) -> Row:
    """A row with a performance target: pass/fail where judged, else info saying so."""
    if ctx.judged:
        status = "pass" if ok else "fail"
    else:
        status = "info"
        why = "target judged on cuda only" if not ctx.cuda else "target judged at full size only"
        note = f"{why}; {note}" if note else why
    return Row(id, name, status, value, target, note, data or {})


_OOM = tuple({getattr(torch, "OutOfMemoryError", MemoryError),
              getattr(torch.cuda, "OutOfMemoryError", MemoryError), MemoryError})


def guarded(rows: list[Row], planned: list[tuple[str, str]], fn: Callable[[], list[Row]]
             ) -> list[Row]:
    """Run one sub-check; turn NotRun, out-of-memory and any other error into rows for the
    ``planned`` (id, name) pairs it did not deliver: not run, not run, fail."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except NotRun as exc:
        out = [Row(i, n, "not run", note=str(exc)) for i, n in planned]
    except _OOM as exc:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        msg = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        out = [Row(i, n, "not run", note=f"out of memory: {msg}") for i, n in planned]
    except Exception as exc:
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        out = [Row(i, n, "fail", note=f"error: {msg}") for i, n in planned]
    done = {r.id for r in out}
    out += [Row(i, n, "fail", note="the check produced no row") for i, n in planned
            if i not in done]
    for r in out:
        r.seconds = time.perf_counter() - t0
        print_row(r)
    rows.extend(out)
    return out

def rel(a: float, b: float) -> float:
    """|a - b| / |b|."""
    return abs(a - b) / max(abs(b), 1e-300)


def block_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| relative to the largest |b| (block traces)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))



HEADER = "| id | check | status | value | target | note |\n|---|---|---|---|---|---|"


def _cell(text: str, width: int) -> str:
    return text.replace("|", "/")[:width]


def print_row(r: Row, file=None) -> None:
    """One row of the table, printed at once."""
    print(f"| {r.id} | {r.name} | {r.status} | {_cell(r.value, 160)} | {r.target} | "
          f"{_cell(r.note, 300)} |", file=file or sys.stdout, flush=True)


def not_run(rows: list[Row], planned: list[tuple[str, str]], why: str) -> None:
    """Rows ``not run`` with reason ``why`` for the ``planned`` (id, name) pairs, printed
    and appended to ``rows``."""
    for i, n in planned:
        r = Row(i, n, "not run", note=why)
        print_row(r)
        rows.append(r)


def print_table(rows: list[Row]) -> None:
    """The summary table (markdown)."""
    print("\n" + HEADER)
    for r in rows:
        print_row(r)
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()), flush=True)
