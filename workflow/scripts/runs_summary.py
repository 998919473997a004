"""Rule runs_summary: runs.csv -> runs_summary.{csv,md,tex} (every run, metrics, our measures)."""

from pathlib import Path

from convflat.analysis import read_runs, write_runs_summary
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    prefix = Path(snakemake.output.csv).with_suffix("")
    paths = write_runs_summary(read_runs(snakemake.input.runs), prefix,
                               require_converged=snakemake.params.analysis["require_converged"])
    log.info("wrote %s", [str(p) for p in paths])


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("runs_summary")
    main(snakemake)
