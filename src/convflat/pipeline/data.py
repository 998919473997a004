"""Stage ``data`` (workflow/rules/data.smk): the download job and the listing of a user's
data folder.

The Snakemake process imports this module (``common.smk``: the inputs of rule prepare), so
importing it imports no torch; :func:`download_source`, which runs in the download job,
imports torchvision and :mod:`convflat.data` when it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from convflat.io import atomic_write_json, provenance

__all__ = [
    "DownloadError", "download_source", "folder_digest", "folder_listing", "user_data_path",
    "write_folder_manifest",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ user data


def user_data_path(source: str) -> Path:
    """The path of an ``npz:PATH`` or ``folder:PATH`` source, as :func:`convflat.data.prepare`
    reads it (``~`` expanded; relative to the working directory)."""
    return Path(str(source).split(":", 1)[1]).expanduser()


def folder_listing(folder: str | os.PathLike) -> list[tuple[str, int, int]]:
    """(path relative to ``folder``, size in bytes, mtime in ns) of every file below it,
    sorted (hidden ones too: the image-folder loader reads them)."""
    root = Path(folder)
    out = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            st = path.stat()
            out.append((path.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
    return sorted(out)


def folder_digest(folder: str | os.PathLike) -> str:
    """SHA-256 of :func:`folder_listing`: changes when a file is added, removed, resized or
    rewritten."""
    text = "\n".join(f"{p}\t{s}\t{m}" for p, s, m in folder_listing(folder))
    return hashlib.sha256(text.encode()).hexdigest()


def write_folder_manifest(folder: str | os.PathLike, out: str | os.PathLike,
                          log_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Rule folder_manifest: write ``out`` (JSON: the folder, its digest and every file with
    size and mtime), atomically; returns it."""
    listing = folder_listing(folder)
    obj = {"folder": str(Path(folder).resolve()), "digest": folder_digest(folder),
           "n_files": len(listing),
           "files": [{"path": p, "size": s, "mtime_ns": m} for p, s, m in listing]}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, out)  # not convflat.io.atomic_write_json: its format differs
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(f"{len(listing)} files in {folder}, digest {obj['digest']}\n")
    return obj


# ------------------------------------------------------------------------------- download


class DownloadError(RuntimeError):
    """A torchvision source could not be downloaded; the message says which file to put
    where."""


def download_source(source: str, root: str | os.PathLike,
                    marker: str | os.PathLike) -> dict[str, Any]:
    """Fetch torchvision source ``source`` into ``root`` (torchvision's layout and MD5
    checks; files placed there by hand are verified and used) and write the ``marker``
    JSON: provenance, the torchvision version and the files. Without network, raise
    :class:`DownloadError` listing the URL and the path of every file needed."""
    # torch and torchvision: only in the job (this module is imported by the Snakemake process)
    import torchvision

    from convflat.data import download, torchvision_files
    from convflat.train import error_text

    start_time, root = time.perf_counter(), str(root)
    try:
        sizes = download(source, root)
    except Exception as exc:  # network errors come in many types
        lines = [f"could not download {source} into {root}/ ({error_text(exc)}).",
                 "This machine may be offline. Download these files elsewhere and put them at:"]
        lines += [f"    {url}\n        -> {path}" for url, path in torchvision_files(source, root)]
        lines += ["then run snakemake again: the files are verified (MD5) and used without "
                  "network.", "For a study that needs no download at all: "
                  "snakemake --cores all --configfile config/quick.yaml"]
        raise DownloadError("\n".join(lines)) from exc
    log.info("%s: %s images", source, sizes)
    files = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*")
                   if p.is_file() and p.name != Path(marker).name)
    record = {**provenance(seconds=time.perf_counter() - start_time), "source": source,
              "root": root, "torchvision_version": torchvision.__version__, "files": files}
    atomic_write_json(marker, record)
    return record
