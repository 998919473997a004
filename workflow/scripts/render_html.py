"""Rule notebook_html: an executed notebook -> one self-contained HTML file (images inlined)."""

from convflat.pipeline.report import render_html
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake, torch_threads=False)
    size = render_html(snakemake.input.notebook, snakemake.output.html)
    log.info("wrote %s (%d bytes) from %s", snakemake.output.html, size,
             snakemake.input.notebook)


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("notebook_html")
    main(snakemake)
