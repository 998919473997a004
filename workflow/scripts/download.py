"""Rule download: fetch a torchvision benchmark into data/raw/<source>/ (torchvision's own
layout and MD5 checks) and write download.json. Without network, fail with a message that
says which file to put where; a file put there by hand is verified and used as is."""

import sys

sys.path.insert(0, snakemake.scriptdir)  # noqa: F821 (snakemake is injected)
from _common import Timer, error_text, start

log = start(snakemake)  # noqa: F821
source = snakemake.wildcards.source  # noqa: F821
root = snakemake.params.root  # noqa: F821

from pathlib import Path  # noqa: E402

import torchvision  # noqa: E402
import torchvision.datasets as tvd  # noqa: E402

from convflat.io import atomic_write_json, provenance  # noqa: E402

CLASSES = {
    "mnist": tvd.MNIST, "kmnist": tvd.KMNIST, "fashion-mnist": tvd.FashionMNIST,
    "cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "svhn": tvd.SVHN,
}


def needed_files(cls) -> list[tuple[str, str]]:
    """(URL, path under data/raw/<source>) of every file torchvision would download."""
    if hasattr(cls, "tgz_md5"):  # CIFAR-10/100: one archive
        return [(cls.url, f"{root}/{cls.filename}")]
    if hasattr(cls, "split_list"):  # SVHN: one .mat per split
        return [(url, f"{root}/{name}") for split, (url, name, _md5) in cls.split_list.items()
                if split in ("train", "test")]
    raw = f"{root}/{cls.__name__}/raw"  # MNIST family: four .gz files
    return [(f"{cls.mirrors[0]}{name}", f"{raw}/{name}") for name, _md5 in cls.resources]


if source not in CLASSES:
    raise SystemExit(f"download: unknown torchvision source {source!r} (known: {list(CLASSES)})")
cls = CLASSES[source]
timer = Timer()
try:
    for train in (True, False):
        kw = {"split": "train" if train else "test"} if cls is tvd.SVHN else {"train": train}
        ds = cls(root, download=True, **kw)
        log.info("%s %s: %d images", source, "train" if train else "test", len(ds))
except Exception as exc:  # network errors come in many types
    lines = [f"could not download {source} into {root}/ ({error_text(exc)}).",
             "This machine may be offline. Download these files elsewhere and put them at:"]
    lines += [f"    {url}\n        -> {path}" for url, path in needed_files(cls)]
    lines += ["then run snakemake again: the files are verified (MD5) and used without network.",
              "For a study that needs no download at all: "
              "snakemake --cores all --configfile config/quick.yaml"]
    message = "\n".join(lines)
    log.error(message)
    print(message, file=sys.__stderr__)
    sys.exit(1)

files = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()
               and p.name != "download.json")
atomic_write_json(snakemake.output.marker, {  # noqa: F821
    **provenance(seconds=timer.seconds), "source": source, "root": root,
    "torchvision_version": torchvision.__version__, "files": files,
})
