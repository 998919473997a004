"""The floors of docs/internal-api.md, enforced: every module has a floor, no import reaches
up a floor, and no modules import each other around a circle. Every import counts: at the
top of a module, inside a function, under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DOC = REPO / "docs" / "internal-api.md"
ROOT = "convflat"  # the package root: on no floor (its __version__, lazy re-exports)


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / ROOT).rglob("*.py"))}


def imports(path: Path, known: set[str], src: Path = SRC) -> dict[str, int]:
    """``{convflat module: line}`` that ``path`` imports. ``from pkg import name`` imports
    the module ``pkg.name`` when there is one, else ``pkg``; relative imports resolved."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # import a.b.c where only a.b is ours
                target = target.rpartition(".")[0]
            if target.split(".")[0] == ROOT and target not in (ROOT, name):
                out.setdefault(target, node.lineno)
    return out


def doc_floors() -> dict[str, int]:
    """``{pattern: floor}`` from the table under "## Floors" of docs/internal-api.md."""
    text = DOC.read_text()
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    floors: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|(.*)\|\s*$", line)
        if m:
            for pattern in re.findall(r"`([^`]+)`", m.group(2)):
                assert pattern not in floors, f"{pattern} is on two floors"
                floors[pattern] = int(m.group(1))
    assert floors, "docs/internal-api.md has no floors table"
    return floors


def floor_of(module: str, floors: dict[str, int]) -> int | None:
    """The floor of the most specific pattern that covers ``module``."""
    best, length = None, -1
    for pattern, floor in floors.items():
        base = pattern.removesuffix(".*")
        covers = module == base or (pattern.endswith(".*") and module.startswith(base + "."))
        if covers and len(base) > length:
            best, length = floor, len(base)
    return best


def graph() -> dict[str, dict[str, int]]:
    mods = modules()
    return {m: imports(p, set(mods)) for m, p in mods.items()}


def test_every_module_is_on_a_floor():
    floors = doc_floors()
    missing = [m for m in modules() if m != ROOT and floor_of(m, floors) is None]
    assert not missing, f"modules on no floor of docs/internal-api.md: {missing}"


def test_the_pipeline_is_on_the_top_floor():
    floors = doc_floors()
    top = max(floors.values())
    for module in ("convflat.workflow", "convflat.pipeline", "convflat.pipeline.jobs"):
        assert floor_of(module, floors) == top, module


def test_no_import_reaches_up_a_floor():
    floors = doc_floors()
    breaks = []
    for module, targets in graph().items():
        if module == ROOT:
            continue
        own = floor_of(module, floors)
        for target, line in targets.items():
            their = floor_of(target, floors)
            if own is not None and their is not None and their > own:
                breaks.append(f"{module} (floor {own}) imports {target} (floor {their}) at "
                              f"line {line}")
    assert not breaks, "\n".join(breaks)


def test_no_import_circle():
    edges = {m: set(t) for m, t in graph().items() if m != ROOT}
    state: dict[str, int] = {}  # 1 on the path, 2 done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not circles, "\n".join(circles)


# ------------------------------------------------------------------- the checker itself


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from convflat.data import Prepared", {"convflat.data"}),
        ("import convflat.curvature.plan as p", {"convflat.curvature.plan"}),
        ("from convflat import models, io", {"convflat.models", "convflat.io"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
         "    from convflat.train import TrainConfig", {"convflat.train"}),
        ("def f():\n    from convflat.study.plan import AXES\n", {"convflat.study.plan"}),
        ("from . import gram\nfrom .head import Head",
         {"convflat.curvature.gram", "convflat.curvature.head"}),
        ("import convflat\nfrom convflat import __version__", set()),
    ],
)
def test_imports_are_found_everywhere(tmp_path, source, expected):
    """Top-level, aliased, type-only, function-local and relative imports are all seen."""
    pkg = tmp_path / "convflat" / "curvature"
    pkg.mkdir(parents=True)
    (pkg / "probe.py").write_text(source)
    known = {"convflat", "convflat.data", "convflat.curvature", "convflat.curvature.plan",
             "convflat.models", "convflat.io", "convflat.train", "convflat.study.plan",
             "convflat.curvature.gram", "convflat.curvature.head", "convflat.curvature.probe"}
    assert set(imports(pkg / "probe.py", known, tmp_path)) == expected


def test_a_break_is_reported():
    """The rule on a made-up graph: floor 0 importing floor 3 breaks it."""
    floors = {"convflat.io": 0, "convflat.models": 3, "convflat.study.*": 4}
    assert floor_of("convflat.study.plan", floors) == 4
    assert floor_of("convflat.study", floors) == 4
    assert floor_of("convflat.studyx", floors) is None
    assert floor_of("convflat.io", floors) < floor_of("convflat.models", floors)
