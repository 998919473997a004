"""The library side of the Snakemake workflow: what its scripts do, and what it builds.

Importing this module imports neither torch nor pandas (the workflow's common.smk reads the
registries on every dry run); each function imports what it needs when it runs.

* :data:`FIGURES`: the figures of a study, each a function registered with
  :func:`figure`. The ``figure`` and ``overall_figure`` rules take their targets, inputs and
  wildcard constraints from it.
* :data:`VALIDATION_TABLES`: the tables that check the method, each registered with
  :func:`validation_table`; the ``validation_reference`` and ``validation_model`` rules
  take their targets from it.
* :func:`measure_run`: the measure job, which records a failure instead of raising (the
  train job's counterpart is :func:`convflat.train.train_or_record_failure`).
* :func:`start` (log to the rule's log file, pin the threads) and :func:`mock_snakemake`
  (the ``snakemake`` object of a rule, to run a workflow script by hand for debugging).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FIGURES", "VALIDATION_TABLES", "Figure", "TrainedRun", "ValidationTable", "figure",
    "load_trained_run", "markdown_table", "measure_run", "measure_sizes", "mock_snakemake",
    "start",
    "validation_table",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ figures


@dataclass(frozen=True)
class Figure:
    """One figure of a study: ``results/figures/<study>/<name>.{png,pdf}``.

    Attributes:
        name: the file stem and registry key.
        draw: ``draw(inputs, out, analysis) -> [paths]``: ``inputs`` maps each name of
            ``reads`` to its file, ``out`` is the path without suffix, ``analysis`` the
            config's ``analysis`` section.
        reads: what it draws from: the study's tables ``"runs"`` (runs.csv) and/or
            ``"correlation"`` (correlation.csv), and/or ``"records"`` (the ``train.json``
            of every run of the study: ``inputs["records"]`` is a list of paths).
        overall: also drawn for the pooled studies (``results/figures/overall/``); only for
            figures that read the correlation table alone.
        when: a key of a study's config (dotted for a nested one:
            ``train.track_flatness``) whose value must be true (not 0, null or false) for
            the figure to be among the study's targets (None: always).
        caption: its caption in the Snakemake report (reStructuredText): the docstring of
            ``draw``.
    """

    name: str
    draw: Callable[[Mapping[str, str], Path, Mapping[str, Any]], list[Path]]
    reads: tuple[str, ...]
    overall: bool = False
    when: str | None = None
    caption: str = ""

    def wanted(self, study: Mapping[str, Any]) -> bool:
        """Whether a study (its validated config, defaults filled) draws this figure."""
        value: Any = study
        for key in (self.when.split(".") if self.when else []):
            value = value[key]
        return bool(value)


#: name -> :class:`Figure`, in the order they are drawn.
FIGURES: dict[str, Figure] = {}


def figure(name: str, *, reads: tuple[str, ...], overall: bool = False,
           when: str | None = None) -> Callable:
    """Decorator: register ``draw(inputs, out, analysis)`` as figure ``name``."""
    bad = sorted(set(reads) - {"runs", "correlation", "records"})
    if bad or not reads:
        raise ValueError(f"figure {name!r}: reads must name 'runs', 'correlation' and/or "
                         "'records'")
    if overall and tuple(reads) != ("correlation",):
        raise ValueError(f"figure {name!r}: an overall figure reads the correlation table only")

    def deco(draw: Callable) -> Callable:
        if name in FIGURES:
            raise ValueError(f"figure {name!r} is registered twice")
        FIGURES[name] = Figure(name, draw, tuple(reads), overall, when,
                               inspect.cleandoc(draw.__doc__ or ""))
        return draw

    return deco


@figure("measure_vs_gap", reads=("runs",))
def _measure_vs_gap(inputs, out, analysis):
    """Each measure (x) against the generalization target (y), one point per usable run,
    coloured by the hyperparameter axis with the most values; each panel gives Kendall's
    tau."""
    from convflat.analysis import plot_measure_vs_gap, read_runs

    return plot_measure_vs_gap(read_runs(inputs["runs"]), out, target=analysis["targets"][0],
                               require_converged=analysis["require_converged"])


@figure("tau_psi", reads=("correlation",), overall=True)
def _tau_psi(inputs, out, analysis):
    """Kendall's tau (filled circles) and the granulated Kendall coefficient Psi (open
    squares) of each measure with their confidence intervals, one panel per target; our
    measures in red."""
    from convflat.analysis import plot_tau_psi

    return plot_tau_psi(inputs["correlation"], out)


@figure("psi_heatmap", reads=("correlation",), overall=True)
def _psi_heatmap(inputs, out, analysis):
    """Psi per hyperparameter axis: how consistently each measure ranks runs that differ in
    one axis only, for each target."""
    from convflat.analysis import plot_psi_heatmap

    return plot_psi_heatmap(inputs["correlation"], out)


@figure("false_friend", reads=("runs",), when="false_friend")
def _false_friend(inputs, out, analysis):
    """"Flatness is a false friend" (Granziol 2020): test error, Hessian traces and the
    conv-layer relative flatness against weight decay at otherwise fixed settings (mean and
    one standard deviation over seeds). Granziol's point: weight decay changes the scale of
    the weights, which moves the Hessian trace whatever it does to test error, so the trace
    can call the better-generalizing nets sharper; the relative flatness, invariant to that
    rescaling, need not. What this study's runs show is computed from them in
    ``false_friend.caption.rst`` beside the figure (in the report, below)."""
    from convflat.analysis import plot_false_friend, read_runs
    from convflat.analysis.figures import false_friend_caption
    from convflat.io import atomic_write_text

    runs = read_runs(inputs["runs"])
    caption = false_friend_caption(runs, require_converged=analysis["require_converged"])
    log.info("false friend: %s", caption)
    atomic_write_text(Path(out).with_suffix(".caption.rst"), caption + "\n")
    return plot_false_friend(runs, out, require_converged=analysis["require_converged"])


@figure("flatness_over_training", reads=("runs", "records"), when="train.track_flatness")
def _flatness_over_training(inputs, out, analysis):
    """Conv trace and conv relative flatness against the training loss (eval mode, whole
    training split, when the study stops at a target loss) after every epoch, one line per
    run, coloured by the first grid axis that is not a seed; a dot where each run stopped,
    the dashed line the stopping target. Shows whether the nets are compared on the same
    part of their trajectories. Runs that failed or diverged are left out."""
    from convflat.analysis import NUISANCE_AXES, plot_flatness_over_training, read_runs

    runs = read_runs(inputs["runs"]).set_index("run_id")
    histories, stops = {}, set()
    for path in map(Path, inputs["records"]):
        rec = json.loads(path.read_text())
        if rec.get("status") != "ok" or not rec.get("history"):
            continue
        folder = "/" + path.parent.as_posix()  # .../<study>/<run_id>
        label = next((r for r in runs.index if folder.endswith("/" + r)), None)
        if label is None:
            raise ValueError(f"{path} is not the record of a run of {inputs['runs']}")
        histories[label] = rec["history"]
        stops.add((rec.get("config") or {}).get("stop_loss"))
    axes = [c for c in runs.columns if c.startswith("hp_") and c not in NUISANCE_AXES
            and runs[c].nunique() > 1]
    hue = ({label: runs.at[label, axes[0]] for label in histories} if axes else None)
    return plot_flatness_over_training(
        histories, out, hue=hue, hue_name=axes[0][3:] if axes else "",
        stop_loss=stops.pop() if len(stops) == 1 else None)


# -------------------------------------------------------------------- validation tables


@dataclass
class TrainedRun:
    """The trained model a validation table uses, its initial weights and a seeded subset
    of its training data ``(x, y)``; ``path`` names it (``<study>/<run_id>``), ``also``
    holds the runs of ``validation.invariance.extra_runs`` (invariance table only)."""

    model: Any
    init: Any
    data: tuple[Any, Any]
    path: str = ""
    also: list[TrainedRun] = field(default_factory=list)


@dataclass(frozen=True)
class ValidationTable:
    """One table of ``results/tables/validation/<name>.{csv,md}``.

    Attributes:
        name: the file stem, registry key and key of its settings under the config's
            ``validation`` section.
        build: ``build(cfg, device, run) -> DataFrame``: ``cfg`` is the slice of the
            ``validation`` section the table depends on (``seed`` and ``cfg[name]``; for a
            table that uses a model also ``n_samples`` and ``batch_size``), ``run`` a
            :class:`TrainedRun` or None.
        uses_model: built on the trained model of the config's validation run (on the
            configured device); otherwise on small reference networks, on the CPU.
        caption: its caption in the Snakemake report: the docstring of ``build``.
    """

    name: str
    build: Callable[[Mapping[str, Any], Any, TrainedRun | None], Any]
    uses_model: bool
    caption: str = ""


#: name -> :class:`ValidationTable`.
VALIDATION_TABLES: dict[str, ValidationTable] = {}


def validation_table(name: str, *, uses_model: bool) -> Callable:
    """Decorator: register ``build(cfg, device, run)`` as validation table ``name``."""

    def deco(build: Callable) -> Callable:
        if name in VALIDATION_TABLES:
            raise ValueError(f"validation table {name!r} is registered twice")
        VALIDATION_TABLES[name] = ValidationTable(name, build, uses_model,
                                                  inspect.cleandoc(build.__doc__ or ""))
        return build

    return deco


@validation_table("exactness", uses_model=False)
def _exactness(cfg, device, run):
    """Closed-form trace, block traces and relative flatness against the dense autograd
    Hessian over an architecture suite of small float64 networks (relative errors)."""
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
    return df


@validation_table("invariance", uses_model=True)
def _invariance(cfg, device, run):
    """Each measure before and after a function-preserving rescaling, with what theory
    predicts, on the validation run and each run of ``extra_runs`` (column ``model``).
    Without BatchNorm after the last conv the rescaling is its filters against the
    classifier; with it (column ``rescaling`` = batchnorm), every conv's filters with its
    BatchNorm's running mean and variance, and the last BatchNorm's affine against the
    classifier."""
    import pandas as pd

    from convflat.measures import invariance_table
    from convflat.measures.fold import conv_bn_pairs

    c = cfg["invariance"]
    parts = []
    for one in [run, *run.also]:
        rescaling = "batchnorm" if conv_bn_pairs(one.model)[0] else "filters"
        df = invariance_table(one.model, one.data, names=c["names"], init_model=one.init,
                              params=c["params"] or None, seed=cfg["seed"], device=device,
                              batch_size=cfg["batch_size"], rescaling=rescaling)
        df.insert(0, "rescaling", rescaling)
        df.insert(0, "model", one.path)
        parts.append(df)
        log.info("%s (%s rescaling): %s agree with theory", one.path, rescaling,
                 df["agrees"].value_counts(dropna=False).to_dict())
    return pd.concat(parts, ignore_index=True)


@validation_table("hutchinson", uses_model=True)
def _hutchinson(cfg, device, run):
    """Hutchinson and Hutch++ estimates of the conv-layer trace against the probe count,
    with the exact value."""
    from convflat.measures import hutchinson_convergence

    c = cfg["hutchinson"]
    return hutchinson_convergence(run.model, run.data, probes=c["probes"],
                                  repeats=c["repeats"], methods=c["methods"], seed=cfg["seed"],
                                  device=device, batch_size=cfg["batch_size"])


@validation_table("cost", uses_model=True)
def _cost(cfg, device, run):
    """Seconds per measure and the ratio to one forward pass over the same data."""
    from convflat.measures import cost_table

    c = cfg["cost"]
    return cost_table(run.model, run.data, c["names"], repeats=c["repeats"],
                      params=c["params"] or None, init_model=run.init, device=device,
                      seed=cfg["seed"], batch_size=cfg["batch_size"])


def load_trained_run(model: str | os.PathLike, init: str | os.PathLike,
                     record: str | os.PathLike, data: str | os.PathLike, *, n_samples: int,
                     seed: int) -> TrainedRun:
    """The validation run: its model, initial weights and a seeded random subset of
    ``n_samples`` training images (:func:`convflat.data.seeded_subset`). A run whose
    training did not end with status ok is an error that names config key validation.run."""
    from convflat.data import load_prepared, seeded_subset
    from convflat.models import load_checkpoint

    rec = json.loads(Path(record).read_text())
    if rec.get("status") != "ok":
        raise RuntimeError(
            f"the validation run {model} has training status {rec.get('status')!r}"
            f" ({rec.get('error')}); choose another with config key validation.run")
    x, y = load_prepared(data).tensors("train")
    x, y = seeded_subset(x, y, n=n_samples, seed=seed)
    log.info("model %s, %d training samples", model, int(x.shape[0]))
    path = Path(model).parent.as_posix()
    path = path.split("results/runs/", 1)[1] if "results/runs/" in path else path
    return TrainedRun(load_checkpoint(model)[0], load_checkpoint(init)[0], (x, y), path)


def load_validation_runs(inputs: Mapping[str, Any], *, n_samples: int,
                         seed: int) -> TrainedRun:
    """The validation run of a validation_model job's ``inputs`` (``model``, ``init``,
    ``record``, ``data``; :func:`load_trained_run`), with the runs of the lists
    ``also_model``, ``also_init``, ``also_record``, ``also_data`` in its ``also``."""
    keys = ("model", "init", "record", "data")
    extra = zip(*(inputs.get(f"also_{k}", []) for k in keys), strict=True)
    run = load_trained_run(*(inputs[k] for k in keys), n_samples=n_samples, seed=seed)
    run.also = [load_trained_run(*files, n_samples=n_samples, seed=seed) for files in extra]
    return run


def markdown_table(df: Any) -> str:
    """A DataFrame as a GitHub Markdown table (floats with 4 significant digits)."""
    return df.to_markdown(index=False, floatfmt=".4g") + "\n"


# --------------------------------------------------------------------------- measuring


def measure_run(model: str | os.PathLike, init: str | os.PathLike,
                record: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
                cfg: Mapping[str, Any], *, device: str = "auto",
                meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Every measure of a study's ``measure`` section (``cfg``) on one trained run; write
    ``out`` (measures.json) and return its content. Never raises.

    The run's training record decides: a run that diverged or failed gets a measures.json
    with the same status and no values (nothing is measured on NaN weights). A measure that
    fails is recorded by :func:`convflat.measures.compute_measures` (the others still run);
    an error outside the measures (unreadable checkpoint, bad data) gives status "failed".
    The exact measures of ``cfg["whole_split"]`` see the whole training split; the other
    data-reading measures a seeded random subset of ``cfg["n_samples"]`` training images,
    the same for every run of the study (:func:`measure_sizes`; the subset is drawn by
    :meth:`convflat.measures.context.Context.subset`). ``meta`` (run_id, study, version,
    ...) is copied into the file, with ``n_samples`` (the training split) and
    ``n_samples_by_measure``.
    """
    from convflat.io import atomic_write_json, provenance
    from convflat.train import error_text

    start_time = time.perf_counter()
    meta = {**(meta or {}), "checkpoint": str(model), "n_samples": None}

    def write_status(status: str, error: str | None) -> dict[str, Any]:
        from convflat.measures import MEASURES_FORMAT

        obj = {"format": MEASURES_FORMAT,
               **provenance(device=None, seed=cfg["seed"],
                            seconds=time.perf_counter() - start_time, status=status),
               **meta, "values": {}, "failed": [], "skipped": [], "measures": {},
               "error": error}
        atomic_write_json(out, obj)
        return json.loads(Path(out).read_text())

    trained = json.loads(Path(record).read_text())
    if trained.get("status") != "ok":
        log.info("training status is %r: nothing to measure", trained.get("status"))
        return write_status(trained.get("status") or "failed",
                            f"training: {trained.get('error')}")
    try:
        results, dev = _compute(model, init, data, cfg, device, meta)
    except Exception as exc:  # recorded, not raised
        log.exception("measuring failed")
        return write_status("failed", error_text(exc))
    from convflat.measures import write_measures_json

    for name, r in results.items():
        log.info("%-30s %-7s %8.2f s  %s", name, r["status"], r.get("seconds") or 0.0,
                 r.get("value") if r["status"] == "ok" else r.get("error"))
    write_measures_json(out, results, device=dev, seed=cfg["seed"],
                        seconds=time.perf_counter() - start_time, **meta, error=None)
    return json.loads(Path(out).read_text())


