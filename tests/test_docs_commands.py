"""Issue 16 item 0: every `snakemake` and `convflat` command shown in README.md and docs/*.md
works as written.

Commands are taken from fenced and indented code blocks (with their ``\\`` continuations) and
from inline code spans. ``snakemake`` commands run as a dry run (``-n``) from the repository
root; ``convflat`` commands are parsed by the real parser (every flag and value valid), each
subcommand answers ``--help``, and the README's digits curvature command runs for real on a
tiny checkpoint. Synopsis lines (``[--flag X]``, ``A|B``) are checked flag by flag.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")
_START = re.compile(r"^(?:\$ )?(?:\.venv/bin/)?(snakemake|convflat)(?:\s|$)")


def _code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every code line and inline span that starts a command."""
    out, fenced, lines = [], False, text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            fenced = not fenced
            i += 1
            continue
        indented = line.startswith("    ") and not line.lstrip().startswith(("-", "*"))
        if fenced or indented:
            cmd, start = line.strip(), i + 1
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].strip()
            cmd = re.split(r"\s+#\s", cmd, maxsplit=1)[0].strip()
            if _START.match(cmd):
                out.append((start, cmd))
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if _START.match(span) and not span.startswith("convflat."):
                    out.append((i + 1, span.strip()))
        i += 1
    return out


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for lineno, cmd in _code_lines(doc.read_text()):
            found.append((f"{doc.relative_to(ROOT)}:{lineno}", re.sub(r"^\$ ", "", cmd)))
    return found


COMMANDS = documented_commands()
SNAKE = [(w, c) for w, c in COMMANDS if _START.match(c).group(1) == "snakemake"]
# each distinct snakemake command once (a dry run takes seconds), under its first place
_DISTINCT = list({re.sub(r"^\.venv/bin/", "", c): (w, c) for w, c in reversed(SNAKE)}.values())
CONVFLAT = [(w, c) for w, c in COMMANDS if _START.match(c).group(1) == "convflat"]


def test_the_docs_show_commands():
    """The extraction finds the commands the issue names (guards the extractor itself)."""
    texts = [c for _, c in COMMANDS]
    assert any("results/figures/digits/tau_psi.pdf" in c for c in texts)
    assert any(c.startswith("convflat curvature") for c in texts)
    assert len(SNAKE) >= 10 and len(CONVFLAT) >= 5


def _study_of(args: list[str]) -> str:
    config = "config/config.yaml"
    for i, a in enumerate(args):
        if a == "--configfile":
            config = args[i + 1]
        elif a.startswith("--configfile="):
            config = a.split("=", 1)[1]
    return next(iter(yaml.safe_load((ROOT / config).read_text())["studies"]))


@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake is not installed")
@pytest.mark.parametrize("where,cmd", _DISTINCT, ids=[w for w, _ in _DISTINCT])
def test_snakemake_command_dry_runs(where, cmd, tmp_path):
    args = shlex.split(cmd.split(" | ")[0])[1:]  # `snakemake --rulegraph | dot ...`
    args = [a.replace("<study>", _study_of(args)) for a in args]
    if "--unlock" in args:  # not a dry-runnable action: check the flag exists
        helptext = subprocess.run([str(SNAKEMAKE), "--help"], capture_output=True,
                                  text=True, timeout=120).stdout
        assert "--unlock" in helptext
        return
    if "--sdm" in args and "conda" in args and shutil.which("conda") is None:
        pytest.skip("conda is not installed here")
    if "--report" in args:  # a report needs finished results; dry-run the workflow it reads
        i = args.index("--report")
        has_file = i + 1 < len(args) and not args[i + 1].startswith("-")
        assert not has_file or args[i + 1].endswith((".html", ".zip")), where
        del args[i:i + 1 + has_file]
    res = subprocess.run([str(SNAKEMAKE), *args, "-n", "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{where}: {cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr, f"{where}: {cmd}\n{res.stderr[-3000:]}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    from convflat.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _is_synopsis(cmd: str) -> bool:
    return bool(re.search(r"[\[\]|]|\.\.\.", cmd))


@pytest.mark.parametrize("where,cmd", CONVFLAT, ids=[w for w, _ in CONVFLAT])
def test_convflat_command_parses(where, cmd):
    from convflat.cli import build_parser

    args = shlex.split(cmd)[1:]
    subs = _subparsers()
    assert args and args[0] in subs, f"{where}: unknown subcommand in {cmd!r}"
    if len(args) == 1:
        return  # `convflat train` named in prose: the subcommand exists
    if _is_synopsis(cmd):
        known = {s for a in subs[args[0]]._actions for s in a.option_strings}
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd):
            assert flag in known, f"{where}: {args[0]} has no flag {flag}"
        return
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:  # --help and --list-like flags exit 0
        if exc.code not in (0, None):
            pytest.fail(f"{where}: {cmd!r} does not parse (exit {exc.code})")


@pytest.mark.parametrize("sub", sorted({shlex.split(c)[1] for _, c in CONVFLAT}))
def test_each_documented_subcommand_answers_help(sub):
    res = subprocess.run([sys.executable, "-m", "convflat", sub, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith(f"usage: convflat {sub}")


def test_readme_digits_curvature_command_runs(tmp_path, capsys):
    """The README's curvature command on a run of the quick study, for real, with the run
    replaced by a tiny one trained here and the output put in tmp_path: without --data it
    measures the run's own images (the checkpoint's data identity)."""
    from convflat.cli import main
    from convflat.data import prepare
    from convflat.train import TrainConfig, train

    cmd = next(c for w, c in CONVFLAT if w.startswith("README") and "curvature" in c
               and "results/runs/digits" in c)
    args = shlex.split(cmd)[1:]
    data = prepare("sklearn-digits", root=tmp_path / "data", subset=120, download=False)
    train({"family": "gapcnn", "width": 4, "depth": 2, "batchnorm": False}, data,
          TrainConfig(epochs=1, batch_size=60, lr=0.05, device="cpu", track_flatness=0),
          tmp_path / "run")
    args[args.index("--checkpoint") + 1] = str(tmp_path / "run" / "model.pt")
    args[args.index("--out") + 1] = str(tmp_path / Path(args[args.index("--out") + 1]).name)
    assert main(args) == 0
    assert (tmp_path / "curv.json").is_file() and "trace=" in capsys.readouterr().out


def test_no_configfile_swallows_a_target():
    """`--configfile A B` reads B as a second config file: a target must come first (or
    `--configfile=A`)."""
    for where, cmd in SNAKE:
        args = shlex.split(cmd)
        if "--configfile" in args:
            i = args.index("--configfile")
            rest = args[i + 2:]
            assert not rest or rest[0].startswith("-"), f"{where}: {cmd}"

