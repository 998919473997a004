"""The Snakemake workflow without running it: format, lint, dry runs, config errors.

Each test starts Snakemake as a user would (a subprocess in the repository root, or in a
temporary directory for the few that write files). About 1.5 minutes in all on two cores.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CONFIGS = ["config/config.yaml", "config/quick.yaml", "config/test.yaml"]


def snakemake(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """Run Snakemake; return the CompletedProcess (stdout and stderr merged)."""
    return subprocess.run(
        [*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def out(proc) -> str:
    return proc.stdout + proc.stderr


def job_counts(text: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: {rule: count}."""
    block = text.split("Job stats:", 1)[1].split("total", 1)[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", block, re.M)}


def test_snakefmt_check():
    proc = subprocess.run(
        [sys.executable, "-m", "snakefmt", "--check", "Snakefile", "workflow"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, out(proc)


@pytest.mark.parametrize("configfile", ["config/config.yaml", "config/quick.yaml"])
def test_lint_has_no_findings(configfile):
    proc = snakemake("--lint", "--configfile", configfile)
    assert proc.returncode == 0, out(proc)
    assert "Congratulations, your workflow is in a good condition!" in out(proc), out(proc)


def test_dry_run_default_config():
    """`snakemake -n --cores all`: the full reproduction plans without network or GPU."""
    proc = snakemake("-n", "--cores", "all")
    assert proc.returncode == 0, out(proc)
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    n_runs = sum(
        len(list(_grid_points(study["grid"]))) for study in config["studies"].values())
    jobs = job_counts(out(proc))
    assert jobs["train"] == jobs["measure"] == n_runs
    assert jobs["download"] == len({d["source"] for d in config["datasets"].values()})
    assert jobs["collect"] == len(config["studies"])
    # one prepared file per dataset, plus one per label-noise level of the noise study
    assert jobs["prepare"] == len(config["datasets"]) + 2
    assert "output: data/prepared/cifar10-noise0.2.pt" in out(proc)
    for rule in ("false_friend", "validation_exactness", "hutchinson_figure",
                 "validation_notebook", "overall_correlation"):
        assert jobs[rule] == 1, jobs
    assert jobs["validation_model"] == 3  # invariance, hutchinson, cost
    # GPU stages ask for one GPU each.
    assert re.search(r"rule train:(?:(?!rule ).)*gpu=1", out(proc), re.S)


def test_dry_run_quick_config():
    proc = snakemake("-n", "--cores", "all", "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, out(proc)
    config = yaml.safe_load((REPO / "config/quick.yaml").read_text())
    main = config["studies"]["digits"]
    assert len(list(_grid_points(main["grid"]))) >= 24
    assert len([a for a in main["grid"] if a != "seed"]) >= 3
    jobs = job_counts(out(proc))
    assert "download" not in jobs  # scikit-learn's digits need no network
    assert jobs["false_friend"] == 1 and jobs["validation_exactness"] == 1
    assert jobs["overview_notebook"] == len(config["studies"])
    assert "gpu=1" not in out(proc)


def test_run_ids_name_hyperparameters():
    """Paths say what the model is: results/runs/<study>/width~8/depth~2/wd~0/seed~0/..."""
    proc = snakemake("results/runs/digits/width~8/depth~2/wd~0.001/seed~1/train.json",
                     "-n", "--cores", "1", "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, out(proc)
    assert job_counts(out(proc)) == {"prepare": 1, "train": 1}
    assert "wildcards: study=digits, run_id=width~8/depth~2/wd~0.001/seed~1" in out(proc)


def test_one_figure_rebuilds_alone(tmp_path):
    """Naming one figure plans that figure (and what it needs), not its siblings."""
    proc = snakemake("results/figures/digits/measure_vs_gap.png", "-n", "--cores", "1",
                     "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, out(proc)
    jobs = job_counts(out(proc))
    assert jobs["figure"] == 1 and "overview_notebook" not in jobs, jobs
    assert "wildcards: study=digits, figure=measure_vs_gap" in out(proc)


def test_unknown_run_is_an_error():
    proc = snakemake("results/runs/digits/width~1000/depth~2/wd~0/seed~0/train.json",
                     "-n", "--cores", "1", "--configfile", "config/quick.yaml")
    assert proc.returncode != 0
    assert "no run 'width~1000/depth~2/wd~0/seed~0' in study 'digits'" in out(proc)


def _grid_points(grid):
    import itertools

    return itertools.product(*grid.values())


def _mutate(config: dict, path: str, value) -> dict:
    """Set config[a][b]... = value for path 'a.b...' ('-' deletes the key)."""
    keys = path.split(".")
    node = config
    for key in keys[:-1]:
        node = node[key]
    if value == "-":
        del node[keys[-1]]
    else:
        node[keys[-1]] = value
    return config


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("studies.tiny.train.epochs", "three",
         "config key 'studies.tiny.train.epochs': 'three' is not of type 'integer'"),
        ("studies.tiny.train.epoch", 3,
         "config key 'studies.tiny.train': Additional properties are not allowed "
         "('epoch' was unexpected)"),
        ("studies.tiny.grid.widths", [4],
         "config key 'studies.tiny.grid': Additional properties are not allowed "
         "('widths' was unexpected)"),
        ("studies.tiny.grid.weight_decay", [-1.0],
         "config key 'studies.tiny.grid.weight_decay[0]': -1.0 is less than the minimum of 0"),
        ("studies.tiny.dataset", "cifar10",
         "config key 'studies.tiny.dataset': 'cifar10' is not one of datasets ['digits']"),
        ("device", "gpu", "config key 'device': 'gpu' does not match"),
        ("studies.tiny.model.family", "vgg",
         "config key 'studies.tiny.model.family': 'vgg' is not one of"),
        ("validation.study", "nope",
         "config key 'validation.study': 'nope' is not one of the studies ['tiny']"),
        ("datasets.digits.source", "-",
         "config key 'datasets.digits': 'source' is a required property"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, path, value, message):
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mutate(config, path, value)))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    assert message in out(proc), out(proc)[-3000:]


def test_download_without_network_says_what_to_place_where(tmp_path):
    """Offline, the download rule fails with the URL and the path of every file it needs.

    The network is cut for the job by proxies that point at a closed port.
    """
    closed = "http://127.0.0.1:9"
    env = {"http_proxy": closed, "https_proxy": closed, "HTTP_PROXY": closed,
           "HTTPS_PROXY": closed, "no_proxy": "", "NO_PROXY": ""}
    proc = snakemake(
        "data/raw/cifar10/download.json", "-s", str(REPO / "Snakefile"), "--directory",
        str(tmp_path), "--cores", "1", "--configfile", str(REPO / "config/config.yaml"),
        env=env,
    )
    assert proc.returncode != 0
    text = out(proc)
    assert "could not download cifar10 into data/raw/cifar10/" in text, text[-3000:]
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in text
    assert "-> data/raw/cifar10/cifar-10-python.tar.gz" in text
    assert "config/quick.yaml" in text
    assert not (tmp_path / "data/raw/cifar10/download.json").exists()


def test_gpu_config_without_gpu_says_how_long(tmp_path):
    """A real run of the default config (through profiles/local) starts with the time
    estimate; without CUDA it warns and points to the quick study."""
    import torch

    proc = snakemake(
        "estimate", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
        "--profile", str(REPO / "profiles/local"),
        "--configfile", str(REPO / "config/config.yaml"),
    )
    assert proc.returncode == 0, out(proc)
    text = out(proc)
    assert re.search(r"Provided resources: .*gpu", text), text  # the profile's GPU cap
    assert re.search(r"131 runs to train and measure: about \d+\.\d h on one H100", text)
    if not torch.cuda.is_available():
        assert "torch sees no" in text and "--configfile config/quick.yaml" in text, text
