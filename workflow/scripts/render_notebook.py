"""Rules overview_notebook, validation_notebook: run a papermill template -> executed copy.

The kernel is the Python that runs this script (the workflow's environment); see
convflat.pipeline.report.run_notebook.
"""

from convflat.pipeline.report import run_notebook
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    start(snakemake, torch_threads=False)
    run_notebook(snakemake.input.template, snakemake.output.notebook,
                 snakemake.params.parameters, timeout=snakemake.params.timeout)


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("overview_notebook")
    main(snakemake)
