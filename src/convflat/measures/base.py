"""The measure registry: a name, a function, its default parameters and what theory says.

A measure is a function ``func(ctx, **params) -> dict`` that returns at least ``{"value": v}``
(and optionally extras such as ``stderr`` or ``relative_error``); :func:`register` wraps it
in a :class:`Measure`, which times it, merges its default parameters, and turns an exception
into a recorded failure, so that one failing measure never stops the others.
"""

from __future__ import annotations

import math
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convflat.errors import OptionError
from convflat.measures.context import Context

__all__ = ["MEASURES", "Measure", "Param", "register"]

#: What theory predicts under the function-preserving filter rescaling of the last conv
#: (filter c and its bias times alpha_c > 0, classifier column c divided by alpha_c; ReLU).
THEORIES = ("invariant", "changes", "nearly invariant")


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


@dataclass(frozen=True)
class Param:
    """A measure parameter: its default, its type and its range, declared at
    :func:`register` (a plain default declares its type only: ``6`` an int, ``0.05`` a
    number, ``"l2"`` a string, ``True`` a bool). The config checks read them
    (:func:`convflat.study.check_measures`), and :meth:`Measure.resolve` refuses a value
    outside them before a measure runs.

    Attributes:
        default: the default value.
        kind: "int", "float" (an int is accepted), "str" or "bool"; "" takes the default's.
        minimum / maximum: inclusive bounds; above: an exclusive lower bound.
        choices: the allowed values.
        nullable: None is a value.
    """

    default: Any
    kind: str = ""
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    def __post_init__(self):
        if not self.kind and self.default is not None:
            kind = {bool: "bool", int: "int", float: "float", str: "str"}.get(type(self.default))
            object.__setattr__(self, "kind", kind or "")

    def describe(self) -> str:
        """``an integer >= 1``, ``a number in (0, 1]``, ``one of ('l2', 'linf')``."""
        if self.choices is not None:
            return f"one of {self.choices}"
        if self.kind == "int" and self.maximum is None and self.above is None \
                and self.minimum in (0, 1):
            return "a positive integer" if self.minimum == 1 else "a non-negative integer"
        text = _KINDS.get(self.kind, "a value")
        low = (f"({self.above:g}" if self.above is not None
               else f"[{self.minimum:g}" if self.minimum is not None else None)
        if low is not None and self.maximum is not None:
            return f"{text} in {low}, {self.maximum:g}]"
        if low is not None:
            return f"{text} {'>' if low[0] == '(' else '>='} {low[1:]}"
        if self.maximum is not None:
            return f"{text} <= {self.maximum:g}"
        return text

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` has the type and lies in the range."""
        if value is None:
            return self.nullable or (self.default is None and not self.kind)
        if self.choices is not None:
            return value in self.choices
        if self.kind == "bool":
            return value is True or value is False
        if self.kind == "str":
            return isinstance(value, str)
        if self.kind in ("int", "float"):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (self.kind == "int" and int(value) != value):
                return False
            if value != value:  # NaN
                return False
            return ((self.minimum is None or value >= self.minimum)
                    and (self.maximum is None or value <= self.maximum)
                    and (self.above is None or value > self.above))
        return True


@dataclass
class Measure:
    """One registered measure. Call it as ``measure(model, data, init_model=None, **params)``.

    Attributes:
        name: registry key, also the ``m_<name>`` column of the runs table.
        func: ``func(ctx, **params) -> {"value": ..., extras...}``.
        defaults: default parameters (every accepted parameter appears here).
        params: every accepted parameter as a :class:`Param` (type and range).
        theory: prediction under filter rescaling: "invariant", "changes" or "nearly invariant".
        needs_init: the measure needs the initial model (``init_model``); skipped without it.
        uses_data: the measure reads the data (then ``max_samples`` is accepted: the measure
            runs on a seeded random subset of that many samples).
        source: short citation (paper and equation).
    """

    name: str
    func: Callable[..., dict[str, Any]]
    defaults: dict[str, Any] = field(default_factory=dict)
    theory: str = "changes"
    needs_init: bool = False
    uses_data: bool = True
    source: str = ""
    params: dict[str, Param] = field(default_factory=dict)

    def __post_init__(self):
        if self.theory not in THEORIES:
            raise ValueError(f"theory must be one of {THEORIES}, got {self.theory!r}")
        declared = {k: v if isinstance(v, Param) else Param(v)
                    for k, v in {**self.defaults, **self.params}.items()}
        if self.uses_data:
            declared["max_samples"] = Param(None, "int", minimum=1, nullable=True)
        self.params = declared
        self.defaults = {k: p.default for k, p in declared.items()}
        self.__doc__ = self.func.__doc__

    def resolve(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults updated by ``params``. An unknown key raises a ValueError naming it, a
        value of the wrong type or out of its declared range (:attr:`params`) an
        :class:`convflat.errors.OptionError` whose ``key`` is the parameter."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"measure '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                f"it accepts {sorted(self.defaults)}"
            )
        for key, value in params.items():
            param = self.params[key]
            if not param.accepts(value):
                raise OptionError(key, f"measure '{self.name}': {key} must be "
                                       f"{param.describe()}, got {value!r}")
        return {**self.defaults, **params}

    def run(self, ctx: Context, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Compute on ``ctx``; returns the entry written to measures.json (never raises
        for a failure inside the measure, only for bad parameters)."""
        p = self.resolve(params)
        entry: dict[str, Any] = {
            "value": None, "seconds": 0.0, "params": p, "status": "ok", "error": None,
        }
        if self.needs_init and ctx.init_model is None:
            entry.update(status="skipped", error="needs the initial model (init_model / --init)")
            return entry
        run_params = dict(p)
        sub = ctx.subset(run_params.pop("max_samples", None)) if self.uses_data else ctx
        ctx.begin()
        start = ctx.tic()
        try:
            out = self.func(sub, **run_params)
        except Exception as exc:
            entry.update(
                status="failed",
                error=f"{type(exc).__name__}: {exc}",
                traceback=traceback.format_exc(limit=6),
            )
            out = None
        own = ctx.toc(start)
        earlier, shared = ctx.end()
        entry["seconds"] = own + earlier
        if shared:
            entry["shared"] = shared
        if out is not None:
            value = out.pop("value")
            entry["value"] = _to_float(value)
            # the measure may record choices it made (method used, sizes) in "params"
            entry["params"] = {**p, **out.pop("params", {})}
            entry.update({k: _to_plain(v) for k, v in out.items()})
        if sub is not ctx:
            entry["n_samples"] = sub.n_samples
        return entry

    def __call__(
        self,
        model: nn.Module,
        data: Any,
        init_model: nn.Module | None = None,
        *,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        **params: Any,
    ) -> dict[str, Any]:
        """Compute this one measure on its own (see :func:`convflat.measures.compute_measures`)."""
        self.resolve(params)
        ctx = Context(model, data, init_model=init_model, device=device, seed=seed,
                      batch_size=batch_size, progress=progress)
        return self.run(ctx, params)


def _to_float(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.detach().double().cpu().item()
    return float(v)


def _to_plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist() if v.ndim else float(v.detach().cpu().item())
    if isinstance(v, float) and not math.isfinite(v):
        return v
    return v


#: name -> :class:`Measure`; filled by the ``register`` decorators of the measure modules.
MEASURES: dict[str, Measure] = {}


def register(
    name: str,
    *,
    defaults: dict[str, Any] | None = None,
    theory: str = "changes",
    needs_init: bool = False,
    uses_data: bool = True,
    source: str = "",
) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., dict[str, Any]]]:
    """Decorator: register ``func(ctx, **params)`` as measure ``name``. ``defaults`` maps
    each parameter to its default, or to a :class:`Param` that also declares its type and
    range (``"probes": Param(6, minimum=1)``: an int >= 1)."""

    def deco(func: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        if name in MEASURES:
            raise ValueError(f"measure '{name}' is registered twice")
        MEASURES[name] = Measure(
            name=name, func=func, defaults=dict(defaults or {}), theory=theory,
            needs_init=needs_init, uses_data=uses_data, source=source,
        )
        return func

    return deco
