"""What a study is: its grid, its run ids, its runs, its data files and how long it takes.

A *study* (a value of the workflow config's ``studies``) trains one model per point of its
``grid`` on one dataset. This module turns a validated config into that plan, with no
Snakemake and no torch (a dry run of the workflow imports it; only :func:`estimate_hours`
builds models, and imports torch when it runs):

* :data:`AXES`: the grid axes, where each value goes (model spec, training settings, data)
  and its abbreviation in run ids.
* run ids: ``width~32/depth~3/wd~0.0001/seed~0``, one ``abbrev~value`` per axis in the grid's
  order, in the style of Snakemake's Paramspace (:func:`format_run_id`,
  :func:`parse_run_id`, :data:`RUN_ID_PATTERN`).
* :func:`expand_study`: ``{run_id: Run}`` for every point of a study's grid.
* :func:`prepared_name` / :func:`prepared_files`: the prepared data files a config needs.
* :func:`estimate_hours` / :func:`estimate_text`: how long training and measuring take.
* :data:`STAGE_VERSIONS` / :func:`code_version`: the version string of each stage's code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import convflat
from convflat.sources import find_source, source_names

__all__ = [
    "AXES", "RATES", "RUN_ID_PATTERN", "STAGE_VERSIONS", "Axis", "ConfigError", "Run",
    "check_config", "check_measures", "check_models", "check_training", "code_version",
    "estimate_hours",
    "estimate_text", "expand_studies",
    "expand_study", "format_run_id", "format_value", "parse_run_id", "prepared_files",
    "prepared_name", "validation_extra_runs", "validation_run",
]


class ConfigError(ValueError):
    """A config that validates against the schema but describes an impossible study; the
    message names the config key."""


# ------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Axis:
    """One grid axis.

    Attributes:
        name: the key under a study's ``grid`` (and the ``hp_<name>`` column of runs.csv).
        section: where a value goes: ``"model"`` (the model spec), ``"train"`` (the
            training settings, fields of :class:`convflat.train.TrainConfig`) or ``"data"``
            (the prepared dataset: its training-set size and label noise; each value is its
            own prepared file).
        abbrev: the name in run ids (``wd`` in ``wd~0.0001``).
        settings: the settings one value sets, when they are not ``{name: value}``.
    """

    name: str
    section: str
    abbrev: str
    settings: Callable[[Any], dict[str, Any]] | None = None

    def apply(self, value: Any) -> dict[str, Any]:
        """The settings of ``section`` that ``value`` sets."""
        return self.settings(value) if self.settings else {self.name: value}


def _augment(on: bool) -> dict[str, Any]:
    """augment on: the dataset's default crop and flip; off: neither."""
    return {"crop_padding": None if on else 0, "flip": None if on else False}


#: grid axis -> :class:`Axis`. A new axis is a row here and a property of the schema's
#: ``grid`` block (workflow/schemas/config.schema.yaml).
AXES: dict[str, Axis] = {a.name: a for a in (
    Axis("width", "model", "width"),
    Axis("depth", "model", "depth"),
    Axis("dropout", "model", "drop"),
    Axis("weight_decay", "train", "wd"),
    Axis("lr", "train", "lr"),
    Axis("batch_size", "train", "bs"),
    Axis("epochs", "train", "ep"),
    Axis("augment", "train", "aug", _augment),
    Axis("subset", "data", "n"),
    Axis("label_noise", "data", "noise"),
    Axis("seed", "train", "seed"),
)}

RUN_ID_SEP = "/"  # one directory level per axis, as in Snakemake's Paramspace
#: A run id as a regular expression (the workflow's wildcard constraint).
RUN_ID_PATTERN = r"[^/~]+~[^/]+(/[^/~]+~[^/]+)*"


