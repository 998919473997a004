"""Rule collect: a study's train.json + measures.json files -> results/tables/<study>/runs.csv.

One row per run of the grid, whatever happened to it; the columns are documented at
convflat.analysis.runs.build_runs_table (and docs/internal-api.md).
"""

import json
from pathlib import Path

from convflat.analysis.runs import build_runs_table, write_runs_table
from convflat.pipeline.script import snakemake_from_argv, start


def main(snakemake):
    log = start(snakemake, torch_threads=False)
    records = [json.loads(Path(p).read_text()) for p in snakemake.input.records]
    measured = [json.loads(Path(p).read_text()) for p in snakemake.input.measures]
    runs = build_runs_table(snakemake.wildcards.study, snakemake.params.run_ids,
                            snakemake.params.hp, records, measured)
    write_runs_table(runs, snakemake.output.runs)
    counts = runs["status"].value_counts().to_dict()
    log.info("%d runs: %s; %d converged", len(runs), counts, int(runs["converged"].sum()))


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("collect")
    main(snakemake)
