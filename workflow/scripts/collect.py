"""Rule collect: a study's train.json + measures.json files -> results/tables/<study>/runs.csv.

One row per run of the grid, whatever happened to it: ``status`` is the training status
(ok / diverged / failed), or "failed" when training was ok but measuring failed as a whole;
``error`` says why. Columns (docs/internal-api.md): run_id, study, status, converged,
hp_<axis>, the metrics, then m_<measure> (NaN for a measure that failed or was skipped), then
bookkeeping (epochs_run, stop_reason, seconds, error).
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import start

log = start(snakemake)  # noqa: F821
import json  # noqa: E402

import pandas as pd  # noqa: E402

from convflat.io import atomic_write_text  # noqa: E402

sm = snakemake  # noqa: F821
METRICS = ("train_loss", "test_loss", "train_acc", "test_acc", "loss_gap", "acc_gap",
           "test_error")
run_ids, hps = sm.params.run_ids, sm.params.hp
records = [json.loads(open(p).read()) for p in sm.input.records]
measured = [json.loads(open(p).read()) for p in sm.input.measures]
# every measure any run asked for, in the order of the first run that has it
names = list(dict.fromkeys(n for m in measured for n in (m.get("measures") or {})))
rows = []
for run_id, rec, mea in zip(run_ids, records, measured):
    status, error = rec.get("status") or "failed", rec.get("error")
    if status == "ok" and mea.get("status") != "ok":
        status, error = "failed", f"measures: {mea.get('error')}"
    row = {"run_id": run_id, "study": sm.wildcards.study, "status": status,
           "converged": bool(rec.get("converged")) and status == "ok"}
    row.update({f"hp_{axis}": value for axis, value in hps[run_id].items()})
    row.update({k: rec.get(k) for k in METRICS})
    values = mea.get("values") or {}
    row.update({f"m_{name}": values.get(name) for name in names})
    row.update({"epochs_run": rec.get("epochs_run"), "stop_reason": rec.get("stop_reason"),
                "train_seconds": rec.get("seconds"), "measure_seconds": mea.get("seconds"),
                "failed_measures": ";".join(mea.get("failed") or []), "error": error})
    rows.append(row)
runs = pd.DataFrame(rows)
for col in [c for c in runs.columns if c.startswith("m_")] + list(METRICS):
    runs[col] = pd.to_numeric(runs[col], errors="coerce")
atomic_write_text(sm.output.runs, runs.to_csv(index=False, float_format="%.10g"))
counts = runs["status"].value_counts().to_dict()
log.info("%d runs: %s; %d converged", len(runs), counts, int(runs["converged"].sum()))