def format_value(value: Any) -> str:
    """A hyperparameter value as it appears in a run id: 1e-4 -> '0.0001', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def format_run_id(hp: Mapping[str, Any]) -> str:
    """``{"width": 8, "weight_decay": 1e-3}`` -> ``width~8/wd~0.001`` (axes in ``hp``'s order)."""
    unknown = [a for a in hp if a not in AXES]
    if unknown:
        raise ValueError(f"unknown grid axis {unknown[0]!r} (axes: {list(AXES)})")
    return RUN_ID_SEP.join(f"{AXES[a].abbrev}~{format_value(v)}" for a, v in hp.items())


def parse_run_id(run_id: str) -> dict[str, str]:
    """``width~8/wd~0.001`` -> ``{"width": "8", "weight_decay": "0.001"}`` (values as text)."""
    by_abbrev = {a.abbrev: a.name for a in AXES.values()}
    out: dict[str, str] = {}
    for part in run_id.split(RUN_ID_SEP):
        abbrev, sep, text = part.partition("~")
        if not sep or not text or abbrev not in by_abbrev:
            raise ValueError(f"run id {run_id!r}: {part!r} is not <axis>~<value> with an axis "
                             f"abbreviation of {list(by_abbrev)}")
        if by_abbrev[abbrev] in out:
            raise ValueError(f"run id {run_id!r} names axis {abbrev!r} twice")
        out[by_abbrev[abbrev]] = text
    return out


def prepared_name(dataset: str, label_noise: float, subset: int | None = None) -> str:
    """The stem of a prepared file: ``cifar10``; ``cifar10-n5000`` for a grid's ``subset``
    value 5000; ``cifar10-noise0.2`` with label noise; ``cifar10-n5000-noise0.2`` with both.
    ``subset`` None: the dataset's own ``subset`` setting (part of the dataset key's
    config, so not of the name)."""
    name = dataset if subset is None else f"{dataset}-n{int(subset)}"
    return name if not label_noise else f"{name}-noise{format_value(label_noise)}"


@dataclass(frozen=True)
class Run:
    """One point of a study's grid.

    Attributes:
        run_id: its name (:func:`format_run_id` of ``hp``).
        hp: ``{axis: value}`` in the grid's order.
        spec: the model spec without the data's channels, classes and image size (training
            adds them).
        train: the training settings (TrainConfig fields, without ``device``).
        prepared: the stem of its prepared dataset file (:func:`prepared_name`).
        study: the name of its study.
        data: the data settings its grid sets (``label_noise``, ``subset``; ``subset`` None:
            the dataset's own setting).
    """

    run_id: str
    hp: dict[str, Any] = field(hash=False)
    spec: dict[str, Any] = field(hash=False)
    train: dict[str, Any] = field(hash=False)
    prepared: str = ""
    study: str = ""
    data: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def path(self) -> str:
        """``<study>/<run_id>``: the run's directory under ``results/runs/``."""
        return f"{self.study}/{self.run_id}"


def expand_study(name: str, study: Mapping[str, Any],
                 datasets: Mapping[str, Mapping[str, Any]]) -> dict[str, Run]:
    """``{run_id: Run}`` for every point of the study's grid, in grid order (the last axis
    varies fastest). ``study`` and ``datasets`` are validated config sections (schema
    defaults filled). A grid that names one run twice raises :class:`ConfigError`."""
    grid = study["grid"]
    axes = list(grid)
    runs: dict[str, Run] = {}
    for values in itertools.product(*(grid[a] for a in axes)):
        hp = dict(zip(axes, values, strict=True))
        sections: dict[str, dict[str, Any]] = {
            "model": dict(study["model"]), "train": dict(study["train"]),
            "data": {"label_noise": datasets[study["dataset"]]["label_noise"],
                     "subset": None},  # None: the dataset's own subset setting
        }
        for axis, value in hp.items():
            sections[AXES[axis].section].update(AXES[axis].apply(value))
        run_id = format_run_id(hp)
        if run_id in runs:
            raise ConfigError(
                f"invalid config: config key 'studies.{name}.grid' gives run id {run_id!r} "
                "twice (a value is repeated)")
        runs[run_id] = Run(run_id=run_id, hp=hp, spec=sections["model"],
                           train=sections["train"],
                           prepared=prepared_name(study["dataset"],
                                                  sections["data"]["label_noise"],
                                                  sections["data"]["subset"]),
                           study=name, data=sections["data"])
    return runs


def expand_studies(config: Mapping[str, Any]) -> dict[str, dict[str, Run]]:
    """``{study: {run_id: Run}}`` of every study of a validated config."""
    return {name: expand_study(name, study, config["datasets"])
            for name, study in config["studies"].items()}


def prepared_files(config: Mapping[str, Any]
                   ) -> dict[str, tuple[str, float, int | None]]:
    """``{prepared stem: (dataset key, label noise, subset)}`` of every prepared file the
    studies use: one per combination of the ``subset`` and ``label_noise`` values of a grid
    (an axis the grid lacks takes the dataset's configured value). ``subset`` is a grid's
    value, or None where the dataset's own ``subset`` setting applies."""
    out: dict[str, tuple[str, float, int | None]] = {}
    for study in config["studies"].values():
        ds = study["dataset"]
        grid = study["grid"]
        subsets = grid.get("subset", [None])
        noises = grid.get("label_noise", [config["datasets"][ds]["label_noise"]])
        for subset, noise in itertools.product(subsets, noises):
            out[prepared_name(ds, noise, subset)] = (ds, noise, subset)
    return out


# ------------------------------------------------------------------- config cross-checks


def check_config(config: Mapping[str, Any], *, deep: bool = True) -> None:
    """The checks a JSON schema cannot make, on a config the schema has validated (defaults
    filled): every study names a dataset of the config, every dataset a known source, a
    false-friend study has a weight_decay axis, and validation.study names a study (the
    validation run: :func:`validation_run`). With ``deep`` (the default; it imports torch
    when it runs) also the measures (:func:`check_measures`) and the model specs and their
    heads (:func:`check_models`). Raises :class:`ConfigError` naming the key."""
    for key, ds in config["datasets"].items():
        src = ds["source"]
        if find_source(src) is None and not str(src).startswith(("npz:", "folder:")):
            raise ConfigError(f"invalid config: config key 'datasets.{key}.source': {src!r} is "
                              f"not a known source ({source_names()})")
    for name, study in config["studies"].items():
        if study["dataset"] not in config["datasets"]:
            raise ConfigError(
                f"invalid config: config key 'studies.{name}.dataset': "
                f"{study['dataset']!r} is not one of datasets {sorted(config['datasets'])}")
        if study["false_friend"] and "weight_decay" not in study["grid"]:
            raise ConfigError(
                f"invalid config: config key 'studies.{name}.false_friend' is true, but "
                f"studies.{name}.grid has no 'weight_decay' axis to sweep")
    val = config["validation"]
    if val["enabled"] and val["study"] is not None and val["study"] not in config["studies"]:
        raise ConfigError(
            f"invalid config: config key 'validation.study': {val['study']!r} is not "
            f"one of the studies {sorted(config['studies'])}")
    check_training(config)
    if deep:
        check_measures(config)
        check_models(config)


def check_training(config: Mapping[str, Any]) -> None:
    """Every run's training settings make a valid :class:`convflat.train.TrainConfig` (the
    checks between fields that the schema cannot make: warmup_epochs <= epochs, nesterov
    with SGD and momentum, ...). Raises :class:`ConfigError` naming the key
    (``studies.<s>.train.<field>``, or ``studies.<s>.grid.<axis>`` when a grid value is
    the cause). Imports no torch."""
    import re

    from convflat.train_config import TrainConfig

    for name, study in config["studies"].items():
        for run in expand_study(name, study, config["datasets"]).values():
            try:
                TrainConfig.from_dict(dict(run.train))
            except (TypeError, ValueError) as exc:
                match = re.search(r"TrainConfig\.(\w+)", str(exc))
                field = match.group(1) if match else None
                section = "grid" if field in study["grid"] else "train"
                where = f"studies.{name}.{section}" + (f".{field}" if field else "")
                raise ConfigError(f"invalid config: config key '{where}': {exc} "
                                  f"(run {run.run_id})") from None


# The checks below build things the schema cannot see into: every study's model spec (on the
# meta device, no weights) and the measure registry. They import torch when they run, never
# when this module is imported.

#: head structure (:func:`_structure`, as sorted JSON) -> None when it is in the measured
#: class, else ("class", the refusal of :func:`convflat.models.check_head`).
_SPEC_CHECKS: dict[str, tuple[str, str] | None] = {}
# What a spec's data facts are when the source is the user's own files (npz:, folder:):
# the class membership of gapcnn, resnet and torchvision heads does not depend on them.
_USER_DATA_FACTS = {"in_channels": 3, "num_classes": 10, "image_size": [32, 32]}


def _data_facts(source: str) -> dict[str, Any]:
    """in_channels, num_classes and image_size of a dataset's images, from its source."""
    row = find_source(source)
    if row is None:
        return dict(_USER_DATA_FACTS)
    return {"in_channels": row.channels, "num_classes": row.classes,
            "image_size": list(row.image_size)}


def _structure(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A normalized gapcnn/resnet spec with the values that change no layer's type or place
    set to small stand-ins (widths, channels, classes, the dropout probability), so that
    specs with the same head structure are traced once; torchvision specs as they are."""
    if spec["family"] == "torchvision":
        return dict(spec)
    out = {**spec, "width": 2, "in_channels": 1, "num_classes": 2}
    if "dropout" in out:
        out["dropout"] = 0.5 if out["dropout"] else 0.0
    return out


def _check_spec(spec: Mapping[str, Any]) -> tuple[str, str] | None:
    """None when ``spec`` builds and its head is in the measured class, else (kind,
    message): kind "spec" (:func:`convflat.models.normalize_spec` refused it) or "class"
    (:func:`convflat.models.check_head` did). Each distinct head structure is traced once
    per process (:data:`_SPEC_CHECKS`)."""
    import json

    from convflat.models import normalize_spec

    try:
        full = normalize_spec(dict(spec))
    except (TypeError, ValueError) as exc:
        return "spec", str(exc)
    key = json.dumps(_structure(full), sort_keys=True, default=str)
    if key not in _SPEC_CHECKS:
        from convflat.curvature import OutOfClassError, find_head
        from convflat.models import build_model, check_head

        structure = json.loads(key)
        try:
            if structure["family"] == "torchvision":
                check_head(structure)  # on the meta device: no weights
            else:  # a 2-channel stand-in builds on the CPU faster than on meta
                find_head(build_model(structure))
            _SPEC_CHECKS[key] = None
        except OutOfClassError as exc:
            _SPEC_CHECKS[key] = ("class", str(exc))
    return _SPEC_CHECKS[key]


def check_models(config: Mapping[str, Any]) -> None:
    """Every distinct model spec of every study builds (without weights) and its head is in
    the class the curvature measures (:func:`convflat.models.check_head`), with the data's
    channels, classes and image size filled in from the dataset's source (stand-ins for
    ``npz:``/``folder:`` data). Raises :class:`ConfigError` naming the config key: the
    model option (``studies.<s>.model.<key>``, or ``studies.<s>.grid.<axis>`` when a grid
    value is wrong), ``studies.<s>.model.arch`` for a torchvision net outside the class."""
    import re

    for name, study in config["studies"].items():
        source = config["datasets"][study["dataset"]]["source"]
        facts = _data_facts(source)
        for key in ("in_channels", "num_classes"):
            given = study["model"].get(key)
            if given is not None and find_source(source) is not None and given != facts[key]:
                raise ConfigError(
                    f"invalid config: config key 'studies.{name}.model.{key}': {given!r}, but "
                    f"source {source!r} has {facts[key]!r}")
        if study["model"].get("family") == "torchvision":
            facts.pop("image_size")
        for run in expand_study(name, study, config["datasets"]).values():
            spec = {**facts, **run.spec}
            problem = _check_spec(spec)
            if problem is None:
                continue
            kind, message = problem
            if kind == "class":
                where = "arch" if spec["family"] == "torchvision" else "family"
                what = spec.get("arch") or spec["family"]
                hp = {k: v for k, v in run.hp.items() if AXES[k].section == "model"}
                at = f" (run {format_run_id(hp)})" if hp else ""
                raise ConfigError(
                    f"invalid config: config key 'studies.{name}.model.{where}': {what}{at} "
                    f"is outside the measurable class: {message}")
            match = re.match(r"spec key '(\w+)'", message)
            option = match.group(1) if match else None
            section = "grid" if option in study["grid"] else "model"
            where = f"studies.{name}.{section}" + (f".{option}" if option else "")
            unknown = re.match(r"spec key '\w+' is not a (\w+) option \((.*)\)", message)
            if unknown:
                message = (f"unknown model option {option!r} of family {unknown.group(1)} "
                           f"({unknown.group(2)})")
            raise ConfigError(f"invalid config: config key '{where}': {message}")


def _measure_sections(config: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(config key, names, params) of every place a config names measures."""
    out = [(f"studies.{name}.measure", s["measure"]["names"], s["measure"]["params"])
           for name, s in config["studies"].items()]
    val = config["validation"]
    if val["enabled"]:
        out += [(f"validation.{table}", val[table]["names"], val[table]["params"])
                for table in ("invariance", "cost") if table in val]
    return out


def check_measures(config: Mapping[str, Any]) -> None:
    """Every measure name is registered (:data:`convflat.measures.MEASURES`), every entry of
    ``params`` names a measure that is computed, and every parameter is one that measure
    accepts. Raises :class:`ConfigError` naming the config key
    (``studies.<s>.measure.names[3]``, ``studies.<s>.measure.params.<measure>.<param>``)."""
    from convflat.measures import MEASURES, resolve_names

    for where, names, params in _measure_sections(config):
        items = [names] if isinstance(names, str) else list(names)
        for i, item in enumerate(items):
            if item not in MEASURES and item not in ("default", "all"):
                at = where + (".names" if isinstance(names, str) else f".names[{i}]")
                raise ConfigError(
                    f"invalid config: config key '{at}': unknown measure {item!r} "
                    f"(known: {', '.join(MEASURES)}; or 'default', 'all')")
        computed = resolve_names(names)
        for measure, values in (params or {}).items():
            at = f"{where}.params.{measure}"
            if measure not in MEASURES:
                raise ConfigError(f"invalid config: config key '{at}': unknown measure "
                                  f"{measure!r} (known: {', '.join(MEASURES)})")
            if measure not in computed:
                raise ConfigError(f"invalid config: config key '{at}': parameters for "
                                  f"measure {measure!r}, which {where}.names does not compute")
            accepted = MEASURES[measure].defaults
            for param in values or {}:
                if param not in accepted:
                    raise ConfigError(
                        f"invalid config: config key '{at}.{param}': unknown parameter "
                        f"{param!r} of measure {measure!r} (it accepts {sorted(accepted)})")
            try:
                MEASURES[measure].resolve(values)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"invalid config: config key '{at}': {exc}") from None


