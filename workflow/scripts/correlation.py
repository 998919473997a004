"""Rules correlation / overall_correlation: runs table(s) -> correlation.{csv,md,tex}.

Every measure against every target (Kendall tau with a bootstrap CI, Spearman, Pearson,
granulated Kendall Psi, conditional mutual information); convflat.analysis does the work.
Several runs tables (the overall analysis) are stacked with ``study`` as one more axis.
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
from pathlib import Path  # noqa: E402

from convflat.analysis import (  # noqa: E402
    combine_runs,
    correlation_table,
    read_runs,
    write_correlation_table,
)

sm = snakemake  # noqa: F821
cfg = sm.params.analysis
paths = [sm.input.runs] if isinstance(sm.input.runs, str) else list(sm.input.runs)
runs = read_runs(paths[0]) if len(paths) == 1 else combine_runs(paths)
table = correlation_table(
    runs, targets=cfg["targets"], n_boot=cfg["n_boot"], seed=cfg["seed"],
    require_converged=cfg["require_converged"],
)
prefix = Path(sm.output.csv).with_suffix("")
for path in write_correlation_table(table, prefix, title=sm.params.title):
    log.info("wrote %s", path)
log.info("%s", table.attrs.get("selection"))
