"""The Snakemake workflow without running it: format, lint, a few dry runs as smoke tests,
config errors, and the single sources of its names (TrainConfig, METRICS, SOURCES, the figure
and validation-table registries) against the schema and the rules.

The run plans themselves are tested directly in tests/test_study.py. The Snakemake tests
start it as a user would (a subprocess in the repository root, or in a temporary directory
for the few that write files).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from convflat.pipeline.mock import mock_snakemake
from convflat.pipeline.registry import FIGURES, STAGES, VALIDATION_TABLES
from convflat.study import AXES, expand_studies

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
CONFIGS = ["config/config.yaml", "config/quick.yaml", "config/test.yaml"]


def snakemake(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: int = 300):
    """Run Snakemake; return the CompletedProcess (stdout and stderr merged)."""
    return subprocess.run(
        [*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def load_config(path: str) -> dict:
    """A config of the repository with the schema's defaults filled in."""
    config = yaml.safe_load((REPO / path).read_text())
    validate(config, SCHEMA)
    return config


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
    config = load_config("config/config.yaml")
    n_runs = sum(len(runs) for runs in expand_studies(config).values())
    jobs = job_counts(out(proc))
    assert jobs["train"] == jobs["measure"] == n_runs
    assert jobs["download"] == len({d["source"] for d in config["datasets"].values()})
    assert jobs["collect"] == len(config["studies"])
    # one prepared file per dataset, plus one per label-noise level of the noise study
    assert jobs["prepare"] == len(config["datasets"]) + 2
    assert "output: data/prepared/cifar10-noise0.2.pt" in out(proc)
    for rule in ("validation_reference", "hutchinson_figure", "validation_notebook",
                 "overall_correlation"):
        assert jobs[rule] == 1, jobs
    model_tables = [n for n, t in VALIDATION_TABLES.items() if t.uses_model]
    assert jobs["validation_model"] == len(model_tables) == 3  # invariance, hutchinson, cost
    # every registered figure of every study (false_friend where asked), and the pooled ones
    n_false_friend = sum(s["false_friend"] for s in config["studies"].values())
    per_study = len([f for f in FIGURES.values() if f.when is None])
    n_tracked = len(config["studies"])  # track_flatness is on by default
    assert FIGURES["flatness_over_training"].when == "train.track_flatness"
    assert jobs["figure"] == (per_study + 1) * len(config["studies"]) + n_false_friend
    assert jobs["figure"] == sum(f.wanted(s) for s in config["studies"].values()
                                 for f in FIGURES.values())
    assert n_tracked == len(config["studies"])
    assert jobs["overall_figure"] == len([f for f in FIGURES.values() if f.overall])
    # GPU stages ask for one GPU each.
    assert re.search(r"rule train:(?:(?!rule ).)*gpu=1", out(proc), re.S)


def test_dry_run_quick_config():
    proc = snakemake("-n", "--cores", "all", "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, out(proc)
    config = load_config("config/quick.yaml")
    runs = expand_studies(config)
    assert len(runs["digits"]) >= 24
    assert len([a for a in config["studies"]["digits"]["grid"] if a != "seed"]) >= 3
    jobs = job_counts(out(proc))
    assert jobs["train"] == jobs["measure"] == sum(len(r) for r in runs.values())
    assert "download" not in jobs  # scikit-learn's digits need no network
    assert jobs["figure"] == 2 * 4 + 1 and jobs["validation_reference"] == 1
    assert "wildcards: study=digits_wd, figure=false_friend" in out(proc)
    assert "wildcards: study=digits, figure=flatness_over_training" in out(proc)
    # one prepared file per training-set size and noise level of the grid (digits_wd's
    # subset of 300 is digits-n300 too)
    assert jobs["prepare"] == 2 * 2
    assert "output: data/prepared/digits-n300-noise0.2.pt" in out(proc)
    assert jobs["overview_notebook"] == len(config["studies"])
    assert "gpu=1" not in out(proc)


def test_one_figure_rebuilds_alone(tmp_path):
    """Naming one figure plans that figure (and what it needs: the runs table only, which
    is all measure_vs_gap reads), not its siblings."""
    proc = snakemake("results/figures/digits/measure_vs_gap.png", "-n", "--cores", "1",
                     "--configfile", "config/quick.yaml")
    assert proc.returncode == 0, out(proc)
    jobs = job_counts(out(proc))
    assert jobs["figure"] == 1 and "overview_notebook" not in jobs, jobs
    assert "correlation" not in jobs and jobs["collect"] == 1, jobs
    assert "wildcards: study=digits, figure=measure_vs_gap" in out(proc)


def test_unknown_run_is_an_error():
    proc = snakemake("results/runs/digits/width~1000/depth~2/wd~0/seed~0/train.json",
                     "-n", "--cores", "1", "--configfile", "config/quick.yaml")
    assert proc.returncode != 0
    assert "no run 'width~1000/depth~2/wd~0/seed~0' in study 'digits'" in out(proc)


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
        # a schema error (the rest of the schema is checked in-process below) ...
        ("studies.tiny.grid.weight_decay", [-1.0],
         "config key 'studies.tiny.grid.weight_decay[0]': -1.0 is less than the minimum of 0"),
        # ... and a cross-check of convflat.study.check_config (all tested in test_study.py)
        ("studies.tiny.dataset", "cifar10",
         "config key 'studies.tiny.dataset': 'cifar10' is not one of datasets ['digits']"),
        # ... and the deep checks: the model spec built, the measure registry (all tested
        # in-process in test_config_checks.py)
        ("studies.tiny.model.widht", 16,
         "config key 'studies.tiny.model.widht': unknown model option 'widht' of family gapcnn"),
        ("studies.tiny.measure.names", ["conv_trace", "foo"],
         "config key 'studies.tiny.measure.names[1]': unknown measure 'foo'"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, path, value, message):
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_mutate(config, path, value)))
    proc = snakemake("-n", "--cores", "1", "--configfile", str(bad))
    assert proc.returncode != 0
    assert message in out(proc), out(proc)[-3000:]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("studies.tiny.train.epochs", "three", "'three' is not of type 'integer'"),
        ("studies.tiny.train.epoch", 3, "('epoch' was unexpected)"),
        ("studies.tiny.grid.widths", [4], "('widths' was unexpected)"),
        ("device", "gpu", "'gpu' does not match"),
        ("studies.tiny.model.family", "vgg", "'vgg' is not one of"),
        ("datasets.digits.source", "-", "'source' is a required property"),
    ],
)
def test_schema_rejects(path, value, message):
    from snakemake.exceptions import WorkflowError

    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    with pytest.raises(WorkflowError) as err:
        validate(_mutate(config, path, value), SCHEMA)
    assert message in str(err.value.__cause__ or err.value) + repr(err.value.args)


