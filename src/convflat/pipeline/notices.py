"""What the workflow says about runs that the statistics cannot use.

The Snakemake process prints :func:`failed_runs_notice` at the end of every run, and the
correlation job fails with :func:`no_usable_runs_message` when a study has nothing to
correlate. Both read runs tables as plain records (the csv module: the Snakemake process
imports no pandas) and ask :func:`convflat.usable.unusable_reason`, the one rule of which runs
the statistics use, about each row.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from convflat.usable import unusable_reason

__all__ = ["failed_runs_notice", "no_usable_runs_message", "unusable_reason"]


def _unusable_rows(rows: Sequence[Mapping[str, Any]], *, require_converged: bool
                   ) -> list[tuple[str, str]]:
    """(run label, why) of every row that :func:`unusable_reason` leaves out; the label is
    ``<study>/<run_id>`` when the rows come from several studies (the overall analysis)."""
    pooled = len({str(row.get("study")) for row in rows}) > 1
    out = []
    for row in rows:
        why = unusable_reason(row, require_converged=require_converged)
        if why is not None:
            label = (f"{row.get('study')}/{row.get('run_id')}" if pooled
                     else str(row.get("run_id")))
            out.append((label, why))
    return out


def no_usable_runs_message(rows: Sequence[Mapping[str, Any]], what: str, *,
                           require_converged: bool) -> str | None:
    """None when a runs table (``rows``: its records) has a run the statistics can use,
    else the message of the analysis rule's failure: ``what`` has no usable run, and why,
    one line per run."""
    bad = _unusable_rows(rows, require_converged=require_converged)
    if len(bad) < len(rows):
        return None
    lines = [f"{what}: no usable run ({len(rows)} run(s), none with status ok"
             + (" and converged" if require_converged else "")
             + "), so there is nothing to correlate. Why, per run (runs.csv):"]
    lines += [f"  {run}: {why}" for run, why in bad]
    return "\n".join(lines)


def failed_runs_notice(tables: Mapping[str, str | os.PathLike]) -> str | None:
    """What to say at the end of a Snakemake run about studies with runs that are not
    usable: for each study (``tables``: study -> its runs.csv; missing files are skipped)
    the count of runs that failed or diverged, by status, with a few of their errors; None
    when every run of every table is ok."""
    parts = []
    for study, path in tables.items():
        path = Path(path)
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        bad = _unusable_rows(rows, require_converged=False)
        if bad:
            parts.append(_study_notice(study, path, len(rows), bad))
    if not parts:
        return None
    return "convflat: some runs failed; their studies' tables leave them out:\n" + "\n".join(
        parts)


def _study_notice(study: str, path: Path, n_rows: int, bad: list[tuple[str, str]]) -> str:
    """The lines of :func:`failed_runs_notice` for one study."""
    counts: dict[str, int] = {}
    for _, why in bad:
        status = why.split(":", 1)[0]
        counts[status] = counts.get(status, 0) + 1
    head = (f"study {study}: {len(bad)} of {n_rows} runs not usable ("
            + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f"); see {path}")
    if len(bad) == n_rows:
        head += " -- every run failed: this study has no result"
    return "\n".join([head] + [f"    {run}: {why}" for run, why in bad[:5]]
                     + ([f"    ... and {len(bad) - 5} more"] if len(bad) > 5 else []))