def validation_run(config: Mapping[str, Any],
                   runs: Mapping[str, Mapping[str, Run]]) -> Run:
    """The trained run the validation tables use: run ``validation.run`` (default the first
    of the grid) of study ``validation.study`` (default the first study)."""
    study = config["validation"]["study"] or next(iter(config["studies"]))
    run_id = config["validation"]["run"]
    if run_id is None:
        return next(iter(runs[study].values()))
    if run_id not in runs[study]:
        raise ConfigError(
            f"invalid config: config key 'validation.run': {run_id!r} is not a run of study "
            f"{study!r} (e.g. {next(iter(runs[study]))!r})")
    return runs[study][run_id]


def validation_extra_runs(config: Mapping[str, Any],
                          runs: Mapping[str, Mapping[str, Run]]) -> list[Run]:
    """The runs of ``validation.invariance.extra_runs``: each ``<study>`` (its first run)
    or ``<study>/<run_id>``, as :class:`Run`; an unknown one raises :class:`ConfigError`
    naming its key."""
    out = []
    for i, text in enumerate(config["validation"]["invariance"].get("extra_runs") or []):
        name, _, run_id = str(text).partition("/")
        key = f"validation.invariance.extra_runs[{i}]"
        if name not in runs:
            raise ConfigError(f"invalid config: config key '{key}': {name!r} is not one of the "
                              f"studies {sorted(runs)}")
        if run_id and run_id not in runs[name]:
            raise ConfigError(
                f"invalid config: config key '{key}': {run_id!r} is not a run of study "
                f"{name!r} (e.g. {next(iter(runs[name]))!r})")
        out.append(runs[name][run_id] if run_id else next(iter(runs[name].values())))
    return out


