# Config validation, input functions and wildcard constraints shared by the stage files.
#
# What a study is (its grid, run ids, prepared files, time estimate) is convflat.study; the
# figures and validation tables are registries in convflat.pipeline.registry. Neither
# imports torch, so a dry run stays fast.

import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

from convflat.sources import SOURCES, find_source
from convflat.study import (
    RUN_ID_PATTERN,
    ConfigError,
    check_config,
    code_version,
    expand_studies,
    prepared_files,
    validation_extra_runs,
    validation_run,
)
from convflat.pipeline.data import folder_digest, user_data_path, write_folder_manifest
from convflat.pipeline.notices import failed_runs_notice
from convflat.pipeline.registry import FIGURES, VALIDATION_TABLES
from convflat.pipeline.report import building_a_report, landing_summary
from convflat.pipeline.train import report_estimate, startup_notice

# ---------------------------------------------------------------------------- validation


def _key_path(path):
    """['studies', 'digits', 'grid', 'width', 0] -> 'studies.digits.grid.width[0]'."""
    text = ""
    for part in path:
        text += (
            f"[{part}]"
            if isinstance(part, int)
            else (f".{part}" if text else str(part))
        )
    return text or "<top level>"


def _schema_error(exc):
    """The jsonschema error inside Snakemake's WorkflowError, as one line naming the key."""
    import jsonschema

    chain = [exc.__cause__, exc.__context__, *exc.args]
    err = next((a for a in chain if isinstance(a, jsonschema.ValidationError)), None)
    if err is None:
        return str(exc)
    best = jsonschema.exceptions.best_match([err] + list(err.context or [])) or err
    return f"config key '{_key_path(best.absolute_path)}': {best.message}"


def validated_plan(config):
    """Validate ``config`` (schema defaults filled in place), then expand its studies:
    ``{study: {run_id: Run}}``. Every error is a WorkflowError naming the offending key.
    """
    try:
        validate(config, "../schemas/config.schema.yaml")
    except WorkflowError as exc:
        raise WorkflowError(
            f"invalid config: {_schema_error(exc)}\n"
            "(every key is documented in workflow/schemas/config.schema.yaml)"
        ) from None
    try:
        # a job that re-reads the Snakefile (on a SLURM node, or in a subprocess) runs a config
        # the main process already checked in depth; skip the checks that import torch there
        check_config(
            config, deep=not (workflow.remote_exec or workflow.subprocess_exec)
        )
        runs = expand_studies(config)
        if config["validation"]["enabled"]:
            validation_run(config, runs)
            validation_extra_runs(config, runs)
    except ConfigError as exc:
        raise WorkflowError(str(exc)) from None
    return runs


RUNS = validated_plan(config)
STUDIES = config["studies"]
PREPARED = prepared_files(config)


wildcard_constraints:
    study="|".join(re.escape(s) for s in STUDIES),
    run_id=RUN_ID_PATTERN,
    prepared=r"[A-Za-z0-9_.-]+",
    dataset="|".join(re.escape(d) for d in config["datasets"]),
    source="|".join(s.name for s in SOURCES.values() if s.torchvision),


# ----------------------------------------------------------------------- input functions


def run_of(wildcards):
    """The :class:`convflat.study.Run` of the job's study and run id."""
    try:
        return RUNS[wildcards.study][wildcards.run_id]
    except KeyError:
        known = list(RUNS.get(wildcards.study, {}))[:3]
        raise WorkflowError(
            f"no run {wildcards.run_id!r} in study {wildcards.study!r} "
            f"(studies: {sorted(RUNS)}; run ids look like {known})"
        ) from None


def study_runs(pattern):
    """Input function: ``pattern`` (an output of rule train or measure) for every run of
    the job's study."""
    return lambda wildcards: [
        pattern.format(study=wildcards.study, run_id=r) for r in RUNS[wildcards.study]
    ]


def figure_inputs(wildcards):
    """The tables of the study that figure ``wildcards.figure`` draws from."""
    tables = {
        "runs": rules.collect.output.runs,
        "correlation": rules.correlation.output.csv,
    }
    reads = FIGURES[wildcards.figure].reads
    out = {t: tables[t].format(study=wildcards.study) for t in reads if t in tables}
    if "records" in reads:  # every run's train.json
        out["records"] = study_runs(rules.train.output.record)(wildcards)
    return out


def tracks_flatness(study):
    """Whether the study's runs record the per-epoch flatness that tau_along reads."""
    return FIGURES["flatness_over_training"].wanted(STUDIES[study])