def test_schema_train_block_is_trainconfig():
    """The train block of a study lists exactly TrainConfig's fields with its defaults
    (device aside: it is the top-level key, with the same default)."""
    import dataclasses

    from convflat.train import TrainConfig

    schema = yaml.safe_load(Path(SCHEMA).read_text())
    block = schema["properties"]["studies"]["additionalProperties"]["properties"]["train"]
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(block["properties"]) == set(fields) - {"device"}
    for name, prop in block["properties"].items():
        default = fields[name].default
        default = list(default) if isinstance(default, tuple) else default
        assert prop["default"] == default, name
        assert fields[name].metadata["help"], name
    assert schema["properties"]["device"]["default"] == fields["device"].default


def test_schema_names_come_from_the_library():
    """Metric targets are io.METRICS; the sources are convflat.sources.SOURCES (checked by
    study.check_config, tested in test_study.py); the grid axes are study.AXES; every
    validation table has its settings block."""
    from convflat.io import METRICS
    from convflat.sources import SOURCES

    schema = yaml.safe_load(Path(SCHEMA).read_text())
    targets = schema["properties"]["analysis"]["properties"]["targets"]["items"]["enum"]
    assert sorted(targets) == sorted(METRICS)
    source = schema["properties"]["datasets"]["additionalProperties"]["properties"]["source"]
    assert "convflat.sources.SOURCES" in source["description"]  # no list to keep in step
    assert "sklearn-digits" in SOURCES  # the one the description names
    study = schema["properties"]["studies"]["additionalProperties"]["properties"]
    assert set(study["grid"]["properties"]) == set(AXES)
    validation = schema["properties"]["validation"]["properties"]
    assert set(VALIDATION_TABLES) <= set(validation)


def test_mock_snakemake_builds_a_job():
    """A script's snakemake object outside Snakemake: the job of rule train for one run."""
    run_id = "n~300/noise~0.2/width~16/depth~3/seed~1"
    sm = mock_snakemake("train", configfile=REPO / "config/quick.yaml",
                        snakefile=REPO / "Snakefile", study="digits", run_id=run_id)
    assert sm.rule == "train" and sm.input.data == "data/prepared/digits-n300-noise0.2.pt"
    assert sm.output.record == f"results/runs/digits/{run_id}/train.json"
    assert sm.params.spec == {"family": "gapcnn", "batchnorm": True, "width": 16, "depth": 3}
    assert sm.params.train["stop_loss"] == 0.01 and sm.params.train["seed"] == 1
    sm = mock_snakemake("prepare", configfile=REPO / "config/quick.yaml",
                        snakefile=REPO / "Snakefile", prepared="digits-n300-noise0.2")
    assert sm.params.dataset["subset"] == 300 and sm.params.dataset["label_noise"] == 0.2
    sm = mock_snakemake("figure", configfile=REPO / "config/quick.yaml",
                        snakefile=REPO / "Snakefile", study="digits_wd",
                        figure="flatness_over_training")
    assert dict(sm.input.items())["records"] == [
        f"results/runs/digits_wd/n~300/wd~{w}/seed~{s}/train.json"
        for w in ("0", "0.002", "0.004", "0.006") for s in range(6)]
    sm = mock_snakemake("figure", configfile=REPO / "config/quick.yaml",
                        snakefile=REPO / "Snakefile", study="digits", figure="tau_psi")
    assert dict(sm.input.items()) == {"correlation": "results/tables/digits/correlation.csv"}
    assert sm.params.caption == FIGURES["tau_psi"].caption
    with pytest.raises(ValueError, match="needs wildcard"):
        mock_snakemake("train", configfile=REPO / "config/quick.yaml",
                       snakefile=REPO / "Snakefile", study="digits")