# ------------------------------------------------------------------------ code versions

#: Bump a stage's number when a library change alters what that stage computes: the
#: version string is in the rule's params, so Snakemake reruns exactly those jobs.
STAGE_VERSIONS = {
    "prepare": 1,
    "train": 1,
    "measure": 2,
    "analysis": 1,
    "validation": 1,
    "notebook": 1,
}


def code_version(stage: str) -> str:
    """E.g. ``convflat-0.1.0/train-1``."""
    return f"convflat-{convflat.__version__}/{stage}-{STAGE_VERSIONS[stage]}"


# ---------------------------------------------------------------------- time estimate

# How long a config takes: for every run, the multiply-adds of one forward pass (counted
# on the model itself, built from its spec), times 3 for a training step (forward and
# backward) and the images of all epochs, at an achieved rate; plus a fixed cost per
# optimizer step (kernel launches, Python: the floor for small nets), with stop_loss one
# evaluation pass over the training split per epoch, with track_flatness the per-epoch
# flatness (about TRACK_PASSES forward passes over its images), the measures (about
# MEASURE_PASSES forward passes over the subsample: Lanczos, Hutchinson, the PAC-Bayes
# search and sharpness steps dominate; EXACT_PASSES over the whole split for the measures
# of measure.whole_split), and the start-up of two jobs. A run with stop_loss is assumed to
# train for its whole epoch cap, so the estimate is an upper bound for such studies.
# docs/workflow.md gives the reasoning behind the rates; `snakemake --cores 1 estimate`
# prints the result.

