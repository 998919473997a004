"""Rule hutchinson_figure: hutchinson.csv -> hutchinson_convergence.{png,pdf}."""

from pathlib import Path

import pandas as pd

from convflat.analysis import plot_hutchinson_convergence
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    df = pd.read_csv(snakemake.input.table)
    exact = float(df["exact"].iloc[0])
    title = (f"conv-layer Hessian trace of {snakemake.params.model}: estimates vs exact "
             f"{exact:.4g}")
    out = Path(snakemake.output.png).with_suffix("")
    paths = plot_hutchinson_convergence(df, exact, out, title=title)
    log.info("wrote %s", [str(p) for p in paths])


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("hutchinson_figure")
    main(snakemake)