@pytest.mark.parametrize("script", sorted((REPO / "workflow/scripts").glob("*.py")),
                         ids=lambda p: p.name)
def test_scripts_are_short_main_functions(script):
    text = script.read_text()
    assert "noqa" not in text and "sys.path" not in text
    assert "\ndef main(snakemake):\n" in text
    assert 'if "snakemake" not in globals():' in text
    assert len(text.splitlines()) < 40


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


def _user_data_config(tmp_path: Path, source: str) -> Path:
    """config/test.yaml with its dataset replaced by ``source``, no validation, no
    notebooks; written into the working directory ``tmp_path``."""
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    config["datasets"] = {"mine": {"source": source}}
    config["studies"]["tiny"]["dataset"] = "mine"
    config["validation"]["enabled"] = config["notebooks"]["enabled"] = False
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _write_npz(path: Path, seed: int) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (90, 1, 8, 8), dtype=np.uint8),
             y=np.arange(90) % 3)


def test_editing_npz_data_reruns_prepare_and_downstream(tmp_path):
    """The file of an npz: source is an input of prepare: after the data change, a dry run
    plans prepare (reason: the file) and the training that reads it."""
    _write_npz(tmp_path / "mine.npz", seed=0)
    cfg = str(_user_data_config(tmp_path, "npz:mine.npz"))
    config = yaml.safe_load(Path(cfg).read_text())
    validate(config, SCHEMA)
    run = f"results/runs/tiny/{next(iter(expand_studies(config)['tiny']))}/train.json"
    where = ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
             "--configfile", cfg]
    proc = snakemake("data/prepared/mine.pt", *where)  # a real prepare: 90 tiny images
    assert proc.returncode == 0, out(proc)[-3000:]
    # stand-ins for the run's outputs, marked up to date (no training in this test)
    for name in ("model.pt", "init.pt", "train.json"):
        (tmp_path / run).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / run).with_name(name).write_text("{}")
    assert snakemake(run, "--touch", *where).returncode == 0
    proc = snakemake(run, "-n", *where)
    assert "Nothing to be done" in out(proc), out(proc)[-3000:]
    _write_npz(tmp_path / "mine.npz", seed=1)  # the user edits the data
    proc = snakemake(run, "-n", *where)
    jobs = job_counts(out(proc))
    assert jobs == {"prepare": 1, "train": 1}, out(proc)[-3000:]
    assert "reason: Updated input files: mine.npz" in out(proc)
    assert "reason: Input files updated by another job: data/prepared/mine.pt" in out(proc)
    (tmp_path / "mine.npz").unlink()
    proc = snakemake(run, "-n", *where)
    assert proc.returncode != 0
    assert "config key 'datasets.mine.source': 'npz:mine.npz': no file mine.npz" in out(proc)


def test_editing_a_data_folder_rewrites_its_manifest(tmp_path):
    """A folder: source is read through data/manifests/<dataset>.json (every file with size
    and mtime), an input of prepare that is rewritten when a file changes."""
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            (tmp_path / "imgs" / split / cls / "0.png").write_bytes(b"not read here")
    cfg = str(_user_data_config(tmp_path, "folder:imgs"))
    where = ["-s", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "1",
             "--configfile", cfg]
    proc = snakemake("data/prepared/mine.pt", "-n", *where)
    assert job_counts(out(proc)) == {"folder_manifest": 1, "prepare": 1}, out(proc)[-3000:]
    assert "input: data/manifests/mine.json" in out(proc)
    manifest = tmp_path / "data/manifests/mine.json"
    assert snakemake(str(manifest.relative_to(tmp_path)), *where).returncode == 0
    import json

    listed = json.loads(manifest.read_text())
    assert [f["path"] for f in listed["files"]] == [
        "test/a/0.png", "test/b/0.png", "train/a/0.png", "train/b/0.png"]
    assert {f["size"] for f in listed["files"]} == {len(b"not read here")}
    proc = snakemake("data/manifests/mine.json", "-n", *where)
    assert "Nothing to be done" in out(proc), out(proc)[-3000:]
    (tmp_path / "imgs/train/b/1.png").write_bytes(b"a new image")
    proc = snakemake("data/manifests/mine.json", "-n", *where)
    assert job_counts(out(proc)) == {"folder_manifest": 1}, out(proc)[-3000:]
    assert "Params have changed since last execution" in out(proc)


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


