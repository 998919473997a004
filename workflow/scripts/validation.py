"""Rules validation_reference / validation_model: one table that checks the method itself.

The table is built by its entry of convflat.pipeline.registry.VALIDATION_TABLES: on small reference
networks, or on the trained model of config key validation.run (and, for the invariance
table, validation.invariance.extra_runs) with a seeded random subset of its training data.
Outputs: <table>.csv and <table>.md.
"""

import time

from convflat.io import resolve_device
from convflat.pipeline.registry import VALIDATION_TABLES
from convflat.pipeline.script import snakemake_from_argv, start
from convflat.pipeline.validation import load_validation_runs, write_table


def main(snakemake):
    log = start(snakemake)
    t0, cfg = time.perf_counter(), snakemake.params.validation
    table = VALIDATION_TABLES[snakemake.params.table]
    run = None
    if table.uses_model:  # the validation run (and validation.invariance.extra_runs)
        run = load_validation_runs(dict(snakemake.input.items()),
                                   n_samples=cfg["n_samples"], seed=cfg["seed"])
    df = table.build(cfg, resolve_device(snakemake.params.device), run)
    write_table(df, snakemake.output.csv, snakemake.output.md)
    log.info("%s table: %d rows in %.1f s", table.name, len(df), time.perf_counter() - t0)


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("validation_model")
    main(snakemake)
