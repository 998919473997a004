"""The model spec of each family as a dataclass: its keys, types, ranges, defaults and help,
declared once, in a module without torch.

:func:`convflat.models.build_model` takes a plain dict (the JSON of a checkpoint, a config's
``model`` block); :func:`normalize` checks it against the family's dataclass and fills the
defaults. The same dataclasses make ``convflat train``'s model flags
(:func:`convflat.cli.train.register`), are what the config checks run
(:mod:`convflat.study.checks`), and the workflow schema's ``model`` block is tested against
them (tests/test_models.py). A bad value raises :class:`convflat.errors.OptionError` whose
``key`` is the spec key.

Adding an option to a family: a field here (and its use in :mod:`convflat.models`); the
schema's ``model`` block gets the property (the test says which).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from convflat.errors import OptionError

__all__ = ["ACTIVATIONS", "DATA_KEYS", "FAMILIES", "SPECS", "GapCNNSpec", "ResNetSpec",
           "SpecOption", "TorchvisionSpec", "normalize", "options", "resnet_stages"]

FAMILIES = ("gapcnn", "resnet", "torchvision")
#: The activation names of gapcnn and resnet (:data:`convflat.models.ACTIVATIONS` maps them
#: to modules).
ACTIVATIONS = ("relu", "gelu", "silu")
#: Keys the data fill in (from the prepared file, or the source in a config check).
DATA_KEYS = ("in_channels", "num_classes", "image_size")


@dataclasses.dataclass(frozen=True)
class SpecOption:
    """One key of a family's spec, as the checks, the command line and the schema see it.

    Attributes:
        name: the spec key.
        kind: "int", "float", "bool", "str" or "size" (an int or ``[H, W]``).
        default: the default (None: required, or set from another key).
        help: one line of documentation.
        minimum: the smallest allowed value (int and float).
        below: float values must be smaller than this.
        choices: the allowed values of a "str" option.
        required: the spec must hold it (``in_channels``, ``num_classes``, ``arch``).
        nullable: None is a value (resnet's ``width``: the depth's default).
    """

    name: str
    kind: str
    default: Any
    help: str
    minimum: float | None = None
    below: float | None = None
    choices: tuple[str, ...] | None = None
    required: bool = False
    nullable: bool = False

    def check(self, value: Any) -> Any:
        """``value`` converted to its kind (an integral float becomes an int), or
        :class:`OptionError` naming the key."""
        if value is None and self.nullable:
            return None
        if self.kind == "bool":
            if value is True or value is False:
                return value
            raise OptionError(self.name, f"spec key {self.name!r} must be true or false, "
                                         f"got {value!r}")
        if self.kind == "str":
            if self.choices is not None and value not in self.choices:
                raise OptionError(self.name, f"spec key {self.name!r} must be one of "
                                             f"{self.choices}, got {value!r}")
            if not isinstance(value, str):
                raise OptionError(self.name, f"spec key {self.name!r} must be a string, "
                                             f"got {value!r}")
            return value
        if self.kind == "size":
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = [value, value]
            if not isinstance(value, (list, tuple)) or len(value) != 2:
                raise OptionError(self.name, f"spec key {self.name!r} must be an int or "
                                             f"[H, W], got {value!r}")
            return [self._integer(v) for v in value]
        if self.kind == "int":
            return self._integer(value)
        return self._number(value)

    def _integer(self, value: Any) -> int:
        ok = (not isinstance(value, bool) and isinstance(value, (int, float))
              and int(value) == value
              and (self.minimum is None or int(value) >= self.minimum))
        if not ok:
            what = ("a positive integer" if self.minimum == 1
                    else "a non-negative integer" if self.minimum == 0 else "an integer")
            raise OptionError(self.name, f"spec key {self.name!r} must be {what}, "
                                         f"got {value!r}")
        return int(value)

    def _number(self, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
            ok = ((self.minimum is None or value >= self.minimum)
                  and (self.below is None or value < self.below))
        if not ok:
            lo = "-inf" if self.minimum is None else f"{self.minimum:g}"
            hi = "inf" if self.below is None else f"{self.below:g}"
            raise OptionError(self.name, f"spec key {self.name!r} must be a number in "
                                         f"[{lo}, {hi}), got {value!r}")
        return value


def _key(kind: str, default: Any, help: str, **more: Any) -> Any:
    """A spec dataclass field: its default, and its :class:`SpecOption` facts as metadata."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, **more})


_IN = _key("int", None, "image channels (from the data)", minimum=1, required=True)
_OUT = _key("int", None, "number of classes (from the data)", minimum=1, required=True)
_SIZE = _key("size", (32, 32), "(H, W) pixels the net is built for (sets the downsampling; "
             "from the data)", minimum=1)
_ACT = _key("str", "relu", "the activation", choices=ACTIVATIONS)
_MIN_SIZE = _key("int", 2, "never downsample below this many pixels per side", minimum=1)


