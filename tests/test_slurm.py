"""The SLURM profile against a real one-node SLURM (Debian's packages, no mocks).

Each test starts its own private cluster (tests/slurm_cluster.py: about a second once the
packages are installed), runs Snakemake through ``--profile profiles/slurm`` exactly as a
user would on a login node, and then asks the cluster itself (``scontrol show job``, the
controller's log) what ran. Teardown stops every daemon and job even when a test fails.

Besides the workflow's own options (config file, target), the tests add one option to the
profile, for speed; it does not change what is submitted:
``--slurm-init-seconds-before-status-checks 5``: the plugin's first status check comes 5 s
after a submission instead of the profile's 20 s (jobs here take 10-30 s; on a real
cluster the queue wait dwarfs either value).

Every Snakemake process runs under a hard wall-clock limit: a Snakemake that lost track of
its jobs waits forever and ignores SIGTERM, so the test ends it with SIGKILL on its
process group and fails with the tail of its output.

Skipped only where a cluster cannot be had: not root, or the Debian packages cannot be
installed (no apt, archive unreachable), or another SLURM is configured on the machine.
CI should set CONVFLAT_REQUIRE_SLURM=1, which turns those skips into failures.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

try:  # tests/ is on sys.path under pytest's default import mode ...
    from slurm_cluster import SlurmCluster, SlurmUnavailable, cluster_pids, slurm_cluster
except ImportError:  # ... and a package if somebody adds tests/__init__.py
    from tests.slurm_cluster import SlurmCluster, SlurmUnavailable, cluster_pids, slurm_cluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
# Test-only speed-up, see the module docstring.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "5"]
SNAKEMAKE_TIMEOUT = 180  # s; a run of the minimal workflow takes 30-60 s on 2 cores
STUDY_TIMEOUT = 600  # s; the tiny study's SLURM part takes 2-5 min on 2 cores


# --------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster_or_skip(root: Path, **kwargs):
    """slurm_cluster(), skipping (or failing under CONVFLAT_REQUIRE_SLURM=1) if unavailable.

    After the cluster is gone, assert that it left no process behind.
    """
    with contextlib.ExitStack() as stack:
        try:
            cluster = stack.enter_context(slurm_cluster(root, **kwargs))
        except SlurmUnavailable as exc:
            if os.environ.get("CONVFLAT_REQUIRE_SLURM") == "1":
                pytest.fail(f"CONVFLAT_REQUIRE_SLURM=1 but no SLURM here: {exc}")
            pytest.skip(f"no SLURM cluster possible here: {exc}")
        # The plugin is a declared dependency (extra `slurm`): missing, it is a setup error.
        try:
            import snakemake_executor_plugin_slurm  # noqa: F401
        except ImportError:
            pytest.fail("snakemake-executor-plugin-slurm is not installed: "
                        "pip install -e '.[workflow,slurm]'")
        yield cluster
    left = cluster_pids(cluster.root, cluster.spool)
    assert not left, f"processes of the test cluster survived teardown: {left}"


def snakemake_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", *args]


def start_snakemake(args: list[str], cwd: Path, cluster: SlurmCluster, log: Path):
    """Start Snakemake in its own process group (so that it can be SIGKILLed whole)."""
    with open(log, "w") as out:
        return subprocess.Popen(snakemake_cmd(*args), cwd=cwd, env=cluster.env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def run_snakemake(args: list[str], cwd: Path, cluster: SlurmCluster, log: Path,
                  timeout: float = SNAKEMAKE_TIMEOUT, expect_ok: bool = True) -> str:
    """Run Snakemake to the end under a hard limit; return its output."""
    proc = start_snakemake(args, cwd, cluster, log)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        pytest.fail(f"snakemake {' '.join(args)} did not finish in {timeout} s and was "
                    f"killed; squeue:\n{cluster.run('squeue', '--states=all', check=False)}"
                    f"\n{tail(log)}\n{cluster.logs()}")
    text = log.read_text(errors="replace")
    if expect_ok and proc.returncode != 0:
        pytest.fail(f"snakemake {' '.join(args)} exited with {proc.returncode}\n"
                    f"{cluster.logs(lines=10)}\n{tail(log)}")
    if not expect_ok and proc.returncode == 0:
        pytest.fail(f"snakemake {' '.join(args)} succeeded but should not have\n{tail(log)}")
    return text


def tail(path: Path, lines: int = 80) -> str:
    text = path.read_text(errors="replace").splitlines()
    return f"--- last {min(lines, len(text))} lines of {path} ---\n" + "\n".join(text[-lines:])


def wait_for(predicate, timeout: float, what: str, proc=None, log=None,
             interval: float = 0.5):
    """Poll predicate() until truthy; fail early if the Snakemake process `proc` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"snakemake exited ({proc.returncode}) while waiting for {what}\n"
                        f"{tail(log)}")
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def run_id_of(output: str) -> str:
    """The plugin names every SLURM job of one Snakemake run after this run ID."""
    match = re.search(r"SLURM run ID: (\S+)", output)
    assert match, "the plugin did not print its run ID"
    return match.group(1)


