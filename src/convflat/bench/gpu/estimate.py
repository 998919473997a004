"""What ``convflat.study``'s time estimate models for a job, for ``bench gpu``'s one-job row:
:func:`convflat.study.estimate_hours` called on the job's own config (validated by the
workflow's schema, its defaults filled, as ``snakemake estimate`` sees it), and the forward
FLOPs the estimate counts (:func:`convflat.study.forward_macs`), which turn a measured
images/s into TFLOP/s."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

SCHEMA = Path("workflow") / "schemas" / "config.schema.yaml"


def _reason(exc: BaseException) -> str:
    """One line for the row: the schema's complaint with its key where the error carries one
    (Snakemake's WorkflowError wraps jsonschema's ValidationError), else the error."""
    import jsonschema

    chain = [exc, exc.__cause__, exc.__context__, *exc.args]
    err = next((e for e in chain if isinstance(e, jsonschema.ValidationError)), None)
    if err is not None:
        key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
        return f"config key '{key}': {err.message}"[:200]
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"


def modelled_seconds(root: Path, config: dict[str, Any], device_kind: str
                     ) -> tuple[float | None, str]:
    """(seconds per run that the estimate models for ``config`` at the rates
    ``convflat.study.RATES[device_kind]`` ("gpu" or "cpu"), "") or (None, the reason).
    ``root``: the source tree, whose workflow schema validates the config."""
    from snakemake.utils import validate

    from convflat.study import estimate_hours

    config = copy.deepcopy(config)
    try:
        validate(config, str(root / SCHEMA))  # fills the schema's defaults in place
        hours, n_runs = estimate_hours(config, device_kind)
    except Exception as exc:  # the row reports it; the job itself was judged already
        return None, f"n/a: the estimate failed ({_reason(exc)})"
    if n_runs == 0:
        return None, "n/a: the config has no run"
    return hours * 3600.0 / n_runs, ""


def forward_flops(spec: dict[str, Any], size: int, channels: int = 3,
                  classes: int = 10) -> float:
    """FLOPs of one image's forward pass (2 x the estimate's multiply-adds) of ``spec``
    (without its data keys) on ``size`` x ``size`` images."""
    from convflat.study import forward_macs

    return 2.0 * forward_macs(spec, (size, size), channels, classes)
