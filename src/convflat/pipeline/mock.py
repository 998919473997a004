"""The ``snakemake`` object of a rule's job, built outside Snakemake: to run a workflow
script by hand for debugging (a debugger, a notebook), as in pypsa-eur."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# snakemake.api first: importing snakemake.dag before it is a circular import
from snakemake.api import ConfigSettings, OutputSettings, ResourceSettings, SnakemakeApi
from snakemake.dag import DAG
from snakemake.jobs import Job
from snakemake.script import Snakemake

__all__ = ["mock_snakemake"]


def mock_snakemake(rule: str, *, configfile: str | os.PathLike | None = None,
                   snakefile: str | os.PathLike | None = None, **wildcards: str) -> Any:
    """The ``snakemake`` object that Snakemake would give the script of ``rule``.

    Loads the workflow (``snakefile``, default ``Snakefile`` in the working directory,
    with ``configfile`` replacing its default config, as ``--configfile`` does) and builds
    the job of ``rule`` for ``wildcards``: its input, output, params, log, threads,
    resources and config, with the rule's wildcards. Paths stay relative to the working
    directory, which must be the workflow's (where ``results/`` lives). Output and log
    directories are created. A wrong rule or missing wildcard raises a ValueError.
    """
    snakefile = Path(snakefile or "Snakefile").resolve()
    configfiles = [Path(configfile).resolve()] if configfile is not None else []
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf_api = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=configfiles),
            snakefile=snakefile, workdir=Path.cwd(),
        )
        wf_api.dag()  # gives the parsed workflow its DAG settings
        workflow = wf_api._workflow  # the parsed workflow (SnakemakeApi has no public getter)
        try:
            rule_obj = workflow.get_rule(rule)
        except Exception as exc:
            raise ValueError(f"no rule {rule!r} in {snakefile}") from exc
        missing = sorted(set(rule_obj.wildcard_names) - set(wildcards))
        if missing:
            raise ValueError(f"rule {rule!r} needs wildcard(s) {missing}")
        job = Job(rule_obj, DAG(workflow, rules=[rule_obj]), wildcards_dict=dict(wildcards))
        mock = Snakemake(job.input, job.output, job.params, job.wildcards, job.threads,
                         job.resources, job.log, workflow.config, rule_obj.name, None)
    for path in [*mock.output, *mock.log]:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    return mock