def test_measure_run_exact_measures_see_the_whole_split(tmp_path):
    """The measure job on a tiny net and 300 digits: the exact measures (whole_split) equal
    the closed form on all 300 training images, a costly baseline sees the n_samples
    subsample, a per-measure max_samples wins over both, and measures.json says who saw
    how many."""
    import json

    import torch

    from convflat.curvature import exact_curvature
    from convflat.data import load_prepared, prepare
    from convflat.models import build_model, save_checkpoint
    from convflat.pipeline.measure import measure_run, measure_sizes

    data = prepare("sklearn-digits", root=tmp_path, out=tmp_path / "d.pt", subset=300,
                   download=False)
    torch.manual_seed(0)
    spec = {"family": "gapcnn", "width": 4, "depth": 2, "batchnorm": False,
            "in_channels": 1, "num_classes": 10, "image_size": [8, 8]}
    model, init = build_model(spec), build_model(spec)
    save_checkpoint(tmp_path / "model.pt", model)
    save_checkpoint(tmp_path / "init.pt", init)
    (tmp_path / "train.json").write_text(json.dumps({"status": "ok"}))
    schema = yaml.safe_load(Path(SCHEMA).read_text())
    measure = schema["properties"]["studies"]["additionalProperties"]["properties"]["measure"]
    cfg = {"names": ["conv_trace", "conv_relative_flatness", "classifier_trace",
                     "hutchinson_trace", "frobenius_norm"],
           "params": {"hutchinson_trace": {"probes": 2, "groups": 1},
                      "classifier_trace": {"max_samples": 50}},
           "n_samples": 64, "batch_size": 128, "seed": 0,
           "whole_split": measure["properties"]["whole_split"]["default"]}
    assert set(cfg["whole_split"]) == {"conv_trace", "conv_relative_flatness",
                                       "classifier_trace", "classifier_relative_flatness"}
    sizes = measure_sizes(cfg, cfg["names"])
    assert sizes["conv_trace"] == {"max_samples": None}
    assert sizes["hutchinson_trace"] == {"probes": 2, "groups": 1, "max_samples": 64}
    assert sizes["classifier_trace"] == {"max_samples": 50}
    assert "frobenius_norm" not in sizes  # reads no data
    assert cfg["params"]["hutchinson_trace"] == {"probes": 2, "groups": 1}  # not mutated
    out = measure_run(tmp_path / "model.pt", tmp_path / "init.pt", tmp_path / "train.json",
                      data, tmp_path / "measures.json", cfg, device="cpu")
    assert out["status"] == "ok" and not out["failed"], out
    assert out["n_samples"] == 300
    assert out["n_samples_by_measure"] == {
        "conv_trace": 300, "conv_relative_flatness": 300, "classifier_trace": 50,
        "hutchinson_trace": 64, "frobenius_norm": None}
    x, y = load_prepared(data).tensors("train")
    assert x.shape[0] == 300
    whole = exact_curvature(model, (x, y), device="cpu")
    values = out["values"]
    assert values["conv_trace"] == pytest.approx(whole.trace, rel=1e-6)
    assert values["conv_relative_flatness"] == pytest.approx(whole.relative_flatness, rel=1e-6)
    first64 = exact_curvature(model, (x[:64], y[:64]), device="cpu")
    assert values["conv_trace"] != pytest.approx(first64.trace, rel=1e-3)
    assert values["classifier_trace"] != pytest.approx(whole.classifier_trace, rel=1e-3)
    assert out["measures"]["hutchinson_trace"]["params"]["max_samples"] == 64


def test_invariance_table_has_a_batchnorm_case():
    """The invariance table on a net without BatchNorm (the filter rescaling) and on an
    extra run with BatchNorm (filters with the running statistics): the conv trace changes
    and the relative flatness does not in both, and each row names its model and rescaling.
    The quick config asks for such a BN case (validation.invariance.extra_runs)."""
    import torch

    from convflat.models import build_model
    from convflat.pipeline.validation import TrainedRun

    torch.manual_seed(0)
    x, y = torch.randn(48, 1, 8, 8), torch.arange(48) % 3

    def run(bn, path):
        spec = {"family": "gapcnn", "in_channels": 1, "num_classes": 3, "image_size": [8, 8],
                "width": 4, "depth": 2, "batchnorm": bn}
        net = build_model(spec).eval()
        if bn:  # running statistics that are not the identity
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        return TrainedRun(net, build_model(spec), (x, y), path)

    main = run(False, "wd/plain")
    main.also = [run(True, "digits/bn")]
    cfg = {"seed": 0, "batch_size": 48, "n_samples": 48,
           "invariance": {"names": ["conv_trace", "conv_relative_flatness", "frobenius_norm"],
                          "params": {}, "extra_runs": ["digits"]}}
    df = VALIDATION_TABLES["invariance"].build(cfg, "cpu", main)
    assert list(df["model"]) == ["wd/plain"] * 3 + ["digits/bn"] * 3
    assert list(df["rescaling"]) == ["filters"] * 3 + ["batchnorm"] * 3
    for model in ("wd/plain", "digits/bn"):
        rows = df[df["model"] == model].set_index("measure")
        assert rows.loc["conv_trace", "relative_change"] > 1e-2
        assert rows.loc["conv_relative_flatness", "relative_change"] < 1e-5
        assert rows["agrees"].tolist() == [True, True, True], rows
    quick = load_config("config/quick.yaml")
    extra = quick["validation"]["invariance"]["extra_runs"]
    from convflat.study import validation_extra_runs

    (bn_run,) = validation_extra_runs(quick, expand_studies(quick))
    assert extra == ["digits"] and bn_run.spec["batchnorm"] is True
    sm = mock_snakemake("validation_model", configfile=REPO / "config/quick.yaml",
                        snakefile=REPO / "Snakefile", table="invariance")
    assert sm.input.also_model == [f"results/runs/{bn_run.path}/model.pt"]
    assert sm.input.also_data == [f"data/prepared/{bn_run.prepared}.pt"]


