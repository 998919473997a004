"""Rule prepare: one dataset (with its label noise) -> data/prepared/<name>.pt."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
from convflat.data import load_prepared, prepare  # noqa: E402

ds = snakemake.params.dataset  # noqa: F821
path = prepare(
    ds["source"],
    root=snakemake.params.root,  # noqa: F821
    out=snakemake.output.data,  # noqa: F821
    subset=ds["subset"],
    label_noise=ds["label_noise"],
    seed=ds["seed"],
    test_fraction=ds["test_fraction"],
    download=False,  # the download rule fetched it (or says what to place where)
)
log.info("prepared %s", load_prepared(path).describe())
