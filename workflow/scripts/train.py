"""Rule train: one run of a study -> model.pt, init.pt, train.json in its run directory.

A run that diverges is recorded by the library (status "diverged"). A run that fails is
recorded here: train.json gets status "failed" and the error, and model.pt / init.pt, if
training never wrote them, become small stubs that say so (format "convflat-failed/1"), so
that Snakemake sees the job as done and the rest of the study goes on; the tables count
the run as failed. Resume: the library keeps checkpoint.pt (not a declared output, so
Snakemake never deletes it) and continues from it after a kill; a checkpoint of a different
run (the config changed since) is set aside and the run starts again.
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import Timer, error_text, log_exception, start

log = start(snakemake)  # noqa: F821
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from convflat import train as trainlib  # noqa: E402
from convflat.io import atomic_torch_save, atomic_write_json, provenance  # noqa: E402

sm = snakemake  # noqa: F821
out_dir = Path(sm.output.model).parent
ckpt = out_dir / trainlib.CHECKPOINT_FILE
spec = dict(sm.params.spec)
cfg = {**sm.params.train, "device": sm.params.device}
timer = Timer()
METRICS = ("train_loss", "train_acc", "test_loss", "test_acc", "loss_gap", "acc_gap",
           "test_error")


def run():
    return trainlib.train(spec, sm.input.data, cfg, out_dir, progress=False)


record = None
try:
    try:
        had_checkpoint = ckpt.is_file()
        record = run()
    except ValueError:
        # A checkpoint that cannot be resumed (another run's, or unreadable) fails before
        # training starts and before train.json is written: set it aside, start again.
        if not (had_checkpoint and not Path(sm.output.record).is_file()):
            raise
        stale = ckpt.with_name("checkpoint.stale.pt")
        log_exception(log, "resuming from checkpoint.pt")
        log.warning("moving %s to %s and starting the run from scratch", ckpt, stale)
        ckpt.replace(stale)
        record = run()
except Exception as exc:  # recorded, not raised: one failed run must not stop the study
    log_exception(log, "training")
    record_path = Path(sm.output.record)
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("status") != "failed":
        record = {
            **provenance(device=cfg["device"], seed=cfg.get("seed"), seconds=timer.seconds,
                         status="failed"),
            "format": trainlib.TRAIN_FORMAT, "spec": spec, "config": cfg,
            "epochs_run": 0, "converged": False, **dict.fromkeys(METRICS),
        }
    record["error"] = error_text(exc)
    record["run_id"] = sm.wildcards.run_id
    atomic_write_json(record_path, record)
    for key in ("model", "init"):
        path = Path(sm.output[key])
        if not path.is_file():
            atomic_torch_save(path, {"format": "convflat-failed/1", "status": "failed",
                                     "error": record["error"], "spec": spec})
    log.info("run recorded as failed: %s", record["error"])
    sys.exit(0)

log.info("%s: status %s, %s epochs (%s), train acc %s, test acc %s, %.1f s",
         sm.wildcards.run_id, record["status"], record["epochs_run"], record["stop_reason"],
         record["train_acc"], record["test_acc"], record["seconds"])
