"""What the workflow says about runs that the statistics cannot use.

The Snakemake process prints :func:`failed_runs_notice` at the end of every run (failed,
diverged and not-converged runs, per study), and the correlation and study figure jobs fail
with :func:`no_usable_runs_message` when a study has nothing to correlate, whichever of them
runs first. Both read runs tables as plain records (the csv module: the Snakemake process
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

__all__ = ["failed_runs_notice", "no_usable_runs_message", "read_runs_rows",
           "unusable_reason"]


def read_runs_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a runs table (``runs.csv``) as plain records, without pandas."""
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


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


def failed_runs_notice(tables: Mapping[str, str | os.PathLike], *,
                       require_converged: bool = True) -> str | None:
    """What to say at the end of a Snakemake run about studies with runs that are not
    usable: for each study (``tables``: study -> its runs.csv; missing files are skipped)
    the count of runs that failed, diverged or did not converge, by reason, with a few of
    their errors; None when every run of every table is usable and converged.

    With ``require_converged`` (the config's ``analysis.require_converged``) a run that did
    not converge is left out of the statistics like a failed one; without it the run is
    used, and the notice still names it, on a line of its own."""
    parts = []
    for study, path in tables.items():
        path = Path(path)
        if not path.is_file():
            continue
        rows = read_runs_rows(path)
        bad = _unusable_rows(rows, require_converged=require_converged)
        unconverged = [] if require_converged else [
            (label, why) for label, why in _unusable_rows(rows, require_converged=True)
            if why.startswith("not converged")]
        if bad or unconverged:
            parts.append(_study_notice(study, path, rows, bad, unconverged))
    if not parts:
        return None
    return ("convflat: some runs are not usable (failed, diverged or not converged); the "
            "statistics leave them out:\n" + "\n".join(parts))


def _listed(runs: list[tuple[str, str]]) -> list[str]:
    """The first five (run, why) pairs as indented lines, then how many more."""
    return ([f"    {run}: {why}" for run, why in runs[:5]]
            + ([f"    ... and {len(runs) - 5} more"] if len(runs) > 5 else []))


def _study_notice(study: str, path: Path, rows: list[dict[str, Any]],
                  bad: list[tuple[str, str]], unconverged: list[tuple[str, str]]) -> str:
    """The lines of :func:`failed_runs_notice` for one study: its unusable runs counted by
    :func:`convflat.usable.unusable_category`, then the not-converged runs it still uses."""
    lines = []
    if bad:
        counts: dict[str, int] = {}
        for _, why in bad:
            category = _category(why)
            counts[category] = counts.get(category, 0) + 1
        head = (f"study {study}: {len(bad)} of {len(rows)} runs not usable ("
                + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f"); see {path}")
        if len(bad) == len(rows):
            head += " -- no run is usable: this study has no result"
        lines += [head, *_listed(bad)]
    if unconverged:
        head = (f"study {study}: {len(unconverged)} of {len(rows)} runs did not converge "
                "(used all the same: analysis.require_converged is false)"
                + ("" if bad else f"; see {path}"))
        lines += [head, *_listed(unconverged)]
    return "\n".join(lines)


def _category(why: str) -> str:
    """The count key of an :func:`unusable_reason` text: ``status=<status>``, ``diverged``,
    ``training loss not finite`` or ``not converged``."""
    for key in ("training loss not finite", "not converged", "diverged"):
        if why.startswith(key):
            return key
    return why.split(":", 1)[0].split(" (", 1)[0]
