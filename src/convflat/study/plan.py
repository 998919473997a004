"""The run plan of a workflow config: its grid, run ids, runs, data files and code versions.

No Snakemake and no torch (a dry run of the workflow imports it):

* :data:`AXES`: the grid axes, where each value goes (model spec, training settings, data)
  and its abbreviation in run ids.
* run ids: ``width~32/depth~3/wd~0.0001/seed~0``, one ``abbrev~value`` per axis in the grid's
  order, in the style of Snakemake's Paramspace (:func:`format_run_id`,
  :func:`parse_run_id`, :data:`RUN_ID_PATTERN`).
* :func:`expand_study`: ``{run_id: Run}`` for every point of a study's grid.
* :func:`prepared_name` / :func:`prepared_files`: the prepared data files a config needs.
* :func:`validation_run` / :func:`validation_extra_runs`: the runs the validation uses.
* :data:`STAGE_VERSIONS` / :func:`code_version`: the version string of each stage's code.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import convflat
from convflat.errors import ConfigError

__all__ = [
    "AXES", "RUN_ID_PATTERN", "RUN_ID_SEP", "STAGE_VERSIONS", "Axis", "Run", "code_version",
    "expand_studies", "expand_study", "format_run_id", "format_value", "parse_run_id",
    "prepared_files", "prepared_name", "validation_extra_runs", "validation_run",
]


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
            raise ConfigError(f"studies.{name}.grid",
                              f"gives run id {run_id!r} twice (a value is repeated)")
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


def validation_run(config: Mapping[str, Any],
                   runs: Mapping[str, Mapping[str, Run]]) -> Run:
    """The trained run the validation tables use: run ``validation.run`` (default the first
    of the grid) of study ``validation.study`` (default the first study)."""
    study = config["validation"]["study"] or next(iter(config["studies"]))
    run_id = config["validation"]["run"]
    if run_id is None:
        return next(iter(runs[study].values()))
    if run_id not in runs[study]:
        raise ConfigError("validation.run", f"{run_id!r} is not a run of study {study!r} "
                                            f"(e.g. {next(iter(runs[study]))!r})")
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
            raise ConfigError(key, f"{name!r} is not one of the studies {sorted(runs)}")
        if run_id and run_id not in runs[name]:
            raise ConfigError(key, f"{run_id!r} is not a run of study {name!r} "
                                   f"(e.g. {next(iter(runs[name]))!r})")
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


