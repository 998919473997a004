"""Rules figure / overall_figure: one figure (PNG + PDF) of a study, or of all studies pooled.

The figure is drawn by its entry of convflat.pipeline.registry.FIGURES, from the tables
(and the training records) it reads; the figure rule also writes its caption file. A study
without one usable run fails the job with the correlation job's message (each run's status
and error), whichever of the two runs first.
"""

from pathlib import Path

from convflat.pipeline.analysis import draw_figure
from convflat.pipeline.notices import no_usable_runs_message, read_runs_rows
from convflat.pipeline.script import fail, snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    inputs = {name: [str(p) for p in path] if isinstance(path, list) else str(path)
              for name, path in snakemake.input.items()}  # a list: every run's train.json
    if "runs" in inputs:  # a study figure (the overall ones read the pooled correlation)
        problem = no_usable_runs_message(
            read_runs_rows(inputs["runs"]), snakemake.wildcards.get("study", "overall"),
            require_converged=snakemake.params.analysis["require_converged"])
        if problem:
            fail(problem, log)
    paths = draw_figure(snakemake.params.figure, inputs,
                        Path(snakemake.output.png).with_suffix(""), snakemake.params.analysis,
                        caption=snakemake.output.get("caption"))
    log.info("wrote %s", [str(p) for p in paths])


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("figure")
    main(snakemake)
