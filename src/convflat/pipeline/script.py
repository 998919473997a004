"""What every workflow script (``workflow/scripts/*.py``) does around its job: :func:`start`
(log to the rule's log file, pin the threads), :func:`fail` (end with a message, no
traceback) and :func:`snakemake_from_argv` (run the script by hand, with the ``snakemake``
object of :func:`convflat.pipeline.mock.mock_snakemake`).

Imports neither torch nor Snakemake: the notebook and collect jobs use no torch, and
Snakemake's API (seconds to import) is needed only to run a script by hand.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["fail", "snakemake_from_argv", "start"]

log = logging.getLogger(__name__)


def start(snakemake: Any, *, torch_threads: bool = True) -> logging.Logger:
    """What every workflow script does first: send stdout, stderr and logging to
    ``snakemake.log[0]``, use ``snakemake.threads`` threads in torch (unless
    ``torch_threads`` is false), and log the rule, wildcards and code version. Returns the
    script's logger (``workflow.<rule>``)."""
    if snakemake.log:
        path = Path(str(snakemake.log[0]))
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "w", buffering=1)  # open as long as the job
        sys.stdout = sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if torch_threads:
        import torch  # not at import: the jobs with torch_threads=False never load it

        torch.set_num_threads(max(1, int(snakemake.threads)))
    logger = logging.getLogger(f"workflow.{snakemake.rule}")
    logger.info("rule %s, wildcards %s, %d thread(s), %s", snakemake.rule,
                dict(snakemake.wildcards.items()), snakemake.threads,
                snakemake.params.get("version", ""))
    return logger


def fail(message: str, log_: logging.Logger | None = None) -> None:
    """End a workflow script with ``message`` on the console (the script's stderr before
    :func:`start` redirected it), in its log and as its exit status 1, without a
    traceback."""
    (log_ or log).error("%s", message)
    print(message, file=sys.__stderr__, flush=True)
    raise SystemExit(1)


def snakemake_from_argv(rule: str, argv: list[str] | None = None) -> Any:
    """:func:`convflat.pipeline.mock.mock_snakemake` from a command line: ``[--configfile
    FILE] [--snakefile FILE] [name=value ...]`` (the rule's wildcards), e.g. ``python
    workflow/scripts/train.py --configfile config/quick.yaml study=digits
    run_id=n~300/noise~0/width~8/depth~3/seed~0``, from the workflow's directory."""
    from convflat.pipeline.mock import mock_snakemake  # Snakemake's API: only by hand

    parser = argparse.ArgumentParser(description=f"run the script of rule {rule!r} by hand")
    parser.add_argument("--configfile", default=None)
    parser.add_argument("--snakefile", default=None)
    parser.add_argument("wildcards", nargs="*", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    bad = [w for w in args.wildcards if "=" not in w]
    if bad:
        parser.error(f"wildcards are NAME=VALUE, got {bad}")
    wildcards = dict(w.split("=", 1) for w in args.wildcards)
    return mock_snakemake(rule, configfile=args.configfile, snakefile=args.snakefile,
                          **wildcards)