def _sweep(error_slope: float):
    """A false-friend sweep: 4 weight decays x 3 seeds; test error moves with weight decay
    by ``error_slope`` per step, the Hessian trace falls and the relative flatness rises
    with weight decay (small seed noise); the largest weight decay trains 10x longer."""
    import pandas as pd

    rows = []
    for step, wd in enumerate((0.0, 0.001, 0.01, 0.03)):
        for seed in (0, 1, 2):
            rows.append({"run_id": f"wd~{wd}/seed~{seed}", "status": "ok", "converged": True,
                         "hp_weight_decay": wd, "hp_seed": seed,
                         "test_error": 0.05 + error_slope * step + 0.002 * seed,
                         "epochs_run": (300 if step == 3 else 15) + seed,
                         "m_hutchinson_trace": 100.0 / (1 + step) + seed,
                         "m_conv_trace": 10.0 / (1 + step),
                         "m_conv_relative_flatness": 1.0 + step + 0.01 * seed})
    return pd.DataFrame(rows)


def test_false_friend_caption_says_what_the_data_show():
    """The caption is computed with its uncertainty: the test-error difference between the
    ends of the sweep with a Welch interval (scipy), the epochs confound, and for each
    curvature measure its difference and whether it calls the better-generalizing nets
    sharper; a difference within seed noise is said to be so."""
    from scipy.stats import ttest_ind

    from convflat.analysis.figures import false_friend_caption

    up = _sweep(+0.01)
    text = false_friend_caption(up)
    hi, lo = up["test_error"][9:].to_numpy(), up["test_error"][:3].to_numpy()
    ci = ttest_ind(hi, lo, equal_var=False).confidence_interval(0.95)
    assert text.startswith(
        f"Weight decay 0.03 raises the test error: 8.2 % (3 runs) against 5.2 % at 0 (3 runs), "
        f"a difference of +3.0 points (95% CI [{100 * ci.low:+.1f}, {100 * ci.high:+.1f}], "
        "Welch t interval across seeds)."), text
    assert ("Training length is confounded with weight decay: the nets at 0.03 trained 300-302 "
            "epochs (median 301), those at 0 15-17 (median 16), so the effect is of "
            "weight decay and of longer training together") in text
    # the trace falls with weight decay: the better nets (weight decay 0) are sharper
    assert "Hessian trace of the whole network (Hutchinson) goes from 101 to 26" in text
    assert text.count("calls the better-generalizing nets sharper") == 1
    # the relative flatness rises with weight decay: the better nets are flatter
    assert "relative flatness goes from 1.01 to 4.01" in text
    assert "it calls the better-generalizing nets flatter" in text
    # the conv trace has no seed spread: its interval is undefined, so no verdict
    assert "last conv layer goes from 10 to 2.5 (difference -7.5, no spread across seeds, no " \
           "interval): no change beyond seed noise" in text
    assert "12 runs used, 0 excluded" in text
    down = false_friend_caption(_sweep(-0.01))
    assert down.startswith("Weight decay 0.03 lowers the test error: 2.2 %")
    assert down.count("calls the better-generalizing nets sharper") == 1  # relative flatness
    flat = _sweep(0.0)
    flat["test_error"] = [0.05, 0.06, 0.055] * 4
    noisy = false_friend_caption(flat)
    assert "does not change the test error beyond seed noise" in noisy
    assert "the sweep cannot separate the effect from seed noise" in noisy
    # the registry caption no longer asserts a direction; the report includes the computed one
    assert "improves" not in FIGURES["false_friend"].caption
    rst = (REPO / "workflow/report/figure.rst").read_text()
    assert ".. include:: {{ snakemake.output.png[:-4] }}.caption.rst" in rst


