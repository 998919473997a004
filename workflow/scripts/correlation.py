"""Rules correlation / overall_correlation: runs table(s) -> correlation.{csv,md,tex}.

Every measure against every target (Kendall tau with a bootstrap CI, Spearman, Pearson,
granulated Kendall Psi, conditional mutual information); convflat.analysis does the work.
Several runs tables (the overall analysis) are stacked with ``study`` as one more axis.
A study without one usable run fails the job, with each run's status and error.
"""

from pathlib import Path

from convflat.analysis import correlation_table, write_correlation_table
from convflat.pipeline.analysis import read_runs_tables
from convflat.pipeline.notices import no_usable_runs_message
from convflat.pipeline.script import fail, snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    cfg = snakemake.params.analysis
    runs = read_runs_tables(snakemake.input.runs)
    problem = no_usable_runs_message(runs.to_dict("records"), snakemake.params.title,
                                     require_converged=cfg["require_converged"])
    if problem:  # the job fails, saying why for every run
        fail(problem, log)
    table = correlation_table(runs, targets=cfg["targets"], n_boot=cfg["n_boot"],
                              seed=cfg["seed"], require_converged=cfg["require_converged"])
    prefix = Path(snakemake.output.csv).with_suffix("")
    for path in write_correlation_table(table, prefix, title=snakemake.params.title):
        log.info("wrote %s", path)
    log.info("%s", table.attrs.get("selection"))


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("correlation")
    main(snakemake)
