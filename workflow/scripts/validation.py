"""Rules validation_*: the tables that check the method itself.

* exactness: the closed form against the dense autograd Hessian over the architecture suite
  of convflat.reference (tiny float64 networks; no trained model needed).
* invariance: every measure before and after a function-preserving rescaling of the
  last conv's filters (convflat.measures.validation.invariance_table).
* hutchinson: Hutchinson and Hutch++ estimates of the conv trace against the probe count,
  with the exact value (hutchinson_convergence).
* cost: seconds of each measure and its ratio to a forward pass (cost_table).

The last three use one trained model of the study named by config key validation.study
(run validation.run) on a seeded random subset of its training data. Outputs: <table>.csv and
<table>.md.
"""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import Timer, markdown_table, start

log = start(snakemake)  # noqa: F821
import json  # noqa: E402

import torch  # noqa: E402

from convflat.io import atomic_write_text, resolve_device  # noqa: E402

sm = snakemake  # noqa: F821
cfg = sm.params.validation
which = sm.params.table
timer = Timer()


def trained_model_and_data():
    from convflat.data import load_prepared
    from convflat.models import load_checkpoint

    record = json.loads(open(sm.input.train).read())
    if record.get("status") != "ok":
        raise RuntimeError(
            f"the validation run {sm.input.model} has training status {record.get('status')!r}"
            f" ({record.get('error')}); choose another with config key validation.run")
    model, _ = load_checkpoint(sm.input.model)
    init, _ = load_checkpoint(sm.input.init)
    x, y = load_prepared(sm.input.data).tensors("train")
    n = min(int(cfg["n_samples"]), x.shape[0])
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(cfg["seed"]))[:n]
    log.info("model %s, %d training samples", sm.input.model, n)
    return model, init, (x[idx], y[idx])


device = resolve_device(sm.params.device)
if which == "exactness":
    from convflat.reference import architecture_suite, exactness_table

    suite = architecture_suite()
    names = cfg["exactness"]["cases"]
    if names is not None:
        unknown = sorted(set(names) - {c.name for c in suite})
        if unknown:
            raise ValueError(f"config key validation.exactness.cases: unknown case(s) {unknown}"
                             f"; known: {[c.name for c in suite]}")
        suite = [c for c in suite if c.name in names]
    df = exactness_table(suite, seed=cfg["seed"])
    worst = df[["rel_err_trace", "rel_err_blocks", "rel_err_kappa"]].max().max()
    log.info("%d architectures, worst relative error %.3g", len(df), worst)
elif which == "invariance":
    from convflat.measures import invariance_table

    model, init, data = trained_model_and_data()
    c = cfg["invariance"]
    df = invariance_table(model, data, names=c["names"], init_model=init,
                          params=c["params"] or None, seed=cfg["seed"], device=device,
                          batch_size=cfg["batch_size"])
elif which == "hutchinson":
    from convflat.measures import hutchinson_convergence

    model, _, data = trained_model_and_data()
    c = cfg["hutchinson"]
    df = hutchinson_convergence(model, data, probes=c["probes"], repeats=c["repeats"],
                                methods=c["methods"], seed=cfg["seed"], device=device,
                                batch_size=cfg["batch_size"])
elif which == "cost":
    from convflat.measures import cost_table

    model, init, data = trained_model_and_data()
    c = cfg["cost"]
    df = cost_table(model, data, c["names"], repeats=c["repeats"], params=c["params"] or None,
                    init_model=init, device=device, seed=cfg["seed"],
                    batch_size=cfg["batch_size"])
else:
    raise ValueError(f"unknown validation table {which!r}")

atomic_write_text(sm.output.csv, df.to_csv(index=False, float_format="%.10g"))
atomic_write_text(sm.output.md, markdown_table(df))
log.info("%s table: %d rows in %.1f s", which, len(df), timer.seconds)
