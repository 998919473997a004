import importlib
import pkgutil
import sys

import convflat.bench as _bench


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m convflat.bench <name> [options]``: the bench module ``name``'s main."""
    argv = list(sys.argv[1:] if argv is None else argv)
    names = sorted(m.name for m in pkgutil.iter_modules(_bench.__path__)
                   if not m.name.startswith("_"))
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in names:
        print(f"usage: python -m convflat.bench {{{','.join(names)}}} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"convflat.bench.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
