"""Rule measure: every configured measure of one trained run -> measures.json.

The run's training record decides: a run that diverged or failed gets a measures.json with
the same status and no values (nothing is measured on NaN weights). A measure that fails is
recorded by the library (the others still run); an error outside the measures (unreadable
checkpoint, bad data) is recorded here as status "failed". Never raises: the study goes on.
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import Timer, error_text, log_exception, start

log = start(snakemake)  # noqa: F821
import json  # noqa: E402

import torch  # noqa: E402

from convflat.data import load_prepared  # noqa: E402
from convflat.io import atomic_write_json, provenance, resolve_device  # noqa: E402
from convflat.measures import (  # noqa: E402
    MEASURES_FORMAT,
    compute_measures,
    resolve_names,
    write_measures_json,
)
from convflat.models import load_checkpoint  # noqa: E402

sm = snakemake  # noqa: F821
cfg = sm.params.measure
out = sm.output.measures
timer = Timer()
record = json.loads(open(sm.input.record).read())
meta = {"run_id": sm.wildcards.run_id, "study": sm.wildcards.study,
        "checkpoint": str(sm.input.model), "n_samples": None, "version": sm.params.version}


def write_status(status: str, error: str | None) -> None:
    atomic_write_json(out, {
        "format": MEASURES_FORMAT,
        **provenance(device=None, seed=cfg["seed"], seconds=timer.seconds, status=status),
        **meta, "values": {}, "failed": [], "skipped": [], "measures": {}, "error": error,
    })


if record.get("status") != "ok":
    log.info("training status is %r: nothing to measure", record.get("status"))
    write_status(record.get("status") or "failed", f"training: {record.get('error')}")
    sys.exit(0)

try:
    device = resolve_device(sm.params.device)
    names = resolve_names(cfg["names"])
    model, _ = load_checkpoint(sm.input.model, map_location="cpu")
    init, _ = load_checkpoint(sm.input.init, map_location="cpu")
    data = load_prepared(sm.input.data)
    x, y = data.tensors("train")
    n = x.shape[0] if cfg["n_samples"] is None else min(int(cfg["n_samples"]), x.shape[0])
    if n < x.shape[0]:  # a seeded random subset, the same for every run of the study
        idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg["seed"]))
        x, y = x[idx[:n]], y[idx[:n]]
    meta["n_samples"] = int(n)
    log.info("measuring %d measures on %d training samples on %s", len(names), n, device)
    results = compute_measures(
        model, (x, y), init_model=init, names=names, params=cfg["params"] or None,
        device=device, seed=cfg["seed"], batch_size=cfg["batch_size"], progress=False,
    )
except Exception as exc:  # recorded, not raised
    log_exception(log, "measuring")
    write_status("failed", error_text(exc))
    sys.exit(0)

for name, r in results.items():
    log.info("%-30s %-7s %8.2f s  %s", name, r["status"], r.get("seconds") or 0.0,
             r.get("value") if r["status"] == "ok" else r.get("error"))
write_measures_json(out, results, device=device, seed=cfg["seed"], seconds=timer.seconds,
                    **meta, error=None)