MEASURE_PASSES = 1000
EXACT_PASSES = 15
TRACK_PASSES = 3
#: Achieved rates: "gpu" is one H100-class GPU (bf16 autocast, eager PyTorch), "cpu" a 2-core
#: x86 CPU in fp32. docs/benchmarks.md has the measurements they come from.
RATES = {
    "gpu": {"flops": 25e12, "step_seconds": 0.003, "job_seconds": 15.0},
    "cpu": {"flops": 2.0e10, "step_seconds": 0.003, "job_seconds": 5.0},
}
_OTHER_SOURCE = (50000, (32, 32), 3, 10)  # npz: and folder: data, size unknown here


def forward_macs(spec: Mapping[str, Any], image_hw: tuple[int, int], in_channels: int,
                 num_classes: int) -> float:
    """Multiply-adds of one image's forward pass, from forward hooks on the built model
    (imports torch)."""
    import torch

    from convflat.models import build_model

    spec = {**spec, "in_channels": in_channels, "num_classes": num_classes}
    if spec["family"] in ("gapcnn", "resnet"):
        spec["image_size"] = list(image_hw)
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.weight[0].numel()  # C_in / groups x kh x kw
            macs.append(output.numel() * k)
        elif isinstance(module, torch.nn.Linear):
            macs.append(output.numel() * module.in_features)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one tiny forward pass; the meta device is slower here
    try:
        with torch.no_grad():
            model = build_model(spec).eval()
            for m in model.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    m.register_forward_hook(hook)
            model(torch.zeros(1, in_channels, *image_hw))
    finally:
        torch.set_num_threads(threads)
    return float(sum(macs))


