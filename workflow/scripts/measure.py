"""Rule measure: every configured measure of one trained run -> measures.json.

convflat.pipeline.measure.measure_run does the work and never raises: a run that diverged or failed
in training, or that cannot be measured, gets a measures.json that says so, and the study
goes on.
"""

from convflat.pipeline.measure import measure_run
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    meta = {"run_id": snakemake.wildcards.run_id, "study": snakemake.wildcards.study,
            "version": snakemake.params.version}
    result = measure_run(snakemake.input.model, snakemake.input.init, snakemake.input.record,
                         snakemake.input.data, snakemake.output.measures,
                         snakemake.params.measure, device=snakemake.params.device, meta=meta)
    log.info("measures: status %s, %d failed", result["status"], len(result["failed"]))


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("measure")
    main(snakemake)