def test_html_hides_the_code_and_the_overview_answers_first(tmp_path):
    """render_html leaves out the code of parameters / hide-input cells (their output
    stays) and remove-cell cells entirely; the overview template opens with the computed
    answer (headline), then the figures, then the tables, and shows no code in HTML."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

    from convflat.pipeline.report import render_html

    def cell(src, text, tags):
        return new_code_cell(src, metadata={"tags": tags}, outputs=[
            new_output("stream", name="stdout", text=text)])

    nb = new_notebook(cells=[
        new_markdown_cell("# Title"),
        cell("secret_parameter = 1", "", ["parameters"]),
        cell("hidden_helper_code()", "VISIBLE-OUTPUT\n", ["hide-input"]),
        cell("removed_entirely()", "REMOVED-OUTPUT\n", ["remove-cell"]),
        cell("shown_code()", "SHOWN-OUTPUT\n", []),
    ])
    nbformat.write(nb, tmp_path / "nb.ipynb")
    render_html(tmp_path / "nb.ipynb", tmp_path / "nb.html")
    html = (tmp_path / "nb.html").read_text()
    assert "VISIBLE-OUTPUT" in html and "SHOWN-OUTPUT" in html and "shown_code" in html
    for gone in ("secret_parameter", "hidden_helper_code", "removed_entirely",
                 "REMOVED-OUTPUT"):
        assert gone not in html, gone

    overview = nbformat.read(REPO / "notebooks/overview.ipynb", as_version=4)
    code = [c for c in overview.cells if c.cell_type == "code"]
    assert code[0].metadata["tags"] == ["parameters"]
    assert all("hide-input" in c.metadata.get("tags", []) for c in code[1:])
    order = [i for i, c in enumerate(overview.cells) if c.cell_type == "code"]
    first = {key: next(i for i in order if key in overview.cells[i].source)
             for key in ("headline_markdown", "FIGURES.items()", "correlation_markdown",
                         "runs_summary_table", "def demo_zoo")}
    assert (first["headline_markdown"] < first["FIGURES.items()"]
            < first["correlation_markdown"] < first["runs_summary_table"]), first
    # the only cell with visible output before the answer is the setup (which prints only
    # when it trains the demonstration zoo instead of reading the study's tables)
    assert "print(f\"convflat" not in overview.cells[first["def demo_zoo"]].source
    assert "false_friend_caption(runs" in overview.cells[first["FIGURES.items()"]].source


# -------------------------------------------------------------------- convflat.pipeline


def test_what_the_snakemake_process_imports_loads_no_torch():
    """common.smk's imports from the pipeline (registry, notices, the data and train stage
    modules) and the compatibility module convflat.workflow load neither torch nor pandas;
    the script plumbing loads no Snakemake either."""
    code = ("import sys; import convflat.pipeline.registry, convflat.pipeline.notices, "
            "convflat.pipeline.data, convflat.pipeline.train, convflat.pipeline.script, "
            "convflat.workflow; "
            "bad = sorted({'torch', 'pandas', 'snakemake'} & set(sys.modules)); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = (REPO / "src/convflat/workflow.py").read_text().splitlines()
    assert len(lines) < 40


def test_stages_mirror_the_rule_files():
    """Each stage of the registry is one rule file defining exactly its rules, and one job
    module; every rule of the workflow but `all` belongs to one stage."""
    import importlib.util

    files = {p.stem for p in (REPO / "workflow/rules").glob("*.smk")} - {"common"}
    assert set(STAGES) == files
    included = re.findall(r"^include: \"workflow/rules/(\w+)\.smk\"",
                          (REPO / "Snakefile").read_text(), re.M)
    assert included == ["common", *STAGES]  # the Snakefile includes them in stage order
    for stage in STAGES.values():
        text = (REPO / stage.rule_file).read_text()
        assert tuple(re.findall(r"^rule (\w+):", text, re.M)) == stage.rules, stage.name
        assert importlib.util.find_spec(stage.module) is not None, stage.module
    assert not re.findall(r"^rule (\w+):", (REPO / "workflow/rules/common.smk").read_text(),
                          re.M)


def test_unusable_reason_per_row():
    """One row at a time, with strings (csv) or typed values (pandas records)."""
    from convflat.pipeline.notices import unusable_reason

    ok = {"status": "ok", "converged": True, "error": None}
    assert unusable_reason(ok, require_converged=True) is None
    assert unusable_reason({**ok, "converged": "True"}, require_converged=True) is None
    assert unusable_reason({**ok, "converged": "1.0"}, require_converged=True) is None
    stalled = {"status": "ok", "converged": "False", "stop_reason": "max_epochs",
               "epochs_run": "7"}
    assert unusable_reason(stalled, require_converged=False) is None
    assert (unusable_reason(stalled, require_converged=True)
            == "not converged (stop reason max_epochs, 7 epochs)")
    assert (unusable_reason({"status": "diverged", "error": "nan loss"}, require_converged=False)
            == "status=diverged: nan loss")
    for empty in ("", "nan", None, float("nan")):
        assert (unusable_reason({"status": "failed", "error": empty}, require_converged=False)
                == "status=failed")
    assert unusable_reason({}, require_converged=False) == "status=<missing>"


def _runs_csv(path: Path, run_ids: list[str]) -> Path:
    import pandas as pd

    rows = [{"run_id": r, "study": "s", "status": "ok", "converged": True,
             "hp_width": 4 * (k + 1), "hp_seed": 0, "test_error": 0.1} for k, r in
            enumerate(run_ids)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_flatness_figure_reads_histories_of_the_usable_runs(tmp_path, monkeypatch):
    """The flatness_over_training figure passes the history of every run that trained
    (labelled by run id, coloured by the varying axis) and leaves out failed runs and
    empty histories; the stopping target is the runs' common stop_loss."""
    import json

    import convflat.analysis

    ids = ["width~4/seed~0", "width~8/seed~0", "width~12/seed~0"]
    history = [{"epoch": 1, "loss": 0.5, "conv_trace": 2.0, "conv_relative_flatness": 3.0}]
    records = [{"status": "ok", "history": history, "config": {"stop_loss": 0.01}},
               {"status": "failed", "history": [], "error": "boom"},
               {"status": "ok", "history": [], "config": {"stop_loss": 0.01}}]
    paths = []
    for run_id, rec in zip(ids, records, strict=True):
        path = tmp_path / "results/runs/s" / run_id / "train.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(rec))
        paths.append(str(path))
    seen = {}

    def fake_plot(histories, out, **kwargs):
        seen.update(histories=histories, **kwargs)
        return []

    monkeypatch.setattr(convflat.analysis, "plot_flatness_over_training", fake_plot)
    inputs = {"runs": str(_runs_csv(tmp_path / "runs.csv", ids)), "records": paths}
    FIGURES["flatness_over_training"].draw(inputs, tmp_path / "fig", {})
    assert seen == {"histories": {ids[0]: history}, "hue": {ids[0]: 4}, "hue_name": "width",
                    "stop_loss": 0.01}
    inputs["records"] = [str(tmp_path / "other/width~4/seed~0/x/train.json")]
    Path(inputs["records"][0]).parent.mkdir(parents=True)
    Path(inputs["records"][0]).write_text(json.dumps(records[0]))
    with pytest.raises(ValueError, match="is not the record of a run of"):
        FIGURES["flatness_over_training"].draw(inputs, tmp_path / "fig", {})


