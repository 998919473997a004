"""What the workflow runs, draws and checks: its stages, figures and validation tables.

The workflow's ``common.smk`` reads this module on every dry run, in the Snakemake process,
so importing it imports neither torch nor pandas. The bodies of the figures and tables
import the analysis and measure code when they run (in the job's process): those imports
are function-local here on purpose, and nowhere else in :mod:`convflat.pipeline`.

* :data:`STAGES`: the stages, one per rule file ``workflow/rules/<stage>.smk`` and one
  job module ``convflat.pipeline.<stage>`` each, with the rules they define.
* :data:`FIGURES`: the figures of a study, each registered with :func:`figure`; the
  ``figure`` and ``overall_figure`` rules take their targets, inputs, wildcard constraints
  and captions from it.
* :data:`VALIDATION_TABLES`: the tables that check the method, each registered with
  :func:`validation_table`; the ``validation_reference`` and ``validation_model`` rules take
  their targets from it.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FIGURES", "STAGES", "VALIDATION_TABLES", "Figure", "Stage", "ValidationTable", "figure",
    "validation_table",
]

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One stage of the workflow: the rules of ``workflow/rules/<name>.smk``, whose jobs run
    the code of ``convflat.pipeline.<name>`` (and of the library it calls)."""

    name: str
    rules: tuple[str, ...]
    summary: str

    @property
    def rule_file(self) -> str:
        """Its rule file, relative to the repository root."""
        return f"workflow/rules/{self.name}.smk"

    @property
    def module(self) -> str:
        """Its job module."""
        return f"convflat.pipeline.{self.name}"


#: name -> :class:`Stage`, in the order of the workflow.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("data", ("folder_manifest", "download", "prepare"),
          "download a torchvision source, prepare every dataset into one tensor file"),
    Stage("train", ("train", "estimate"), "train one run of a study; the time estimate"),
    Stage("measure", ("measure",), "every configured measure of one trained run"),
    Stage("analysis", ("collect", "correlation", "runs_summary", "tau_along", "headline", "figure",
                       "overall_correlation", "overall_figure"),
          "a study's runs table, correlation tables, headline and figures"),
    Stage("validation", ("validation_reference", "validation_model", "hutchinson_figure"),
          "the tables and the figure that check the method itself"),
    Stage("report", ("overview_notebook", "validation_notebook", "notebook_html"),
          "the executed notebooks and their HTML"),
)}


# ------------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class Figure:
    """One figure of a study: ``results/figures/<study>/<name>.{png,pdf}``, and beside it
    ``<name>.caption.rst``, what the Snakemake report says under it.

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
        caption: its fixed caption (reStructuredText): the docstring of ``draw``.
        explain: None, or ``explain(inputs, analysis) -> str``: what this study's data show,
            computed from the same inputs when the figure is drawn; its caption file then
            holds that text instead of :attr:`caption`, and the report shows both.
    """

    name: str
    draw: Callable[[Mapping[str, Any], Path, Mapping[str, Any]], list[Path]]
    reads: tuple[str, ...]
    overall: bool = False
    when: str | None = None
    caption: str = ""
    explain: Callable[[Mapping[str, Any], Mapping[str, Any]], str] | None = None

    @property
    def computed_caption(self) -> bool:
        """Whether the caption file is computed from the data (see :attr:`explain`)."""
        return self.explain is not None

    def caption_text(self, inputs: Mapping[str, Any], analysis: Mapping[str, Any]) -> str:
        """The text of the caption file: :attr:`explain` of the inputs, or :attr:`caption`."""
        return self.explain(inputs, analysis) if self.explain else self.caption

    def wanted(self, study: Mapping[str, Any]) -> bool:
        """Whether a study (its validated config, defaults filled) draws this figure."""
        value: Any = study
        for key in (self.when.split(".") if self.when else []):
            value = value[key]
        return bool(value)


#: name -> :class:`Figure`, in the order they are drawn.
FIGURES: dict[str, Figure] = {}


