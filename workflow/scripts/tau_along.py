"""Rule tau_along: runs table + every run's train.json -> tau along training (csv, md, figure).

Each tracked measure is read at common training-loss levels (convflat.analysis.along) and
correlated with the final generalization gap; convflat.pipeline.analysis does the work.
"""

from pathlib import Path

from convflat.pipeline.analysis import tau_along_job
from convflat.pipeline.notices import no_usable_runs_message, read_runs_rows
from convflat.pipeline.script import fail, snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    problem = no_usable_runs_message(read_runs_rows(snakemake.input.runs),
                                     snakemake.wildcards.study,
                                     require_converged=snakemake.params.analysis[
                                         "require_converged"])
    if problem:  # the same clear message as the correlation job, whichever runs first
        fail(problem, log)
    paths = tau_along_job(snakemake.input.runs, list(snakemake.input.records),
                          snakemake.params.run_ids, Path(snakemake.output.csv).with_suffix(""),
                          Path(snakemake.output.png).with_suffix(""), snakemake.params.analysis,
                          title=snakemake.wildcards.study)
    log.info("wrote %s", [str(p) for p in paths])


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("tau_along")
    main(snakemake)