def test_the_figure_job_writes_the_caption_of_its_figure(tmp_path):
    """draw_figure writes a computed caption (false_friend: what the runs show) or the
    fixed one; the report shows the computed file for exactly the figures that have one."""
    from convflat.analysis.figures import false_friend_caption
    from convflat.pipeline.analysis import draw_figure

    runs = _sweep(+0.01)
    csv = tmp_path / "runs.csv"
    runs.to_csv(csv, index=False)
    analysis = {"targets": ["test_error"], "require_converged": True}
    paths = draw_figure("false_friend", {"runs": str(csv)}, tmp_path / "ff", analysis,
                        caption=tmp_path / "ff.caption.rst")
    assert [p.name for p in paths] == ["ff.png", "ff.pdf"]
    assert (tmp_path / "ff.caption.rst").read_text() == false_friend_caption(runs) + "\n"
    draw_figure("measure_vs_gap", {"runs": str(csv)}, tmp_path / "mg", analysis,
                caption=tmp_path / "mg.caption.rst")
    assert (tmp_path / "mg.caption.rst").read_text() == FIGURES["measure_vs_gap"].caption + "\n"
    assert [n for n, f in FIGURES.items() if f.computed_caption] == ["false_friend"]
    rst = (REPO / "workflow/report/figure.rst").read_text()
    assert "{% if snakemake.params.computed_caption %}" in rst and "false_friend" not in rst


# ---------------------------------------------------------------------- partial studies