def measure_sizes(cfg: Mapping[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """The per-measure parameters of a study's ``measure`` section (``cfg``), with the
    training images each data-reading measure sees as its ``max_samples``: None (the whole
    training split) for the measures of ``cfg["whole_split"]``, ``cfg["n_samples"]`` for
    the others; a ``max_samples`` in ``cfg["params"][name]`` wins over both."""
    from convflat.measures import MEASURES

    params = {n: dict(p) for n, p in (cfg["params"] or {}).items()}
    whole = set(cfg.get("whole_split", ()))
    for name in names:
        if not MEASURES[name].uses_data:
            continue
        own = params.setdefault(name, {})
        if "max_samples" not in own:
            own["max_samples"] = None if name in whole else cfg["n_samples"]
    return params


def _compute(model, init, data, cfg, device, meta):
    """Load the run and its whole training split, compute the measures, each on the
    training images :func:`measure_sizes` gives it: (results, device)."""
    from convflat.data import load_prepared
    from convflat.io import resolve_device
    from convflat.measures import MEASURES, compute_measures, resolve_names
    from convflat.models import load_checkpoint

    dev = resolve_device(device)
    names = resolve_names(cfg["names"])
    unknown = sorted(set(cfg.get("whole_split", ())) - set(resolve_names("all")))
    if unknown:
        raise ValueError(f"config key measure.whole_split: unknown measure(s) {unknown}")
    params = measure_sizes(cfg, names)
    net, _ = load_checkpoint(model, map_location="cpu")
    init_net, _ = load_checkpoint(init, map_location="cpu")
    x, y = load_prepared(data).tensors("train")
    n = int(x.shape[0])
    meta["n_samples"] = n
    meta["n_samples_by_measure"] = {  # None: the measure reads no data (norms)
        name: min(params[name]["max_samples"] or n, n) if MEASURES[name].uses_data else None
        for name in names}
    log.info("measuring %d measures on %d training samples on %s (subsamples: %s)",
             len(names), n, dev, meta["n_samples_by_measure"])
    results = compute_measures(
        net, (x, y), init_model=init_net, names=names, params=params or None,
        device=dev, seed=cfg["seed"], batch_size=cfg["batch_size"], progress=False)
    return results, dev


# ------------------------------------------------------------------- script plumbing


def start(snakemake: Any, *, torch_threads: bool = True) -> logging.Logger:
    """What every workflow script does first: send stdout, stderr and logging to
    ``snakemake.log[0]``, use ``snakemake.threads`` threads in torch (unless
    ``torch_threads`` is false), and log the rule, wildcards and code version. Returns the
    script's logger (``workflow.<rule>``)."""
    if snakemake.log:
        path = Path(str(snakemake.log[0]))
        path.parent.mkdir(parents=True, exist_ok=True)
        stream = open(path, "w", buffering=1)  # open as long as the job
        sys.stdout = sys.stderr = stream
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if torch_threads:
        import torch

        torch.set_num_threads(max(1, int(snakemake.threads)))
    logger = logging.getLogger(f"workflow.{snakemake.rule}")
    logger.info("rule %s, wildcards %s, %d thread(s), %s", snakemake.rule,
                dict(snakemake.wildcards.items()), snakemake.threads,
                snakemake.params.get("version", ""))
    return logger


def mock_snakemake(rule: str, *, configfile: str | os.PathLike | None = None,
                   snakefile: str | os.PathLike | None = None, **wildcards: str) -> Any:
    """The ``snakemake`` object that Snakemake would give the script of ``rule``, for
    running a workflow script by hand (a debugger, a notebook), as in pypsa-eur.

    Loads the workflow (``snakefile``, default ``Snakefile`` in the working directory,
    with ``configfile`` replacing its default config, as ``--configfile`` does) and builds
    the job of ``rule`` for ``wildcards``: its input, output, params, log, threads,
    resources and config, with the rule's wildcards. Paths stay relative to the working
    directory, which must be the workflow's (where ``results/`` lives). Output and log
    directories are created. A wrong rule or missing wildcard raises a ValueError.
    """
    from snakemake.api import (
        ConfigSettings,
        OutputSettings,
        ResourceSettings,
        SnakemakeApi,
    )
    from snakemake.dag import DAG
    from snakemake.jobs import Job
    from snakemake.script import Snakemake

    snakefile = Path(snakefile or "Snakefile").resolve()
    configfiles = [Path(configfile).resolve()] if configfile is not None else []
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=configfiles),
            snakefile=snakefile, workdir=Path.cwd(),
        )
        wf_api.dag()  # gives the parsed workflow its DAG settings
        workflow = wf_api._workflow  # the parsed workflow (SnakemakeApi has no public getter)
        try:
            rule_obj = workflow.get_rule(rule)
        except Exception as exc:
            raise ValueError(f"no rule {rule!r} in {snakefile}") from exc
        missing = sorted(set(rule_obj.wildcard_names) - set(wildcards))
        if missing:
            raise ValueError(f"rule {rule!r} needs wildcard(s) {missing}")
        job = Job(rule_obj, DAG(workflow, rules=[rule_obj]), wildcards_dict=dict(wildcards))
        mock = Snakemake(job.input, job.output, job.params, job.wildcards, job.threads,
                         job.resources, job.log, workflow.config, rule_obj.name, None)
    for path in [*mock.output, *mock.log]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return mock