_FLOPS_CACHE: dict[str, float] = {}  # spec and data shape -> forward FLOPs per image


def estimate_hours(config: Mapping[str, Any], device: str,
                   runs: Mapping[str, Mapping[str, Run]] | None = None) -> tuple[float, int]:
    """(hours, number of runs) of training and measuring every run of a validated config
    at the rates :data:`RATES` ``[device]`` ("gpu" or "cpu"). ``runs``: the expansion, when
    the caller has it already."""
    rate = RATES[device]
    runs = expand_studies(config) if runs is None else runs
    seconds, n_runs = 0.0, 0
    for name, study in config["studies"].items():
        ds = config["datasets"][study["dataset"]]
        source = find_source(ds["source"])
        n_full, image_hw, channels, classes = _OTHER_SOURCE if source is None else (
            source.n_images, source.image_size, source.channels, source.classes)
        measure = study["measure"]
        exact = set(measure["whole_split"])
        for record in runs[name].values():
            n_split = n_full  # the training split, then a subset of it
            if source is not None and source.split == "random":
                n_split = round(n_full * (1 - ds["test_fraction"]))
            subset = record.data.get("subset") or ds["subset"]
            n_train = min(subset, n_split) if subset else n_split
            spec, train = record.spec, record.train
            key = repr(sorted(spec.items())) + repr((image_hw, channels, classes))
            if key not in _FLOPS_CACHE:
                _FLOPS_CACHE[key] = 2 * forward_macs(spec, image_hw, channels, classes)
            flops = _FLOPS_CACHE[key]
            epochs = train.get("epochs", 30)  # with stop_loss, the cap: an upper bound
            images = epochs * n_train
            steps = images / train.get("batch_size", 128)
            passes = 3 * images
            if train.get("stop_loss") is not None:
                passes += images  # the evaluation pass of the stopping rule
            if train.get("track_flatness", 1024):
                passes += epochs * TRACK_PASSES * min(train.get("track_flatness", 1024), n_train)
            n_measure = min(measure["n_samples"] or n_train, n_train)
            passes += MEASURE_PASSES * n_measure + EXACT_PASSES * n_train * bool(exact)
            seconds += flops * passes / rate["flops"] + steps * rate["step_seconds"]
            seconds += 2 * rate["job_seconds"]
            n_runs += 1
    return seconds / 3600.0, n_runs


def estimate_text(config: Mapping[str, Any],
                  runs: Mapping[str, Mapping[str, Run]] | None = None) -> str:
    """One sentence: the number of runs and the hours on a GPU and on a 2-core CPU."""
    runs = expand_studies(config) if runs is None else runs
    gpu_h, n = estimate_hours(config, "gpu", runs)
    cpu_h, _ = estimate_hours(config, "cpu", runs)
    return (
        f"{n} runs to train and measure: about {gpu_h:.1f} h on one H100-class GPU, "
        f"about {cpu_h:.0f} h on a 2-core CPU (the analysis, validation and notebooks "
        "add minutes)"
    )
