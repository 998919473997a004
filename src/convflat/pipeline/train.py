"""Stage ``train`` (workflow/rules/train.smk): what the workflow says about the time a
config's training and measuring take.

The train job itself is :func:`convflat.train.train_or_record_failure`. This module runs in
the Snakemake process (``estimate`` is a local rule; the start-up notice is printed by
``onstart``), so importing it imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from convflat.study import estimate_text

__all__ = ["report_estimate", "startup_notice"]


def _torch_sees_cuda() -> bool:
    """Whether torch (when installed) sees a CUDA device; imports torch."""
    try:
        import torch  # only at the start of a real run of a GPU config
    except ImportError:
        return False
    return torch.cuda.is_available()


def startup_notice(config: Mapping[str, Any],
                   runs: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
    """What to tell the user when a real run of a GPU config starts: ``("info", text)``
    with the time estimate when torch sees CUDA, ``("warning", text)`` pointing to the
    quick study when it does not; None for a CPU config (``gpu: false``)."""
    if not config["gpu"]:
        return None
    has_gpu = _torch_sees_cuda()
    text = estimate_text(config, runs)
    if has_gpu:
        return "info", (f"convflat: {text}. Use --profile profiles/local so that jobs never "
                        "share a GPU.")
    return "warning", (
        "\n" + "=" * 78 + "\n"
        "convflat: this config asks for a GPU (config key 'gpu: true'), but torch sees no\n"
        f"CUDA device here. {text}.\n"
        "For a complete study that runs offline on a CPU in minutes, use:\n"
        "    snakemake --cores all --configfile config/quick.yaml\n"
        "Continuing; stop with Ctrl-C (finished runs are kept, training resumes).\n"
        + "=" * 78)


def report_estimate(config: Mapping[str, Any], runs: Mapping[str, Mapping[str, Any]],
                    log_path: str | os.PathLike) -> str:
    """The ``estimate`` rule: print :func:`convflat.study.estimate_text` and keep it in
    ``log_path``; returns it."""
    text = estimate_text(config, runs)
    print(text)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(text + "\n")
    return text