def submitted(output: str) -> dict[int, str]:
    """{SLURM job id: Snakemake log path} from "Job N has been submitted with SLURM jobid"."""
    return {int(j): log for j, log in re.findall(
        r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)", output)}


def job_id_in(path: Path) -> int:
    """Our test rules write `job=<SLURM_JOB_ID>` into their outputs."""
    match = re.search(r"job=(\d+)", path.read_text())
    assert match, f"{path} has no SLURM job id: {path.read_text()!r}"
    return int(match.group(1))


def rule_jobs(cluster: SlurmCluster, run_id: str) -> dict[str, list[tuple[int, dict]]]:
    """{rule: [(job id, scontrol fields), ...]} for the jobs of one Snakemake run.

    The plugin sets each job's comment to `rule_<name>` (plus wildcards) and its name to
    the run ID; the test cluster keeps finished jobs for MinJobAge (an hour).
    """
    by_rule: dict[str, list] = {}
    for job_id, info in sorted(cluster.jobs().items()):
        if info["name"] == run_id:
            rule = re.sub(r"_wildcards_.*$", "", info["comment"]).removeprefix("rule_")
            by_rule.setdefault(rule, []).append((job_id, info))
    return by_rule


# --------------------------------------------------------------------------------------
# a minimal workflow: the profile and the plugin, independent of convflat's own rules
# --------------------------------------------------------------------------------------

MINIMAL_SNAKEFILE = r'''
# Each rule writes the SLURM job it ran in, so that the test can tie outputs to jobs.
rule all:
    input:
        "out/plain.txt",
        "out/gpu.txt",
        "out/slow.txt",


rule plain:
    output:
        "out/plain.txt",
    log:
        "logs/plain.log",
    shell:
        "echo job=$SLURM_JOB_ID host=$(hostname) cpus=$SLURM_CPUS_PER_TASK > {output} 2> {log}"


# Declared like convflat's GPU stages; the profile must turn it into a GPU request.
rule gpu_rule:
    output:
        "out/gpu.txt",
    log:
        "logs/gpu_rule.log",
    resources:
        gpu=1,
    shell:
        "echo job=$SLURM_JOB_ID cuda=${{CUDA_VISIBLE_DEVICES:-none}} > {output} 2> {log}"


# A long job, for the scheduler and the test to kill while it runs.
rule slow:
    input:
        "out/plain.txt",
    output:
        "out/slow.txt",
    log:
        "logs/slow.log",
    params:
        seconds=config.get("slow_seconds", 600),
    shell:
        "sleep {params.seconds} 2> {log}; echo job=$SLURM_JOB_ID > {output}"
'''


@pytest.fixture
def minimal_workflow(tmp_path: Path) -> Path:
    workdir = tmp_path / "wf"
    workdir.mkdir()
    (workdir / "Snakefile").write_text(MINIMAL_SNAKEFILE)
    return workdir


def test_profile_on_real_slurm_minimal_workflow(tmp_path: Path, minimal_workflow: Path):
    """The shipped profile, unchanged, on a node with one (stand-in) GPU. In one scenario
    (one Snakemake start is ~15 s of the budget, so the phases share it):

    1. Every rule runs as its own SLURM job; the gpu=1 rule asks SLURM for a GPU.
    2. The scheduler kills a running job (scancel, as a time limit would): Snakemake
       resubmits it as a new SLURM job (profile: retries: 1).
    3. The Snakemake process itself dies (SIGKILL, as when the login session ends) while
       that retry runs. docs/slurm.md's recipe then resumes: cancel the run's orphaned jobs
       by the run ID, --unlock, run the same command again; finished rules stay done.
    """
    with cluster_or_skip(tmp_path / "cluster", gpus=1) as cluster:
        cmd = ["--profile", str(PROFILE), *FAST_STATUS]
        log = tmp_path / "run1.log"
        proc = start_snakemake(cmd, minimal_workflow, cluster, log)
        try:
            def slow_running(after: int = 0):
                for job_id, info in sorted(cluster.jobs().items()):
                    if (info["comment"] == "rule_slow" and info["state"] == "RUNNING"
                            and job_id > after):
                        return job_id
            killed = wait_for(slow_running, 120, "rule slow to run", proc, log)
            cluster.run("scancel", str(killed))  # phase 2: the scheduler kills it
            # Wait for the retry to run, and for Snakemake to have recorded gpu_rule as
            # finished (it runs beside plain), so that the resume below is deterministic.
            retry = wait_for(lambda: "(Rule: gpu_rule)" in log.read_text(errors="replace")
                             and slow_running(after=killed), 90,
                             "gpu_rule done, slow resubmitted and running", proc, log)
        finally:
            kill_group(proc)  # phase 3: the login session dies; SLURM jobs live on
        output = log.read_text(errors="replace")
        run_id = run_id_of(output)
        jobs = rule_jobs(cluster, run_id)

        # 1. One SLURM job per rule execution (`all` is a local rule), each allocated by
        #    the controller, each output naming the job it ran in.
        assert sorted(jobs) == ["gpu_rule", "plain", "slow"], jobs
        assert [j for j, _ in jobs["slow"]] == [killed, retry], jobs["slow"]
        for rule, name in [("plain", "plain"), ("gpu_rule", "gpu")]:
            [(job_id, info)] = jobs[rule]
            assert info["state"] == "COMPLETED", (rule, info)
            assert job_id_in(minimal_workflow / "out" / f"{name}.txt") == job_id
        all_ids = [job_id for entries in jobs.values() for job_id, _ in entries]
        assert len(set(all_ids)) == 4, jobs
        assert set(all_ids) <= set(cluster.allocated_job_ids())
        assert set(submitted(output)) == set(all_ids)
        # The GPU mapping: gpu=1 became a GPU request (SLURM then set CUDA_VISIBLE_DEVICES);
        # the other rules request none.
        assert "gres:gpu:1" in jobs["gpu_rule"][0][1]["tres_per_job"], jobs["gpu_rule"]
        assert "cuda=0" in (minimal_workflow / "out" / "gpu.txt").read_text()
        assert "gpu" not in jobs["plain"][0][1]["tres_per_job"]
        # slurm-keep-successful-logs: each finished job's SLURM log where the plugin said.
        for job_id, path in submitted(output).items():
            assert Path(path) == (minimal_workflow / ".snakemake" / "slurm_logs"
                                  / f"rule_{jobs_rule(jobs, job_id)}" / f"{job_id}.log")
            if job_id not in (killed, retry):
                assert Path(path).is_file(), f"no SLURM log {path}"

        # 2. The scheduler's kill, then Snakemake's retry in a new job.
        assert jobs["slow"][0][1]["state"] == "CANCELLED", jobs["slow"]
        assert "Trying to restart job" in output

        # 3. Resume. The retry outlived Snakemake: cancel the run's jobs by name.
        assert cluster.run("squeue", "--noheader", "--name", run_id).strip()
        cluster.run("scancel", "--name", run_id)
        wait_for(lambda: not cluster.run("squeue", "--noheader", "--states=PENDING,RUNNING",
                                         "--name", run_id).strip(), 30, "the jobs to end")
        # Snakemake's lock outlived it too: it refuses to start until --unlock.
        locked = run_snakemake(cmd, minimal_workflow, cluster, tmp_path / "locked.log",
                               timeout=60, expect_ok=False)
        assert "LockException" in locked or "is locked" in locked, locked[-2000:]
        run_snakemake(["--profile", str(PROFILE), "--unlock"], minimal_workflow, cluster,
                      tmp_path / "unlock.log", timeout=60)
        # The same command again (plus a short sleep for `slow`, for the test's sake).
        plain_mtime = (minimal_workflow / "out" / "plain.txt").stat().st_mtime
        output = run_snakemake([*cmd, "--config", "slow_seconds=0"], minimal_workflow,
                               cluster, tmp_path / "run2.log")
        resumed = rule_jobs(cluster, run_id_of(output))
        assert sorted(resumed) == ["slow"], resumed  # plain and gpu_rule stay done
        assert (minimal_workflow / "out" / "plain.txt").stat().st_mtime == plain_mtime
        [(slow_job, info)] = resumed["slow"]
        assert info["state"] == "COMPLETED"
        assert job_id_in(minimal_workflow / "out" / "slow.txt") == slow_job


def jobs_rule(jobs: dict, job_id: int) -> str:
    return next(rule for rule, entries in jobs.items() if job_id in dict(entries))


# --------------------------------------------------------------------------------------
# the real thing: convflat's tiny test study
# --------------------------------------------------------------------------------------

STUDY_CONFIG = "config/test.yaml"
# The target is the study's runs table, so the SLURM jobs are: prepare the data, train and
# measure every run (the two GPU stages), collect the table. The rest of the DAG (analysis,
# validation, notebooks) runs in the local end-to-end test; here it would more than double
# the time on a 2-core CI machine (each SLURM job adds ~10 s of Snakemake start-up inside
# the job) and tell nothing new about the cluster.
GPU_RULES = {"train", "measure"}


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """The repository's files (tracked, or new and not ignored) in a fresh directory.

    Outside a git checkout: the tree without the directories .gitignore names.
    """
    copy = tmp_path / "repo"
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(
            ".git", ".venv", "venv", "env", "data", "results", ".snakemake", "logs",
            "benchmarks", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"))
        return copy
    for name in filter(None, listing.stdout.split("\0")):
        src = REPO / name
        if src.is_file():  # listed but deleted in the work tree: skip
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, copy / name)
    return copy


def test_tiny_study_on_slurm(tmp_path: Path, repo_copy: Path):
    """`snakemake results/tables/tiny/runs.csv --profile profiles/slurm
    --configfile config/test.yaml --config gpu=True`, in a copy of the repository.

    Run as a GPU study (gpu=True) on a node with two stand-in GPUs, so that the workflow's
    own GPU rules go through the profile's GPU mapping; `device: cpu` in the config keeps
    the computation on the CPU. Checks each rule execution's SLURM job and the runs table.
    """
    config = yaml.safe_load((repo_copy / STUDY_CONFIG).read_text())
    [(study, spec)] = config["studies"].items()
    grid = spec["grid"]
    n_runs = math.prod(len(values) for values in grid.values())
    target = f"results/tables/{study}/runs.csv"

    with cluster_or_skip(tmp_path / "cluster", gpus=2) as cluster:
        output = run_snakemake(
            [target, "--profile", "profiles/slurm", *FAST_STATUS,
             "--configfile", STUDY_CONFIG, "--config", "gpu=True"],
            repo_copy, cluster, tmp_path / "study.log", timeout=STUDY_TIMEOUT)
        jobs = rule_jobs(cluster, run_id_of(output))

        # One SLURM job per rule execution, each completed, each run by the controller.
        expected = {"prepare": len(config["datasets"]), "train": n_runs,
                    "measure": n_runs, "collect": 1}
        assert {rule: len(entries) for rule, entries in jobs.items()} == expected, jobs
        all_ids = [job_id for entries in jobs.values() for job_id, _ in entries]
        assert len(set(all_ids)) == len(all_ids)
        assert set(all_ids) <= set(cluster.allocated_job_ids())
        assert set(submitted(output)) == set(all_ids)
        for rule, entries in jobs.items():
            for job_id, info in entries:
                assert info["state"] == "COMPLETED", (rule, job_id, info)
                # GPU stages asked SLURM for a GPU, the others did not.
                assert ("gres:gpu:1" in info["tres_per_job"]) == (rule in GPU_RULES), info
                # The job's SLURM log is where the plugin puts it, and shows the rule.
                [log] = (repo_copy / ".snakemake" / "slurm_logs" / f"rule_{rule}").rglob(
                    f"{job_id}.log")
                assert f"rule {rule}:" in log.read_text(errors="replace"), log
        # Each train/measure job ran one run: its wildcards are in the job's comment.
        run_ids = {info["comment"].split("_wildcards_", 1)[1] for _, info in jobs["train"]}
        assert len(run_ids) == n_runs

        # The study's artifacts.
        with open(repo_copy / target, newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == n_runs, rows
        assert {row["status"] for row in rows} == {"ok"}, rows
        assert {row["study"] for row in rows} == {study}
        for axis, values in grid.items():
            column = "hp_" + axis
            assert sorted({float(row[column]) for row in rows}) == sorted(map(float, values))
        for row in rows:
            run_dir = repo_copy / "results" / "runs" / study / row["run_id"]
            record = json.loads((run_dir / "train.json").read_text())
            assert record["status"] == "ok" and record["device"] == "cpu", record
            measures = json.loads((run_dir / "measures.json").read_text())
            assert measures["status"] == "ok", measures
            for name in spec["measure"]["names"]:
                assert math.isfinite(float(row[f"m_{name}"])), (name, row)
