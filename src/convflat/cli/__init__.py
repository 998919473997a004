"""The ``convflat`` command line.

Each module in this package that defines ``register(subparsers)`` adds one subcommand
(``convflat curvature``, ``convflat train``, ...). ``register`` must add a parser and set its
``func`` default to a callable ``func(args) -> int``. Errors that a user can fix are raised as
:class:`CLIError` (or ValueError/FileNotFoundError) and printed as one line, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


class CLIError(Exception):
    """An error in the user's input: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    import convflat

    parser = argparse.ArgumentParser(
        prog="convflat",
        description="Exact flatness of CNNs whose last convolution feeds global average pooling.",
    )
    parser.add_argument("--version", action="version", version=f"convflat {convflat.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "register"):
            module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"convflat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
