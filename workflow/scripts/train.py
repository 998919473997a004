"""Rule train: one run of a study -> model.pt, init.pt, train.json in its run directory.

convflat.train.train_or_record_failure trains and never raises: a run that diverges or
fails is recorded as such (and stand-ins for its model files are written), so the rest of
the study goes on. A run killed midway resumes from checkpoint.pt, which is deliberately
not an output of the rule (Snakemake never deletes it).
"""

from pathlib import Path

from convflat.pipeline.script import snakemake_from_argv, start
from convflat.train import train_or_record_failure


def main(snakemake):
    log = start(snakemake)
    cfg = {**snakemake.params.train, "device": snakemake.params.device}
    rec = train_or_record_failure(dict(snakemake.params.spec), snakemake.input.data, cfg,
                                  Path(snakemake.output.model).parent,
                                  run_id=snakemake.wildcards.run_id)
    log.info("%s: status %s, %s epochs (%s), train acc %s, test acc %s, %.1f s",
             snakemake.wildcards.run_id, rec["status"], rec["epochs_run"],
             rec.get("stop_reason"), rec["train_acc"], rec["test_acc"], rec["seconds"] or 0.0)


if __name__ == "__main__":
    if "snakemake" not in globals():  # run by hand (docs/workflow.md, "Debugging a job")
        snakemake = snakemake_from_argv("train")
    main(snakemake)