def headline_inputs(wildcards):
    """The headline's tables: the correlation and runs tables, and the tau along training
    where the study tracks the flatness per epoch."""
    out = {
        "correlation": rules.correlation.output.csv.format(study=wildcards.study),
        "runs": rules.collect.output.runs.format(study=wildcards.study),
    }
    if tracks_flatness(wildcards.study):
        out["along"] = rules.tau_along.output.csv.format(study=wildcards.study)
    return out


def dataset_config(wildcards):
    """The slice of config a prepared file depends on (its dataset entry, label noise and,
    for a grid's subset axis, its training-set size)."""
    try:
        dataset, noise, subset = PREPARED[wildcards.prepared]
    except KeyError:
        raise WorkflowError(
            f"data/prepared/{wildcards.prepared}.pt is not a dataset of this config "
            f"(known: {sorted(PREPARED)})"
        ) from None
    sizes = {} if subset is None else {"subset": subset}
    return {**config["datasets"][dataset], "label_noise": noise, **sizes}


def raw_root(wildcards):
    """data/raw/<source>: where the download rule puts a torchvision source."""
    name = dataset_config(wildcards)["source"]
    source = find_source(name)
    return f"data/raw/{source.name if source else name}"


def prepare_input(wildcards):
    """What a prepared file is made from, so that Snakemake remakes it (and everything
    downstream) when that changes: the download marker of a torchvision source, the file of
    an ``npz:PATH`` source, the listing of a ``folder:PATH`` source (rule folder_manifest);
    nothing for sources that ship with a package."""
    name = dataset_config(wildcards)["source"]
    source = find_source(name)
    if source is not None and source.torchvision:
        return {"download": rules.download.output.marker.format(source=source.name)}
    key = PREPARED[wildcards.prepared][0]
    if str(name).startswith("npz:"):
        path = user_data_path(name)
        if not path.is_file():
            raise WorkflowError(
                f"invalid config: config key 'datasets.{key}.source': {name!r}: no file "
                f"{path} (relative paths start at {Path.cwd()})"
            )
        return {"user_data": str(path)}
    if str(name).startswith("folder:"):
        return {"manifest": rules.folder_manifest.output.manifest.format(dataset=key)}
    return {}


def manifest_folder(wildcards):
    """The folder of the ``folder:PATH`` source of dataset ``wildcards.dataset``."""
    name = str(config["datasets"][wildcards.dataset]["source"])
    path = user_data_path(name)
    if not name.startswith("folder:") or not path.is_dir():
        raise WorkflowError(
            f"invalid config: config key 'datasets.{wildcards.dataset}.source': {name!r} "
            f"is not a folder: source with an existing folder ({path})"
        )
    return str(path)


def run_prepared(wildcards):
    return rules.prepare.output.data.format(prepared=run_of(wildcards).prepared)


def validation_inputs(wildcards):
    """The trained run the model-based validation tables use, and its data; for the
    invariance table also those of validation.invariance.extra_runs (lists ``also_model``,
    ``also_init``, ``also_record``, ``also_data``)."""

    def files(run):
        out = {
            k: getattr(rules.train.output, k).format(study=run.study, run_id=run.run_id)
            for k in ("model", "init", "record")
        }
        return {**out, "data": rules.prepare.output.data.format(prepared=run.prepared)}

    main = files(validation_run(config, RUNS))
    if getattr(wildcards, "table", None) == "invariance":
        extra = [files(run) for run in validation_extra_runs(config, RUNS)]
        if extra:
            main.update({f"also_{k}": [e[k] for e in extra] for k in extra[0]})
    return main


def validation_slice(table):
    """The part of config['validation'] that the table ``table`` depends on."""
    val = config["validation"]
    if not VALIDATION_TABLES[table].uses_model:
        return {"seed": val["seed"], table: val[table]}
    return {
        "model": validation_run(config, RUNS).path,
        **{k: val[k] for k in ("n_samples", "batch_size", "seed")},
        table: val[table],
    }


def tables_where(uses_model):
    return "|".join(
        n for n, t in VALIDATION_TABLES.items() if t.uses_model == uses_model
    )


def res(stage, key):
    """config['resources'][stage][key] (schema defaults fill what the config leaves out)."""
    return config["resources"][stage][key]


def gpus(stage):
    """1 for a GPU stage when the config asks for GPUs (config key ``gpu``), else 0."""
    return 1 if config["gpu"] and stage in ("train", "measure") else 0


def notebook_template(name):
    """notebooks/<name>.ipynb beside the Snakefile, relative to the working directory when
    it is below it (so paths in logs stay short)."""
    path = Path(workflow.basedir) / "notebooks" / f"{name}.ipynb"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------------ targets


