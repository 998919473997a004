"""The timing protocol every bench shares: side-by-side repeats, medians, per-repeat ratios.

A shared machine's load changes from second to second, so the benches never compare times
taken apart: :func:`interleaved` runs the competing functions in turn within every repeat
(a, b, c, a, b, c, ...), each after a garbage collection and a device synchronisation, and a
comparison is :func:`median_ratio`, the median of the per-repeat ratios, which that load
disturbs far less than the ratio of separately taken medians. :class:`Peak` measures a
block's peak memory. Nothing here asserts on time.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for ``device`` (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: Mapping[str, Callable[[], Any]], device: torch.device, repeats: int,
                faults: dict[str, list[int]] | None = None) -> dict[str, list[float]]:
    """Seconds of each function per repeat, run in turn within every repeat (a, b, c, a, b,
    c, ...) so that the load of a shared machine hits all of them alike. If ``faults`` is a
    dict, it receives each function's minor page faults per call (``ru_minflt``)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            gc.collect()
            sync(device)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
            if faults is not None:
                faults.setdefault(key, []).append(
                    resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return times


def median_ratio(times: Mapping[str, list[float]], key: str, base: str) -> float:
    """The median over repeats of ``times[key][i] / times[base][i]``."""
    return statistics.median(a / b for a, b in zip(times[key], times[base], strict=True))


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    """The median seconds of each function of :func:`interleaved`."""
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """(median seconds over ``repeats`` calls, the last call's result) of one function."""
    out: list[Any] = []
    times = interleaved({"fn": lambda: out.append(fn())}, device, repeats)
    return statistics.median(times["fn"]), out[-1]


class Peak:
    """Peak memory of a block: the CUDA allocator's peak above what was allocated at the
    start, or on the CPU the growth of the process's max RSS; ``bytes`` and ``mib``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = 0

    def __enter__(self) -> Peak:
        gc.collect()
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> bool:
        sync(self.device)
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base
        return False

    @property
    def mib(self) -> float:
        """The peak in MiB."""
        return self.bytes / 2**20
