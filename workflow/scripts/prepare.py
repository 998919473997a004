"""Rule prepare: one dataset (with its label noise) -> data/prepared/<name>.pt."""

from convflat.data import load_prepared, prepare
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake)
    ds = snakemake.params.dataset
    path = prepare(ds["source"], root=snakemake.params.root, out=snakemake.output.data,
                   subset=ds["subset"], label_noise=ds["label_noise"], seed=ds["seed"],
                   test_fraction=ds["test_fraction"],
                   download=False)  # the download rule fetched it (or said what goes where)
    log.info("prepared %s", load_prepared(path).describe())


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("prepare")
    main(snakemake)