def figure(name: str, *, reads: tuple[str, ...], overall: bool = False,
           when: str | None = None, explain: Callable | None = None) -> Callable:
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
                               inspect.cleandoc(draw.__doc__ or ""), explain)
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


def _false_friend_finding(inputs, analysis):
    """What the weight-decay sweep of this study's runs shows (computed, in words)."""
    from convflat.analysis import read_runs
    from convflat.analysis.figures import false_friend_caption

    text = false_friend_caption(read_runs(inputs["runs"]),
                                require_converged=analysis["require_converged"])
    log.info("false friend: %s", text)
    return text


@figure("false_friend", reads=("runs",), when="false_friend", explain=_false_friend_finding)
def _false_friend(inputs, out, analysis):
    """"Flatness is a false friend" (Granziol 2020): test error, Hessian traces and the
    conv-layer relative flatness against weight decay at otherwise fixed settings (mean and
    one standard deviation over seeds). Granziol's point: weight decay changes the scale of
    the weights, which moves the Hessian trace whatever it does to test error, so the trace
    can call the better-generalizing nets sharper; the relative flatness, invariant to that
    rescaling, need not. What this study's runs show is computed from them in
    ``false_friend.caption.rst`` beside the figure (in the report, below)."""
    from convflat.analysis import plot_false_friend, read_runs

    return plot_false_friend(read_runs(inputs["runs"]), out,
                             require_converged=analysis["require_converged"])


@figure("flatness_over_training", reads=("runs", "records"), when="train.track_flatness")
def _flatness_over_training(inputs, out, analysis):
    """Conv trace and conv relative flatness against the training loss (eval mode, whole
    training split, when the study stops at a target loss) after every epoch, one line per
    run, coloured by the first grid axis that is not a seed; a dot where each run stopped,
    the dashed line the stopping target. Shows whether the nets are compared on the same
    part of their trajectories. Runs that failed or diverged are left out."""
    from convflat.analysis import NUISANCE_AXES, plot_flatness_over_training, read_runs
    from convflat.analysis.figures import load_histories

    runs = read_runs(inputs["runs"]).set_index("run_id")
    labels, stops = {}, set()
    for path in map(Path, inputs["records"]):
        rec = json.loads(path.read_text())  # its status and stopping target
        if rec.get("status") != "ok" or not rec.get("history"):
            continue
        folder = "/" + path.parent.as_posix()  # .../<study>/<run_id>
        label = next((r for r in runs.index if folder.endswith("/" + r)), None)
        if label is None:
            raise ValueError(f"{path} is not the record of a run of {inputs['runs']}")
        labels[label] = path
        stops.add((rec.get("config") or {}).get("stop_loss"))
    histories = load_histories(list(labels.values()), labels=list(labels))
    axes = [c for c in runs.columns if c.startswith("hp_") and c not in NUISANCE_AXES
            and runs[c].nunique() > 1]
    hue = ({label: runs.at[label, axes[0]] for label in histories} if axes else None)
    return plot_flatness_over_training(
        histories, out, hue=hue, hue_name=axes[0][3:] if axes else "",
        stop_loss=stops.pop() if len(stops) == 1 else None)


# --------------------------------------------------------------------- validation tables


@dataclass(frozen=True)
class ValidationTable:
    """One table of ``results/tables/validation/<name>.{csv,md}``.

    Attributes:
        name: the file stem, registry key and key of its settings under the config's
            ``validation`` section.
        build: ``build(cfg, device, run) -> DataFrame``: ``cfg`` is the slice of the
            ``validation`` section the table depends on (``seed`` and ``cfg[name]``; for a
            table that uses a model also ``n_samples`` and ``batch_size``), ``run`` a
            :class:`convflat.pipeline.validation.TrainedRun` or None.
        uses_model: built on the trained model of the config's validation run (on the
            configured device); otherwise on small reference networks, on the CPU.
        caption: its caption in the Snakemake report: the docstring of ``build``.
    """

    name: str
    build: Callable[[Mapping[str, Any], Any, Any], Any]
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
