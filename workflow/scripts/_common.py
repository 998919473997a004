"""What every workflow script does first: log to the rule's log file, pin the thread count.

Imported by the scripts as ``from _common import ...`` after they put their own directory
(``snakemake.scriptdir``) on ``sys.path``; Snakemake runs a copy of each script from
``.snakemake/scripts/``, so the directory is not on the path by itself.
"""

from __future__ import annotations

import logging
import sys
import time
import traceback
from pathlib import Path


def start(snakemake) -> logging.Logger:
    """Send stdout, stderr and logging to ``snakemake.log[0]``; use ``snakemake.threads``
    threads in torch. Returns the script's logger."""
    if snakemake.log:
        path = Path(str(snakemake.log[0]))
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "w", buffering=1)
        sys.stdout = sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import torch

    torch.set_num_threads(max(1, int(snakemake.threads)))
    log = logging.getLogger(f"workflow.{snakemake.rule}")
    log.info("rule %s, wildcards %s, %d thread(s), %s", snakemake.rule,
             dict(snakemake.wildcards.items()), snakemake.threads,
             snakemake.params.get("version", ""))
    return log


def error_text(exc: BaseException) -> str:
    """One line for the JSON record: ``TypeName: message``."""
    return f"{type(exc).__name__}: {exc}".strip()


def log_exception(log: logging.Logger, what: str) -> None:
    log.error("%s failed:\n%s", what, traceback.format_exc())


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def markdown_table(df) -> str:
    """A DataFrame as a GitHub Markdown table (floats with 4 significant digits)."""
    return df.to_markdown(index=False, floatfmt=".4g") + "\n"
