"""The ``convflat`` command line.

Each module in this package that defines ``register(subparsers)`` adds one subcommand
(``convflat curvature``, ``convflat train``, ...). ``register`` must add a parser and set its
``func`` default to a callable ``func(args) -> int``. Modules whose name starts with ``_``
hold shared helpers. No module imports torch before ``func`` runs, so ``--help`` is fast.

Exit status: 0 success; 1 the work ran but part of it failed (``convflat measure`` with a
failed measure), or the disk (or quota) is full: one line naming the path and "no space left
on device", no traceback; 2 a user error (bad flag value, missing or unreadable file, unwritable
output, a model outside the measured class): one line on stderr, no traceback; 130
interrupted (Ctrl-C), also without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


class CLIError(Exception):
    """An error in the user's input: printed without a traceback, exit status 2."""


#: Exceptions printed as one line with exit status 2. OutOfClassError is a ValueError.
USER_ERRORS = (CLIError, ValueError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError, PermissionError)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``convflat train: error: ...``)
    with exit status 2, like every other user error."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``convflat`` parser with every subcommand of this package registered."""
    import convflat

    parser = Parser(
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
    """Parse ``argv`` and run the subcommand; return the exit status (see the module doc)."""
    command = "convflat"
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, --version, a usage error (one line, status 2)
            return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
        command = f"convflat {args.command}"
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\nconvflat: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{command}: error: {text}", file=sys.stderr)
        return 2
    except Exception as exc:
        from convflat.io import DiskFullError, disk_full_cause

        cause = exc if isinstance(exc, DiskFullError) else disk_full_cause(exc)
        if cause is None:
            raise
        if isinstance(cause, DiskFullError):
            text = str(cause)
        else:
            where = f" writing {cause.filename}" if cause.filename else ""
            text = f"no space left on device{where}"
        print(f"{command}: error: {' '.join(text.split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
