"""What a study is: its grid, its run ids, its runs, its data files, the checks of its
config and how long it takes.

A *study* (a value of the workflow config's ``studies``) trains one model per point of its
``grid`` on one dataset. The package turns a validated config into that plan, with no
Snakemake and no torch (a dry run of the workflow imports it):

* :mod:`convflat.study.plan`: the grid axes (:data:`AXES`), run ids, :func:`expand_study`,
  the prepared data files, the validation runs and the stages' code versions.
* :mod:`convflat.study.checks`: :func:`check_config` and the checks it runs, each raising
  :class:`ConfigError` with the offending key in ``err.key``.
* :mod:`convflat.study.estimate`: :func:`estimate_hours` / :func:`estimate_text` and the one
  FLOP counter, :func:`forward_flops`.

Every public name is re-exported here: ``from convflat.study import X``.
"""

from __future__ import annotations

from convflat.errors import ConfigError
from convflat.study.checks import _SPEC_CHECKS as _SPEC_CHECKS  # the tests inspect it
from convflat.study.checks import (
    check_config,
    check_data,
    check_device,
    check_measures,
    check_models,
    check_training,
)
from convflat.study.estimate import (
    EXACT_PASSES,
    MEASURE_PASSES,
    RATES,
    TRACK_PASSES,
    estimate_hours,
    estimate_text,
    forward_flops,
    forward_macs,
)
from convflat.study.plan import (
    AXES,
    RUN_ID_PATTERN,
    RUN_ID_SEP,
    STAGE_VERSIONS,
    Axis,
    Run,
    code_version,
    expand_studies,
    expand_study,
    format_run_id,
    format_value,
    parse_run_id,
    prepared_files,
    prepared_name,
    validation_extra_runs,
    validation_run,
)

__all__ = [
    "AXES", "EXACT_PASSES", "MEASURE_PASSES", "RATES", "RUN_ID_PATTERN", "RUN_ID_SEP",
    "STAGE_VERSIONS", "TRACK_PASSES", "Axis", "ConfigError", "Run", "check_config",
    "check_data", "check_device", "check_measures", "check_models", "check_training",
    "code_version", "estimate_hours", "estimate_text", "expand_studies", "expand_study",
    "format_run_id", "format_value", "forward_flops", "forward_macs", "parse_run_id",
    "prepared_files", "prepared_name", "validation_extra_runs", "validation_run",
]
