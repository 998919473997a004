"""Rule headline: correlation.csv + runs.csv -> headline.md (the study's answer, first)."""

from convflat.analysis import HEADLINE_TARGETS, write_headline
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    analysis = snakemake.params.analysis
    targets = [t for t in HEADLINE_TARGETS if t in analysis["targets"]]
    footer = (f"Written by `snakemake {snakemake.output.md}` (the `headline` rule); "
              f"analysis code {snakemake.params.version}.")
    path = write_headline(snakemake.input.correlation, snakemake.input.runs, snakemake.output.md,
                          targets=targets, title=snakemake.wildcards.study,
                          require_converged=analysis["require_converged"],
                          min_runs=analysis["min_runs"],
                          noise_z=analysis["sign_error_noise_z"], footer=footer,
                          along=snakemake.input.get("along"))
    log.info("wrote %s", path)


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("headline")
    main(snakemake)
