"""Rules figure / overall_figure: one figure (PNG + PDF) of a study, or of all studies pooled.

The figure is drawn by its entry of convflat.workflow.FIGURES, from the tables (and the
training records) it reads.
"""

from pathlib import Path

from convflat.io import atomic_write_text
from convflat.workflow import FIGURES, snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    figure = FIGURES[snakemake.params.figure]
    inputs = {name: [str(p) for p in path] if isinstance(path, list) else str(path)
              for name, path in snakemake.input.items()}  # a list: every run's train.json
    out = Path(snakemake.output.png).with_suffix("")
    paths = figure.draw(inputs, out, snakemake.params.analysis)
    caption = Path(snakemake.output.get("caption", out.with_suffix(".caption.rst")))
    if "caption" in snakemake.output.keys() and not caption.is_file():
        atomic_write_text(caption, figure.caption + "\n")  # a figure without a computed one
    log.info("wrote %s", [str(p) for p in paths])


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("figure")
    main(snakemake)
