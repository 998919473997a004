"""The checks of a workflow config that its JSON schema cannot make.

Every check raises :class:`convflat.errors.ConfigError` whose ``key`` is the dotted path of
the offending config key (``studies.digits.measure.params.hutchinson_trace.probes``); the
key travels with the exception, from :class:`convflat.errors.OptionError` where a spec,
the training settings or a measure parameter refused a value, and is never recovered from
a message. :func:`check_config` runs them all; the deep ones (the model specs and heads,
the measures, the device) import torch when they run, never when this module is imported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convflat.errors import ConfigError, OptionError
from convflat.sources import find_source, source_names
from convflat.study.plan import AXES, expand_study, format_run_id

__all__ = ["check_config", "check_data", "check_device", "check_measures", "check_models",
           "check_training"]


def check_config(config: Mapping[str, Any], *, deep: bool = True,
                 device_here: bool = True) -> None:
    """The checks a JSON schema cannot make, on a config the schema has validated (defaults
    filled): every study names a dataset of the config, every dataset a known source, a
    false-friend study has a weight_decay axis, validation.study names a study, the
    training settings (:func:`check_training`) and the data sizes (:func:`check_data`).
    With ``deep`` (the default; it imports torch when it runs) also the measures
    (:func:`check_measures`), the model specs and their heads (:func:`check_models`) and,
    with ``device_here`` (false when the jobs run on other machines, e.g. SLURM nodes),
    the device (:func:`check_device`). Raises :class:`ConfigError` naming the key."""
    for key, ds in config["datasets"].items():
        src = ds["source"]
        if find_source(src) is None and not str(src).startswith(("npz:", "folder:")):
            raise ConfigError(f"datasets.{key}.source",
                              f"{src!r} is not a known source ({source_names()})")
    for name, study in config["studies"].items():
        if study["dataset"] not in config["datasets"]:
            known = sorted(config["datasets"])
            raise ConfigError(f"studies.{name}.dataset",
                              f"{study['dataset']!r} is not one of datasets {known}")
        if study["false_friend"] and "weight_decay" not in study["grid"]:
            raise ConfigError(f"studies.{name}.false_friend",
                              f"true, but studies.{name}.grid has no 'weight_decay' axis to "
                              "sweep")
    val = config["validation"]
    if val["enabled"] and val["study"] is not None and val["study"] not in config["studies"]:
        raise ConfigError("validation.study", f"{val['study']!r} is not one of the studies "
                                              f"{sorted(config['studies'])}")
    check_training(config)
    check_data(config)
    if deep:
        check_measures(config)
        check_models(config)
        if device_here:
            check_device(config)


def check_training(config: Mapping[str, Any]) -> None:
    """Every run's training settings make a valid :class:`convflat.train.TrainConfig` (the
    checks between fields that the schema cannot make: warmup_epochs <= epochs, nesterov
    with SGD and momentum, ...). Raises :class:`ConfigError` naming the key
    (``studies.<s>.train.<field>``, or ``studies.<s>.grid.<axis>`` when a grid value is
    the cause). Imports no torch."""
    from convflat.train_config import TrainConfig

    for name, study in config["studies"].items():
        for run in expand_study(name, study, config["datasets"]).values():
            try:
                TrainConfig.from_dict(dict(run.train))
            except OptionError as exc:
                section = "grid" if exc.key in study["grid"] else "train"
                raise ConfigError(f"studies.{name}.{section}.{exc.key}",
                                  f"{exc} (run {run.run_id})") from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"studies.{name}.train", f"{exc} (run {run.run_id})") from None


# ---------------------------------------------------------------------------- data sizes


def _train_split(source: Any, test_fraction: float) -> int | None:
    """The number of training images of a built-in source before any subset: the official
    training split, or for a source split at random (the 8 x 8 digits) what
    :func:`convflat.data.prepare` keeps of it, ``n_c - round(test_fraction * n_c)`` per class
    (no torch). None when unknown."""
    if source.split != "random":
        return source.n_images
    if source.name != "sklearn-digits":
        return None
    sizes = _digits_class_sizes()
    return sum(n - round(test_fraction * n) for n in sizes)


def _digits_class_sizes() -> list[int]:
    """Images per class of scikit-learn's digits, from the label column of the file that
    ``sklearn.datasets.load_digits`` reads (importing scikit-learn takes seconds; reading
    the file, milliseconds), else from ``load_digits`` itself."""
    import csv
    import gzip
    import importlib.util
    from collections import Counter
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0], "datasets", "data", "digits.csv.gz") if locations else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt") as f:
            labels = [row[-1] for row in csv.reader(f) if row]
        return list(Counter(int(float(v)) for v in labels).values())
    from sklearn.datasets import load_digits

    return list(Counter(load_digits().target.tolist()).values())


def check_data(config: Mapping[str, Any]) -> None:
    """Every training-set size a config asks for (a dataset's ``subset``, a grid's
    ``subset`` values) holds at least one image per class and no more images than the
    source's training split. Sources of the user's files (``npz:``, ``folder:``) are not read here;
    :func:`convflat.data.prepare` checks them. Raises :class:`ConfigError` naming the key
    (``datasets.<d>.subset``, ``studies.<s>.grid.subset[i]``)."""
    sizes: list[tuple[str, str, int]] = []  # (config key, dataset key, size)
    for key, ds in config["datasets"].items():
        if ds.get("subset") is not None:
            sizes.append((f"datasets.{key}.subset", key, ds["subset"]))
    for name, study in config["studies"].items():
        for i, value in enumerate(study["grid"].get("subset") or []):
            if value is not None:
                sizes.append((f"studies.{name}.grid.subset[{i}]", study["dataset"], value))
    splits: dict[str, int | None] = {}
    for where, key, size in sizes:
        ds = config["datasets"][key]
        source = find_source(ds["source"])
        if source is None:
            continue
        if size < source.classes:
            raise ConfigError(where, f"{size} training images are fewer than the "
                                     f"{source.classes} classes of {source.name}")
        if key not in splits:
            splits[key] = _train_split(source, ds["test_fraction"])
        if splits[key] is not None and size > splits[key]:
            raise ConfigError(where, f"{size} training images, but the training split of "
                                     f"{source.name} has {splits[key]}")


def check_device(config: Mapping[str, Any]) -> None:
    """The config's ``device`` exists on this machine: ``cuda`` or ``cuda:<i>`` needs
    CUDA with more than i devices. Raises :class:`ConfigError` naming ``device``; imports
    torch."""
    device = str(config.get("device", "auto"))
    if not device.startswith("cuda"):
        return
    import torch

    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        have = f"{count} CUDA device{'s' if count != 1 else ''}" if count else "no CUDA"
        raise ConfigError("device", f"{device!r}, but this machine has {have} (use auto or "
                                    "cpu, or run the jobs where the GPU is)")


# ------------------------------------------------------------------ model specs and heads

#: head structure (:func:`_structure`, as sorted JSON) -> None when it is in the measured
#: class, else the refusal of :func:`convflat.models.check_head`.
_SPEC_CHECKS: dict[str, str | None] = {}
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


def _head_problem(spec: Mapping[str, Any]) -> str | None:
    """None when the head of the model a normalized ``spec`` builds is in the measured
    class, else the refusal of :func:`convflat.models.check_head`. Each distinct head
    structure is traced once per process (:data:`_SPEC_CHECKS`)."""
    import json

    key = json.dumps(_structure(spec), sort_keys=True, default=str)
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
            _SPEC_CHECKS[key] = str(exc)
    return _SPEC_CHECKS[key]


def check_models(config: Mapping[str, Any]) -> None:
    """Every distinct model spec of every study builds (without weights) and its head is in
    the class the curvature measures (:func:`convflat.models.check_head`), with the data's
    channels, classes and image size filled in from the dataset's source (stand-ins for
    ``npz:``/``folder:`` data). Raises :class:`ConfigError` naming the config key: the
    model option (``studies.<s>.model.<key>``, or ``studies.<s>.grid.<axis>`` when a grid
    value is wrong), ``studies.<s>.model.arch`` for a torchvision net outside the class."""
    from convflat.models import normalize_spec

    for name, study in config["studies"].items():
        source = config["datasets"][study["dataset"]]["source"]
        facts = _data_facts(source)
        for key in ("in_channels", "num_classes"):
            given = study["model"].get(key)
            if given is not None and find_source(source) is not None and given != facts[key]:
                raise ConfigError(f"studies.{name}.model.{key}",
                                  f"{given!r}, but source {source!r} has {facts[key]!r}")
        if study["model"].get("family") == "torchvision":
            facts.pop("image_size")
        for run in expand_study(name, study, config["datasets"]).values():
            try:
                spec = normalize_spec({**facts, **run.spec})
            except OptionError as exc:
                section = "grid" if exc.key in study["grid"] else "model"
                raise ConfigError(f"studies.{name}.{section}.{exc.key}",
                                  _spec_message(exc, run.spec)) from None
            problem = _head_problem(spec)
            if problem is not None:
                where = "arch" if spec["family"] == "torchvision" else "family"
                what = spec.get("arch") or spec["family"]
                hp = {k: v for k, v in run.hp.items() if AXES[k].section == "model"}
                at = f" (run {format_run_id(hp)})" if hp else ""
                raise ConfigError(f"studies.{name}.model.{where}",
                                  f"{what}{at} is outside the measurable class: {problem}")


def _spec_message(exc: OptionError, spec: Mapping[str, Any]) -> str:
    """The message of a refused spec key, for a config: an unknown key is an unknown model
    option of the family, with the options the family has."""
    from convflat.model_spec import FAMILIES, options

    family = spec.get("family")
    if family in FAMILIES and exc.key != "family":
        known = [o.name for o in options(family)]
        if exc.key not in known:
            return (f"unknown model option {exc.key!r} of family {family} "
                    f"(options: {', '.join(known)})")
    return str(exc)


# ------------------------------------------------------------------------------- measures


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
    ``params`` names a measure that is computed, every parameter is one that measure
    accepts, and every value has the type and lies in the range the measure declares
    (:class:`convflat.measures.base.Param`). Raises :class:`ConfigError` naming the config
    key (``studies.<s>.measure.names[3]``, ``studies.<s>.measure.params.<measure>.<param>``)."""
    from convflat.measures import MEASURES, resolve_names

    for where, names, params in _measure_sections(config):
        items = [names] if isinstance(names, str) else list(names)
        for i, item in enumerate(items):
            if item not in MEASURES and item not in ("default", "all"):
                at = where + (".names" if isinstance(names, str) else f".names[{i}]")
                raise ConfigError(at, f"unknown measure {item!r} (known: "
                                      f"{', '.join(MEASURES)}; or 'default', 'all')")
        computed = resolve_names(names)
        for measure, values in (params or {}).items():
            at = f"{where}.params.{measure}"
            if measure not in MEASURES:
                raise ConfigError(at, f"unknown measure {measure!r} (known: "
                                      f"{', '.join(MEASURES)})")
            if measure not in computed:
                raise ConfigError(at, f"parameters for measure {measure!r}, which "
                                      f"{where}.names does not compute")
            accepted = MEASURES[measure].defaults
            for param in values or {}:
                if param not in accepted:
                    raise ConfigError(f"{at}.{param}", f"unknown parameter {param!r} of "
                                                       f"measure {measure!r} (it accepts "
                                                       f"{sorted(accepted)})")
            try:
                MEASURES[measure].resolve(values)
            except OptionError as exc:
                raise ConfigError(f"{at}.{exc.key}", str(exc)) from None
            except (TypeError, ValueError) as exc:
                raise ConfigError(at, str(exc)) from None