@dataclasses.dataclass(frozen=True)
class GapCNNSpec:
    """An all-convolutional VGG/NiN-style net (:class:`convflat.models.GapCNN`)."""

    family: ClassVar[str] = "gapcnn"
    in_channels: int = _IN
    num_classes: int = _OUT
    image_size: tuple[int, int] = _SIZE
    width: int = _key("int", 32, "channels of the first stage; x2 at each downsampling",
                      minimum=1)
    depth: int = _key("int", 4, "number of 3 x 3 conv layers", minimum=1)
    batchnorm: bool = _key("bool", True, "BatchNorm after every conv (the conv bias is then "
                           "dropped)")
    dropout: float = _key("float", 0.0, "dropout probability after each activation but the "
                          "last", minimum=0.0, below=1.0)
    activation: str = _ACT
    max_downsample: int = _key("int", 3, "at most this many stride-2 steps", minimum=0)
    min_size: int = _MIN_SIZE


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """A CIFAR-style ResNet (:class:`convflat.models.ResNet`)."""

    family: ClassVar[str] = "resnet"
    in_channels: int = _IN
    num_classes: int = _OUT
    image_size: tuple[int, int] = _SIZE
    depth: int = _key("int", 20, "6n+2 (three stages) or 10, 18, 34 (four stages)", minimum=1)
    width: int | None = _key("int", None, "channels of the first stage (default 16 for "
                             "depth 6n+2, 64 otherwise)", minimum=1, nullable=True)
    preact: bool = _key("bool", False, "pre-activation blocks (He et al. 2016)")
    activation: str = _ACT
    min_size: int = _MIN_SIZE


@dataclasses.dataclass(frozen=True)
class TorchvisionSpec:
    """A classification net of ``torchvision.models``, built without weights."""

    family: ClassVar[str] = "torchvision"
    in_channels: int = _IN
    num_classes: int = _OUT
    arch: str = _key("str", None, "the architecture (resnet18, resnet50, mobilenet_v2, ...; "
                     "not vgg, squeezenet, mobilenet_v3: their heads are outside the class "
                     "convflat measures)", required=True)


#: family -> its spec dataclass.
SPECS: dict[str, type] = {c.family: c for c in (GapCNNSpec, ResNetSpec, TorchvisionSpec)}


def options(family: str) -> list[SpecOption]:
    """The keys of ``family``'s spec (without ``family``), in declaration order."""
    out = []
    for f in dataclasses.fields(SPECS[family]):
        meta = dict(f.metadata)
        default = list(f.default) if isinstance(f.default, tuple) else f.default
        out.append(SpecOption(f.name, meta.pop("kind"), default, meta.pop("help"), **meta))
    return out


def resnet_stages(depth: int) -> list[int]:
    """BasicBlocks per stage: 6n+2 -> [n, n, n]; 10, 18, 34 -> four stages."""
    fixed = {10: [1, 1, 1, 1], 18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}
    if depth in fixed:
        return fixed[depth]
    if depth >= 8 and (depth - 2) % 6 == 0:
        return [(depth - 2) // 6] * 3
    raise OptionError("depth", f"spec key 'depth': a CIFAR ResNet has depth 6n+2 (8, 14, 20, "
                               f"32, ...) or 10, 18, 34, got {depth}")


def normalize(spec: dict[str, Any]) -> dict[str, Any]:
    """Check ``spec`` against its family's dataclass and return a complete, JSON-ready copy
    (every default filled in). Raises :class:`OptionError` whose ``key`` is the offending
    spec key: unknown family, unknown key, a missing required key, a value of the wrong type
    or out of range. torchvision's ``arch`` is checked by :func:`convflat.models
    .normalize_spec`, which needs torchvision."""
    if not isinstance(spec, dict):
        raise TypeError(f"a model spec must be a dict, got {type(spec).__name__}")
    family = spec.get("family")
    if family not in FAMILIES:
        raise OptionError("family", f"spec key 'family' must be one of {FAMILIES}, "
                                    f"got {family!r}")
    opts = options(family)
    unknown = sorted(set(spec) - {o.name for o in opts} - {"family"})
    if unknown:
        raise OptionError(unknown[0], f"spec key {unknown[0]!r} is not a {family} option "
                                      f"(options: {', '.join(o.name for o in opts)})")
    out: dict[str, Any] = {"family": family}
    for opt in opts:
        value = spec.get(opt.name, opt.default)
        if value is None and opt.required:
            raise OptionError(opt.name, f"spec key {opt.name!r} is required for family "
                                        f"{family}")
        out[opt.name] = opt.check(value)
    if family == "resnet":
        stages = resnet_stages(out["depth"])
        if out["width"] is None:
            out["width"] = 16 if len(stages) == 3 else 64
    return out


def schema_properties() -> dict[str, dict[str, Any]]:
    """The JSON-schema properties of a config's ``model`` block that the dataclasses imply
    (without descriptions): every key of every family once, ``family`` first, with its type
    and range; a key two families share takes both families' types. The workflow schema's
    ``model`` block must equal this (tests/test_models.py)."""
    json_type = {"int": "integer", "float": "number", "bool": "boolean", "str": "string",
                 "size": ["integer", "array"]}
    out: dict[str, dict[str, Any]] = {"family": {"type": "string", "enum": list(FAMILIES)}}
    for family in FAMILIES:
        for opt in options(family):
            types = json_type[opt.kind]
            types = list(types) if isinstance(types, list) else [types]
            prop = out.setdefault(opt.name, {"type": []})
            prop["type"] = prop["type"] + [t for t in types if t not in prop["type"]]
            if opt.nullable and "null" not in prop["type"]:
                prop["type"].append("null")
            if opt.minimum is not None:
                prop["minimum"] = opt.minimum
            if opt.below is not None:
                prop["exclusiveMaximum"] = opt.below
            if opt.choices is not None:
                prop["enum"] = list(opt.choices)
            if opt.kind == "size":
                prop.update(items={"type": "integer", "minimum": 1}, minItems=2, maxItems=2)
    for prop in out.values():
        if isinstance(prop["type"], list) and len(prop["type"]) == 1:
            prop["type"] = prop["type"][0]
    return out
