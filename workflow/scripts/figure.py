"""Rules figure / overall_figure: one figure (PNG + PDF) of a study, or of all studies pooled.

The figure is drawn by its entry of convflat.pipeline.registry.FIGURES, from the tables
(and the training records) it reads; the figure rule also writes its caption file.
"""

from pathlib import Path

from convflat.pipeline.analysis import draw_figure
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    inputs = {name: [str(p) for p in path] if isinstance(path, list) else str(path)
              for name, path in snakemake.input.items()}  # a list: every run's train.json
    paths = draw_figure(snakemake.params.figure, inputs,
                        Path(snakemake.output.png).with_suffix(""), snakemake.params.analysis,
                        caption=snakemake.output.get("caption"))
    log.info("wrote %s", [str(p) for p in paths])


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("figure")
    main(snakemake)