def snakemake_from_argv(rule: str, argv: list[str] | None = None) -> Any:
    """:func:`mock_snakemake` from a command line: ``[--configfile FILE] [name=value ...]``
    (the rule's wildcards), e.g. ``python workflow/scripts/train.py --configfile
    config/quick.yaml study=digits run_id=n~300/noise~0/width~8/depth~3/seed~0``, from the
    workflow's directory."""
    import argparse

    parser = argparse.ArgumentParser(description=f"run the script of rule {rule!r} by hand")
    parser.add_argument("--configfile", default=None)
    parser.add_argument("--snakefile", default=None)
    parser.add_argument("wildcards", nargs="*", metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    bad = [w for w in args.wildcards if "=" not in w]
    if bad:
        parser.error(f"wildcards are NAME=VALUE, got {bad}")
    wildcards = dict(w.split("=", 1) for w in args.wildcards)
    return mock_snakemake(rule, configfile=args.configfile, snakefile=args.snakefile,
                          **wildcards)


# ------------------------------------------------------------------ tables and notebooks


def write_table(df: Any, csv: str | os.PathLike, md: str | os.PathLike | None = None) -> None:
    """Write ``df`` atomically as CSV (floats to 10 significant digits) and, with ``md``, as
    a Markdown table (:func:`markdown_table`)."""
    from convflat.io import atomic_write_text

    atomic_write_text(csv, df.to_csv(index=False, float_format="%.10g"))
    if md is not None:
        atomic_write_text(md, markdown_table(df))


NOTEBOOK_KERNEL = "convflat-workflow"


def run_notebook(template: str | os.PathLike, out: str | os.PathLike,
                 parameters: Mapping[str, Any], *, timeout: int) -> None:
    """Execute a papermill ``template`` with ``parameters`` into ``out``.

    The kernel is the Python that runs this function (the workflow's environment), not
    whatever kernel named "python3" Jupyter finds first: a kernelspec whose argv starts with
    ``sys.executable`` is written to a temporary directory put first on JUPYTER_PATH. A
    kernel that fails to start because another job took its port (jupyter_client's race
    between kernels started at the same moment) is started again, twice at most. The
    executed copy is renamed into place when complete; a failing one stays beside it.
    """
    import random
    import tempfile

    import papermill

    out = Path(out)
    tmp_out = out.with_name(f".{out.name}.tmp.ipynb")
    with tempfile.TemporaryDirectory() as jupyter_dir:
        spec_dir = Path(jupyter_dir, "kernels", NOTEBOOK_KERNEL)
        spec_dir.mkdir(parents=True)
        (spec_dir / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"convflat ({sys.executable})", "language": "python"}))
        os.environ["JUPYTER_PATH"] = os.pathsep.join(
            [jupyter_dir] + [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep)
                             if p])
        log.info("papermill %s -> %s, kernel %s, parameters %s", template, out,
                 sys.executable, dict(parameters))
        for attempt in range(1, 4):
            try:
                papermill.execute_notebook(
                    str(template), str(tmp_out), parameters=dict(parameters),
                    kernel_name=NOTEBOOK_KERNEL, cwd=os.getcwd(), execution_timeout=timeout,
                    progress_bar=False, log_output=True)
                break
            except Exception as exc:
                if "Address already in use" in str(exc) and attempt < 3:
                    log.warning("kernel start failed (%s); retrying", exc)
                    time.sleep(random.uniform(1.0, 3.0))
                    continue
                log.error("the executed copy with the failing cell is at %s", tmp_out)
                raise
    os.replace(tmp_out, out)