def test_the_figure_job_fails_like_the_correlation_job_without_a_usable_run(tmp_path,
                                                                             capfd):
    """A study whose runs all stopped short of their loss target: the study figure job,
    which may run before the correlation job, ends with the same one-line-per-run message
    (exit 1, no traceback) and draws nothing; with require_converged off it draws."""
    import importlib.util
    import types

    import pandas as pd

    runs = _sweep(+0.01)
    runs["converged"] = False
    runs["stop_reason"] = "max_epochs"
    runs["epochs_run"] = 40
    csv = tmp_path / "runs.csv"
    runs.to_csv(csv, index=False)
    spec = importlib.util.spec_from_file_location("figure_script",
                                                  REPO / "workflow/scripts/figure.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def job(require_converged):
        params = {"figure": "measure_vs_gap", "version": "v",
                  "analysis": {"targets": ["test_error"],
                               "require_converged": require_converged}}
        return types.SimpleNamespace(
            input={"runs": str(csv)}, output={"png": str(tmp_path / "mg.png")},
            params=types.SimpleNamespace(**params, get=params.get),
            log=[str(tmp_path / "figure.log")], threads=1, rule="figure",
            wildcards={"study": "tiny", "figure": "measure_vs_gap"})

    class Output(dict):  # the figure job reads output.png and output.get("caption")
        __getattr__ = dict.__getitem__

    sm = job(True)
    sm.input, sm.output = Output(sm.input), Output(sm.output)
    with pytest.raises(SystemExit) as exit_:
        script.main(sm)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    assert exit_.value.code == 1
    err = capfd.readouterr().err
    first = runs["run_id"].iloc[0]
    assert err.startswith(f"tiny: no usable run ({len(runs)} run(s), none with status ok and "
                          "converged), so there is nothing to correlate.")
    assert f"  {first}: not converged (stop reason max_epochs, 40 epochs)" in err
    assert "Traceback" not in err and not (tmp_path / "mg.png").exists()
    sm = job(False)
    sm.input, sm.output = Output(sm.input), Output(sm.output)
    script.main(sm)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    assert (tmp_path / "mg.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(csv)) == len(runs)


def test_rendering_a_notebook_prints_no_tcp_warning(tmp_path, capfd):
    """run_notebook starts its kernel over IPC sockets: the kernel's "running over TCP
    without encryption" warning (three times per notebook before) is not printed, and
    the notebook still runs with its parameters."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    from convflat.pipeline.report import run_notebook

    nb = new_notebook(cells=[new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                             new_code_cell("print(x * 2)")],
                      metadata={"kernelspec": {"name": "python3", "language": "python",
                                               "display_name": "Python 3"}})
    nbformat.write(nb, tmp_path / "t.ipynb")
    run_notebook(tmp_path / "t.ipynb", tmp_path / "out.ipynb", {"x": 21}, timeout=120)
    captured = capfd.readouterr()
    assert "without encryption" not in captured.out + captured.err
    done = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert done.cells[-1].outputs[0]["text"] == "42\n"


def test_report_landing_summary_says_each_verdict_and_what_is_missing(tmp_path):
    """The landing page's data: a study's verdict is the first paragraph of its headline;
    a study without one says why (no usable run, with the count; or no runs table); the
    missing list is exactly the targets that do not exist."""
    from convflat.pipeline.report import building_a_report, landing_summary

    done = tmp_path / "a/headline.md"
    done.parent.mkdir()
    done.write_text("# a\n\n**Supported.** conv_trace ranks the loss gap\nbest (tau 0.61).\n\n"
                    "## loss gap\n\n| table |\n")
    runs_b = tmp_path / "b/runs.csv"
    runs_b.parent.mkdir()
    runs_b.write_text("run_id,study,status,converged,stop_reason,epochs_run\n"
                      "w~4,b,ok,False,max_epochs,3\nw~8,b,failed,False,,\n")
    targets = [done, runs_b, tmp_path / "a/figure.png", tmp_path / "b/headline.md"]
    got = landing_summary(
        {"a": {"headline": done, "runs": tmp_path / "a/runs.csv"},
         "b": {"headline": tmp_path / "b/headline.md", "runs": runs_b},
         "c": {"headline": tmp_path / "c/headline.md", "runs": tmp_path / "c/runs.csv"}},
        targets, require_converged=True)
    assert got["verdicts"][0] == {
        "study": "a", "text": "**Supported.** conv_trace ranks the loss gap best (tau 0.61)."}
    assert got["verdicts"][1] == {
        "study": "b", "text": "no result: no usable run (2 run(s), none with status ok and "
                              f"converged); see {runs_b}"}
    assert got["verdicts"][2]["text"].startswith("no result yet: its runs table")
    assert got["missing"] == sorted([str(tmp_path / "a/figure.png"),
                                     str(tmp_path / "b/headline.md")])
    assert building_a_report(["snakemake", "--report", "r.html"])
    assert building_a_report(["snakemake", "--report=r.html"])
    assert not building_a_report(["snakemake", "--cores", "2", "--report-after-run",
                                  "--report", "r.html"])  # the run makes the files first
    wf = (REPO / "workflow/report/workflow.rst").read_text()
    assert wf.index("landing.verdicts") < wf.index("**convflat**")  # the answer first


def test_validation_notebook_opens_with_its_answer():
    """validation_answer: the worst relative error over every architecture and quantity
    (a hand-made table: the maximum is known), and whether each invariance held; the
    template shows it before any table."""
    import nbformat

    from convflat.pipeline.report import validation_answer

    exact = [{"architecture": "relu", "rel_err_trace": 1e-15, "rel_err_blocks": 4e-14,
              "rel_err_kappa": 2e-16},
             {"architecture": "silu+bn", "rel_err_trace": 3e-13, "rel_err_blocks": 5e-15,
              "rel_err_kappa": float("nan")}]
    held = [{"measure": "conv_trace", "theory": "changes", "changed": "True",
             "agrees": "True"},
            {"measure": "conv_relative_flatness", "theory": "invariant", "changed": "False",
             "agrees": "True"},
            {"measure": "sharpness", "theory": "nearly invariant", "changed": "True",
             "agrees": float("nan")}]
    text = validation_answer(exact, held)
    assert ("worst relative error of **3e-13** (trace, silu+bn) over 2 architecture(s); "
            "per quantity: trace 3e-13, block traces 4e-14, relative flatness 2e-16.") in text
    assert "1 architecture(s) have no error value" in text
    assert "**Invariance: every check held**: all 2 measure(s)" in text
    assert "1 row(s) are not judged" in text
    broken = [*held, {"measure": "frobenius_norm", "theory": "invariant", "changed": True,
                      "agrees": False, "model": "tiny/w~4"}]
    text = validation_answer(exact, broken)
    assert ("**Invariance: 1 of 3 check(s) did not hold**: frobenius_norm (tiny/w~4): "
            "theory invariant, changed True.") in text
    nb = nbformat.read(REPO / "notebooks/validation.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata["tags"] == ["parameters"]
    answer = next(i for i, c in enumerate(nb.cells) if "validation_answer(" in c.source)
    first_table = next(i for i, c in enumerate(nb.cells) if c.source.startswith("## 1."))
    assert answer < first_table
    # nothing before the answer prints (the kernel line moved to the end)
    assert all("print(" not in c.source for c in nb.cells[:answer])
