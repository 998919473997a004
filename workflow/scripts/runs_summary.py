"""Rule runs_summary: runs.csv -> runs_summary.{csv,md,tex} (every run, metrics, our measures)."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
from pathlib import Path  # noqa: E402

from convflat.analysis import read_runs, write_runs_summary  # noqa: E402

sm = snakemake  # noqa: F821
prefix = Path(sm.output.csv).with_suffix("")
paths = write_runs_summary(read_runs(sm.input.runs), prefix,
                           require_converged=sm.params.analysis["require_converged"])
log.info("wrote %s", [str(p) for p in paths])