#: Cell tags of the notebook templates: what the rendered HTML leaves out. The reader sees
#: the answer, figures and tables first; parameters, imports and helper code stay in the
#: executed ``.ipynb``.
HIDE_INPUT_TAGS = ("parameters", "injected-parameters", "hide-input")
REMOVE_CELL_TAGS = ("remove-cell",)


def render_html(notebook: str | os.PathLike, html: str | os.PathLike) -> int:
    """An executed notebook as one self-contained HTML file (images inlined), written
    atomically; returns its length in characters. The code of cells tagged
    :data:`HIDE_INPUT_TAGS` is left out (their output stays), cells tagged
    :data:`REMOVE_CELL_TAGS` entirely, and so are input and output prompts. Imports no
    torch."""
    import nbformat
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

    nb = nbformat.read(str(notebook), as_version=4)
    exporter = HTMLExporter(embed_images=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    exporter.register_preprocessor(
        TagRemovePreprocessor(remove_input_tags=set(HIDE_INPUT_TAGS),
                              remove_cell_tags=set(REMOVE_CELL_TAGS), enabled=True),
        enabled=True)
    text, _ = exporter.from_notebook_node(nb)
    tmp = Path(html).with_name(f".{Path(html).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, html)  # not convflat.io.atomic_write_text: that module's import costs more
    return len(text)


# ----------------------------------------------------------------------- failed runs


def _unusable_rows(rows: list[Mapping[str, Any]], *, require_converged: bool
                   ) -> list[tuple[str, str]]:
    """(run id, why) of every row of a runs table that the statistics leave out: its
    status is not ok (with runs.csv's ``error``), or it did not converge (with
    ``require_converged``; its stop reason and epochs)."""
    out = []
    pooled = len({str(row.get("study")) for row in rows}) > 1  # the overall analysis
    for row in rows:
        label = f"{row.get('study')}/{row.get('run_id')}" if pooled else str(row.get("run_id"))
        status = str(row.get("status") or "<missing>")
        error = row.get("error")
        has_error = error is not None and str(error) not in ("", "nan", "None")
        if status != "ok":
            out.append((label, f"status={status}" + (f": {error}" if has_error else "")))
        elif require_converged and str(row.get("converged")).strip().lower() not in (
                "true", "1", "1.0"):
            out.append((label, f"not converged (stop reason {row.get('stop_reason')}, "
                               f"{row.get('epochs_run')} epochs)"))
    return out


def no_usable_runs_message(rows: list[Mapping[str, Any]], what: str, *,
                           require_converged: bool) -> str | None:
    """None when a runs table (``rows``: its records) has a run the statistics can use,
    else the message of the analysis rule's failure: ``what`` has no usable run, and why,
    one line per run."""
    bad = _unusable_rows(rows, require_converged=require_converged)
    if len(bad) < len(rows):
        return None
    lines = [f"{what}: no usable run ({len(rows)} run(s), none with status ok"
             + (" and converged" if require_converged else "")
             + "), so there is nothing to correlate. Why, per run (runs.csv):"]
    lines += [f"  {run}: {why}" for run, why in bad]
    return "\n".join(lines)


def fail(message: str, log_: logging.Logger | None = None) -> None:
    """End a workflow script with ``message`` on the console (the script's stderr before
    :func:`start` redirected it), in its log and as its exit status 1, without a
    traceback."""
    (log_ or log).error("%s", message)
    print(message, file=sys.__stderr__, flush=True)
    raise SystemExit(1)


def failed_runs_notice(tables: Mapping[str, str | os.PathLike]) -> str | None:
    """What to say at the end of a Snakemake run about studies with runs that are not
    usable: for each study (``tables``: study -> its runs.csv; missing files are skipped)
    the count of runs that failed or diverged, by status, with a few of their errors; None
    when every run of every table is ok. Reads the tables with the csv module (no
    pandas: the Snakemake process runs it)."""
    import csv

    parts = []
    for study, path in tables.items():
        path = Path(path)
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        bad = _unusable_rows(rows, require_converged=False)
        if not bad:
            continue
        counts: dict[str, int] = {}
        for _, why in bad:
            status = why.split(":", 1)[0]
            counts[status] = counts.get(status, 0) + 1
        head = (f"study {study}: {len(bad)} of {len(rows)} runs not usable ("
                + ", ".join(f"{k}: {v}" for k, v in counts.items()) + f"); see {path}")
        if len(bad) == len(rows):
            head += " -- every run failed: this study has no result"
        parts.append("\n".join([head] + [f"    {run}: {why}" for run, why in bad[:5]]
                               + ([f"    ... and {len(bad) - 5} more"] if len(bad) > 5
                                  else [])))
    if not parts:
        return None
    return "convflat: some runs failed; their studies' tables leave them out:\n" + "\n".join(
        parts)


# ------------------------------------------------------------------------ user data


def user_data_path(source: str) -> Path:
    """The path of an ``npz:PATH`` or ``folder:PATH`` source, as :func:`convflat.data.prepare`
    reads it (``~`` expanded; relative to the working directory)."""
    return Path(str(source).split(":", 1)[1]).expanduser()


def folder_listing(folder: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(path relative to ``folder``, size in bytes, mtime in ns) of every file below it,
    sorted (hidden ones too: the image-folder loader reads them)."""
    root = Path(folder)
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            st = path.stat()
            out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(out)


def folder_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of :func:`folder_listing`: changes when a file is added, removed, resized or
    rewritten."""
    import hashlib

    text = "\n".join(f"{p}\t{s}\t{m}" for p, s, m in folder_listing(folder))
    return hashlib.sha256(text.encode()).hexdigest()


def write_folder_manifest(folder: str | os.PathLike, out: str | os.PathLike,
                          log_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Rule folder_manifest: write ``out`` (JSON: the folder, its digest and every file with
    size and mtime), atomically; returns it."""
    listing = folder_listing(folder)
    obj = {"folder": str(Path(folder).resolve()), "digest": folder_digest(folder),
           "n_files": len(listing),
           "files": [{"path": p, "size": s, "mtime_ns": m} for p, s, m in listing]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, out)  # not convflat.io: this runs in the Snakemake process
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(f"{len(listing)} files in {folder}, digest {obj['digest']}\n")
    return obj


# ---------------------------------------------------------------------------- download


class DownloadError(RuntimeError):
    """A torchvision source could not be downloaded; the message says which file to put
    where."""


def download_source(source: str, root: str | os.PathLike,
                    marker: str | os.PathLike) -> dict[str, Any]:
    """Fetch torchvision source ``source`` into ``root`` (torchvision's layout and MD5
    checks; files placed there by hand are verified and used) and write the ``marker``
    JSON: provenance, the torchvision version and the files. Without network, raise
    :class:`DownloadError` listing the URL and the path of every file needed."""
    import torchvision

    from convflat.data import download, torchvision_files
    from convflat.io import atomic_write_json, provenance
    from convflat.train import error_text

    start_time, root = time.perf_counter(), str(root)
    try:
        sizes = download(source, root)
    except Exception as exc:  # network errors come in many types
        lines = [f"could not download {source} into {root}/ ({error_text(exc)}).",
                 "This machine may be offline. Download these files elsewhere and put them at:"]
        lines += [f"    {url}\n        -> {path}" for url, path in torchvision_files(source, root)]
        lines += ["then run snakemake again: the files are verified (MD5) and used without "
                  "network.", "For a study that needs no download at all: "
                  "snakemake --cores all --configfile config/quick.yaml"]
        raise DownloadError("\n".join(lines)) from exc
    log.info("%s: %s images", source, sizes)
    files = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                   if p.is_file() and p.name != Path(marker).name)
    record = {**provenance(seconds=time.perf_counter() - start_time), "source": source,
              "root": root, "torchvision_version": torchvision.__version__, "files": files}
    atomic_write_json(marker, record)
    return record


# ------------------------------------------------------------------------------ start-up


def startup_notice(config: Mapping[str, Any],
                   runs: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    """What to tell the user when a real run of a GPU config starts: ``("info", text)``
    with the time estimate when torch sees CUDA, ``("warning", text)`` pointing to the
    quick study when it does not; None for a CPU config (``gpu: false``)."""
    if not config["gpu"]:
        return None
    from convflat.study import estimate_text

    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    text = estimate_text(config, runs)
    if has_gpu:
        return "info", (f"convflat: {text}. Use --profile profiles/local so that jobs never "
                        "share a GPU.")
    return "warning", (
        "\n" + "=" * 78 + "\n"
        "convflat: this config asks for a GPU (config key 'gpu: true'), but torch sees no\n"
        f"CUDA device here. {text}.\n"
        "For a complete study that runs offline on a CPU in minutes, use:\n"
        "    snakemake --cores all --configfile config/quick.yaml\n"
        "Continuing; stop with Ctrl-C (finished runs are kept, training resumes).\n"
        + "=" * 78)


def report_estimate(config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]],
                    log_path: str | os.PathLike) -> str:
    """The ``estimate`` rule: print :func:`convflat.study.estimate_text` and keep it in
    ``log_path``; returns it."""
    from convflat.study import estimate_text

    text = estimate_text(config, runs)
    print(text)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(text + "\n")
    return text