def study_targets(study):
    """Every table, figure and notebook of one study."""
    out = [rules.collect.output.runs.format(study=study)]
    for table in (rules.correlation, rules.runs_summary, rules.headline):
        out += [f.format(study=study) for f in table.output]
    if tracks_flatness(study):
        out += [f.format(study=study) for f in rules.tau_along.output]
    for name, fig in FIGURES.items():
        if fig.wanted(STUDIES[study]):
            out += [f.format(study=study, figure=name) for f in rules.figure.output]
    if config["notebooks"]["enabled"]:
        out += [
            rules.overview_notebook.output.notebook.format(study=study),
            rules.notebook_html.output.html.format(path=f"{study}/overview"),
        ]
    return out


def overall_targets():
    """The pooled analysis over every study, when there are at least two."""
    if len(STUDIES) < 2 or not config["analysis"]["overall"]:
        return []
    out = list(rules.overall_correlation.output)
    for name, fig in FIGURES.items():
        if fig.overall:
            out += [f.format(figure=name) for f in rules.overall_figure.output]
    return out


def validation_targets():
    if not config["validation"]["enabled"]:
        return []
    out = []
    for name, table in VALIDATION_TABLES.items():
        builder = (
            rules.validation_model if table.uses_model else rules.validation_reference
        )
        out += [f.format(table=name) for f in builder.output]
    out += list(rules.hutchinson_figure.output)
    if config["notebooks"]["enabled"]:
        out += [
            rules.validation_notebook.output.notebook,
            rules.notebook_html.output.html.format(path="validation"),
        ]
    return out


def all_targets():
    out = [t for study in STUDIES for t in study_targets(study)]
    return out + overall_targets() + validation_targets()


def startup_message():
    """At the start of a real (not dry) run: warn when a GPU config meets no GPU."""
    notice = startup_notice(config, RUNS) if workflow.local_exec else None
    if notice is not None:
        getattr(logger, notice[0])(notice[1])


# ------------------------------------------------------------------ snakemake --report
#
# Snakemake puts in the report every file flagged report(...) among the inputs and outputs
# of the jobs that make the targets, and refuses to build it when one of them does not
# exist. Building the report (and only then; report.smk calls report_only_what_exists once
# all rules are defined), a path is flagged only when its file exists. Every flagged input
# and output pattern of every rule gets the class ReportIfExists, which drops the flag
# from a job's file (apply_wildcards) or a formatted target (format) that is missing. The
# landing page (workflow/report/workflow.rst) then lists what is missing.


def report_only_what_exists():
    """Make every report-flagged pattern of every rule flag only files that exist, and
    return the landing page's summary (convflat.pipeline.report.landing_summary).
    ReportIfExists subclasses Snakemake's path class snakemake.io._IOFile (9.x); the
    end-to-end test builds a report after deleting a file to check it still works."""
    from snakemake.io import _IOFile

    class ReportIfExists(_IOFile):
        __slots__ = ()

        def apply_wildcards(self, wildcards):
            return _unflag_if_missing(super().apply_wildcards(wildcards))

        def format(self, *args, **kwargs):
            return _unflag_if_missing(super().format(*args, **kwargs))

    for each in workflow.rules:
        for item in [*each.input, *each.output]:
            if type(item) is _IOFile and item.is_flagged("report"):
                item.__class__ = ReportIfExists
    studies = {
        s: {
            "headline": rules.headline.output.md.format(study=s),
            "runs": rules.collect.output.runs.format(study=s),
        }
        for s in STUDIES
    }
    return landing_summary(
        studies,
        all_targets(),
        require_converged=config["analysis"]["require_converged"],
    )


def _unflag_if_missing(path):
    """``path`` (a job's file or a formatted pattern) without its report flag when the file
    does not exist."""
    flags = getattr(path, "flags", None)
    if flags and "report" in flags and not Path(str(path)).exists():
        del flags["report"]
    return path


# ------------------------------------------------------------------------- end of a run


def failed_runs_message():
    """At the end of a run (successful or not), in the main Snakemake process: name every
    study whose runs table has runs that failed, diverged or did not converge, so that
    "100% done" is never the only word on a study without results."""
    if workflow.remote_exec or workflow.subprocess_exec:
        return
    tables = {s: rules.collect.output.runs.format(study=s) for s in STUDIES}
    notice = failed_runs_notice(
        tables, require_converged=config["analysis"]["require_converged"]
    )
    if notice is not None:
        logger.warning(notice)


onsuccess:
    failed_runs_message()


onerror:
    failed_runs_message()
