import importlib
import pkgutil
import sys

import convflat.bench as _bench


def _bench_module(name: str):
    """The module ``convflat.bench.<name>`` if it is a benchmark (has ``main``), else None."""
    module = importlib.import_module(f"convflat.bench.{name}")
    return module if callable(getattr(module, "main", None)) else None


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m convflat.bench <name> [options]``: the bench module ``name``'s main.
    Modules of the package without a ``main`` (the shared helpers) are not benchmarks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    modules = sorted(m.name for m in pkgutil.iter_modules(_bench.__path__)
                     if not m.name.startswith("_"))
    module = _bench_module(argv[0]) if argv and argv[0] in modules else None
    if module is None:
        names = [n for n in modules if _bench_module(n) is not None]
        print(f"usage: python -m convflat.bench {{{','.join(names)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
