"""Rule hutchinson_figure: hutchinson.csv -> hutchinson_convergence.{png,pdf}."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from convflat.analysis import plot_hutchinson_convergence  # noqa: E402

sm = snakemake  # noqa: F821
df = pd.read_csv(sm.input.table)
exact = float(df["exact"].iloc[0])
paths = plot_hutchinson_convergence(
    df, exact, Path(sm.output.png).with_suffix(""),
    title=f"conv-layer Hessian trace of {sm.params.model}: estimates vs exact {exact:.4g}",
)
log.info("wrote %s", [str(p) for p in paths])
