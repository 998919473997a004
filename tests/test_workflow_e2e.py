"""One real run of the workflow, end to end, on config/test.yaml, and what it wrote.

The run happens once per module in a temporary directory (``snakemake -s <repo>/Snakefile
--directory <tmp>``): prepare, train, measure, collect, correlation, figures, the false-friend
figure, the validation tables and figure, both notebooks and their HTML, then
``snakemake --report``. The config is config/test.yaml plus one small study whose second run
cannot be built (a ResNet of depth 9 is not 6n+2), to show that a failed run is recorded
and counted while the rest of the study goes on. A separate test kills a training job
midway and checks that the rerun resumes it. About 3.5 minutes on two cores.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile")]
pytestmark = pytest.mark.slow

BROKEN = {
    "description": "Two ResNets; the second fails while training (its checkpoint cannot be "
                   "written: a directory is in the way, a stand-in for a full disk).",
    "dataset": "digits",
    "model": {"family": "resnet", "width": 4},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.05},
    "grid": {"subset": [200], "depth": [8, 14]},  # a subset axis: its own prepared file
    "measure": {"names": ["conv_trace", "conv_relative_flatness"], "n_samples": 64},
}
# An unbuildable spec (resnet depth 9) no longer reaches training: the config check refuses
# it when the config loads (tests/test_config_checks.py). A failure the config cannot foresee:
FAILING_RUN = "n~200/depth~14"


def run_snakemake(workdir: Path, *args: str, timeout: int = 900):
    proc = subprocess.run(
        [*SNAKEMAKE, "--directory", str(workdir), *args], capture_output=True, text=True,
        timeout=timeout,
    )
    return proc, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """The finished run: (working directory, config, Snakemake's output)."""
    workdir = tmp_path_factory.mktemp("workflow")
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    config["studies"]["broken"] = BROKEN
    config["analysis"]["overall"] = False
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    (workdir / "results/runs/broken" / FAILING_RUN / "checkpoint.pt").mkdir(parents=True)
    proc, text = run_snakemake(workdir, "--cores", "2", "--configfile", str(configfile))
    assert proc.returncode == 0, text[-6000:]
    report, rtext = run_snakemake(workdir, "--configfile", str(configfile),
                                  "--report", "results/report.html")
    assert report.returncode == 0, rtext[-4000:]
    return workdir, config, text


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_prepared_dataset(study):
    import torch

    workdir, config, _ = study
    data = torch.load(workdir / "data/prepared/digits.pt", weights_only=True)
    assert data["format"] == "convflat-data/1"
    assert data["x_train"].shape == (config["datasets"]["digits"]["subset"], 1, 8, 8)
    assert data["x_train"].dtype == torch.uint8
    small = torch.load(workdir / "data/prepared/digits-n200.pt", weights_only=True)
    assert small["x_train"].shape == (200, 1, 8, 8)  # the broken study's subset axis
    assert torch.equal(small["x_test"], data["x_test"])  # same split, fewer training images


def test_runs_table(study):
    workdir, config, _ = study
    spec = config["studies"]["tiny"]
    rows = read_csv(workdir / "results/tables/tiny/runs.csv")
    assert [r["run_id"] for r in rows] == [
        f"width~{w}/wd~{wd:g}" for w in spec["grid"]["width"]
        for wd in spec["grid"]["weight_decay"]]
    for row in rows:
        assert row["study"] == "tiny" and row["status"] == "ok" and row["converged"] == "True"
        assert 0.0 <= float(row["train_acc"]) <= 1.0
        assert abs(float(row["test_error"]) - (1 - float(row["test_acc"]))) < 1e-9
        assert abs(float(row["loss_gap"])
                   - (float(row["test_loss"]) - float(row["train_loss"]))) < 1e-6
        for name in spec["measure"]["names"]:
            assert float(row[f"m_{name}"]) == pytest.approx(float(row[f"m_{name}"]))  # finite
        assert float(row["m_conv_trace"]) > 0 and float(row["m_conv_relative_flatness"]) > 0
    assert {float(r["hp_width"]) for r in rows} == {4.0, 8.0}
    assert {float(r["hp_weight_decay"]) for r in rows} == {0.0, 0.01}


def test_run_artifacts(study):
    workdir, _, _ = study
    run = workdir / "results/runs/tiny/width~4/wd~0"
    assert {p.name for p in run.iterdir()} >= {"model.pt", "init.pt", "train.json",
                                                "measures.json"}
    assert not (run / "checkpoint.pt").exists()  # removed when the run finished
    record = json.loads((run / "train.json").read_text())
    assert record["status"] == "ok" and record["epochs_run"] == 3
    for key in ("convflat_version", "torch_version", "device", "seed", "seconds"):
        assert key in record
    measures = json.loads((run / "measures.json").read_text())
    assert measures["status"] == "ok" and measures["run_id"] == "width~4/wd~0"
    assert measures["n_samples"] == 512  # the training split; who saw how many:
    assert measures["n_samples_by_measure"] == {
        "conv_trace": 512, "conv_relative_flatness": 512, "classifier_trace": 512,
        "hutchinson_trace": 128, "frobenius_norm": None, "distance_from_init": None}
    history = record["history"]
    assert len(history) == 3 and all(
        e["conv_trace"] > 0 and e["conv_relative_flatness"] > 0 for e in history)
    assert set(measures["values"]) == set(
        ["conv_trace", "conv_relative_flatness", "classifier_trace", "hutchinson_trace",
         "frobenius_norm", "distance_from_init"])
    assert (workdir / "results/logs/train/tiny/width~4/wd~0.log").stat().st_size > 0
    assert (workdir / "results/benchmarks/measure/tiny/width~4/wd~0.tsv").is_file()


def test_failed_run_is_recorded_and_counted(study):
    workdir, _, _ = study
    rows = {r["run_id"]: r for r in read_csv(workdir / "results/tables/broken/runs.csv")}
    assert rows["n~200/depth~8"]["status"] == "ok"
    assert rows[FAILING_RUN]["status"] == "failed"
    assert "checkpoint.pt" in rows[FAILING_RUN]["error"]
    run = workdir / "results/runs/broken" / FAILING_RUN
    assert json.loads((run / "train.json").read_text())["status"] == "failed"
    assert json.loads((run / "measures.json").read_text())["status"] == "failed"
    corr = read_csv(workdir / "results/tables/broken/correlation.csv")
    assert {r["n_runs"] for r in corr} == {"1"} and {r["n_excluded"] for r in corr} == {"1"}
    md = (workdir / "results/tables/broken/correlation.md").read_text()
    assert "status=failed: 1" in md
    # and the end of the run says so on the console (common.smk onsuccess)
    _, _, text = study
    assert "convflat: some runs are not usable" in text
    assert "study broken: 1 of 2 runs not usable (status=failed: 1)" in text
    assert f"{FAILING_RUN}: status=failed: " in text


def test_correlation_tables(study):
    workdir, config, _ = study
    rows = read_csv(workdir / "results/tables/tiny/correlation.csv")
    assert [r["measure"] for r in rows][:2] == ["conv_trace", "conv_relative_flatness"]
    measures = {r["measure"] for r in rows if r["kind"] != "control"}
    assert measures == set(config["studies"]["tiny"]["measure"]["names"])
    # the controls: the grid axes that vary (width, weight decay) and what every run records
    controls = {r["measure"] for r in rows if r["kind"] == "control"}
    assert {"control:width", "control:weight_decay"} <= controls
    for target in ("loss_gap", "acc_gap", "test_error"):
        assert f"{target}.tau" in rows[0]
        for r in rows:
            assert -1.0 <= float(r[f"{target}.tau"]) <= 1.0
    assert "conv_trace (ours)" in (workdir / "results/tables/tiny/correlation.md").read_text()
    assert "\\toprule" in (workdir / "results/tables/tiny/correlation.tex").read_text()
    summary = read_csv(workdir / "results/tables/tiny/runs_summary.csv")
    assert len(summary) == 4
    # the headline: written by its rule, our two measures in the loss-gap table
    headline = (workdir / "results/tables/tiny/headline.md").read_text()
    assert headline.startswith("# tiny\n") and "(the `headline` rule)" in headline
    loss_gap_table = headline.split("## loss gap")[1].split("### Along")[0]
    for name in ("conv_trace", "conv_relative_flatness"):
        assert f"**{name} (ours)** |" in loss_gap_table
    # 4 runs: too few for a verdict; no stop_loss: no claim that a target was reached
    assert headline.splitlines()[2].startswith("**Insufficient evidence.** Only 4 usable run(s)")
    assert "No training-loss target" in headline
    assert "reached the training-loss target" not in headline
    assert "control:width" in loss_gap_table and "### Sign error" in headline


@pytest.mark.parametrize("figure", [
    "tiny/measure_vs_gap", "tiny/tau_psi", "tiny/psi_heatmap", "tiny/false_friend",
    "tiny/flatness_over_training", "broken/measure_vs_gap", "broken/flatness_over_training",
    "validation/hutchinson_convergence",
])
def test_figures_are_real_images(study, figure):
    workdir, _, _ = study
    png = (workdir / "results/figures" / figure).with_suffix(".png")
    pdf = png.with_suffix(".pdf")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert pdf.read_bytes()[:5] == b"%PDF-" and pdf.stat().st_size > 2_000
    caption = png.with_suffix(".caption.rst")  # a declared output of the study figures
    if figure.startswith(("tiny/", "broken/")):
        text = caption.read_text()
        assert text.strip()
        if figure.endswith("false_friend"):
            # computed from the runs: the test-error difference across the sweep's ends
            assert text.startswith("Weight decay 0.01 ") and "the test error" in text


def test_validation_tables(study):
    workdir, config, _ = study
    tables = workdir / "results/tables/validation"
    exact = read_csv(tables / "exactness.csv")
    assert [r["architecture"] for r in exact] == config["validation"]["exactness"]["cases"]
    for r in exact:
        for col in ("rel_err_trace", "rel_err_blocks", "rel_err_kappa"):
            assert float(r[col]) < 1e-8, r
    inv = {r["measure"]: r for r in read_csv(tables / "invariance.csv")}
    assert set(inv) == set(config["validation"]["invariance"]["names"])
    assert inv["conv_relative_flatness"]["agrees"] == "True"
    assert inv["conv_trace"]["changed"] == "True"
    hut = read_csv(tables / "hutchinson.csv")
    assert [int(r["probes"]) for r in hut] == config["validation"]["hutchinson"]["probes"]
    assert len({r["exact"] for r in hut}) == 1
    cost = {r["measure"] for r in read_csv(tables / "cost.csv")}
    assert cost >= {"(forward pass)", "conv_trace", "frobenius_norm"}
    for name in ("exactness", "invariance", "hutchinson", "cost"):
        assert (tables / f"{name}.md").read_text().startswith("|")


@pytest.mark.parametrize("name", ["tiny/overview", "broken/overview", "validation"])
def test_notebooks_executed(study, name):
    import nbformat

    workdir, _, _ = study
    path = workdir / "results/notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert sum(len(c.outputs) for c in code) >= 4
    injected = [c for c in code if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected, "papermill did not inject the parameters"
    if name != "validation":
        study_name = name.split("/")[0]
        assert f'study = "{study_name}"' in injected[0].source
    # The kernel was the workflow's own Python.
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert f"kernel {sys.executable}" in text or "kernel " in text
    html = path.with_suffix(".html").read_text()
    assert "data:image/png;base64" in html and len(html) > 50_000


def test_report(study):
    workdir, _, _ = study
    report = workdir / "results/report.html"
    assert report.stat().st_size > 100_000
    text = report.read_text(errors="replace")
    assert "false_friend.png" in text and "correlation.csv" in text


def test_report_after_deleting_a_notebook_lists_it(study, tmp_path):
    """`snakemake --report` on a finished run with one notebook deleted: the report is built
    from what exists, and both the console and the landing page name the missing file."""
    workdir, _, _ = study
    gone = workdir / "results/notebooks/tiny/overview.html"
    aside = tmp_path / "overview.html"
    gone.rename(aside)
    try:
        proc, text = run_snakemake(workdir, "--configfile", str(workdir / "config.yaml"),
                                   "--report", "results/partial_report.html")
    finally:
        aside.rename(gone)
    assert proc.returncode == 0, text[-4000:]
    assert "marked for report but does not exist" not in text
    assert ("convflat: 1 file(s) of the workflow do not exist and are left out of the report"
            in text) and "    results/notebooks/tiny/overview.html" in text
    html = (workdir / "results/partial_report.html").read_text(errors="replace")
    assert "Missing from this report" in html and "results/notebooks/tiny/overview.html" in html
    assert "The answer, per study" in html and "Insufficient evidence." in html
    assert "false_friend.png" in html and "validation.html" in html  # the rest is there


def test_study_without_a_converged_run_says_so_first_and_is_reported(tmp_path):
    """A study in which no run reaches its loss target (and require_converged): the first
    error on the console is the one-line-per-run "no usable run" message, whichever analysis
    job fails first; the end-of-run notice names the not-converged runs; `--report` still
    builds, its landing page saying why the study has no result."""
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    spec = config["studies"]["tiny"]
    spec["train"].update(epochs=2, stop_loss=1e-9)  # unreachable in two epochs
    spec["grid"] = {"width": [4], "weight_decay": [0.0, 0.01]}
    spec["measure"] = {"names": ["conv_trace"], "n_samples": 64}
    config["analysis"]["require_converged"] = True
    config["validation"] = {"enabled": False}
    config["notebooks"] = {"enabled": False}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    proc, text = run_snakemake(tmp_path, "--cores", "1", "--configfile", str(configfile))
    assert proc.returncode != 0, text[-4000:]
    clear = "tiny: no usable run (2 run(s), none with status ok and converged)"
    assert clear in text, text[-4000:]
    assert text.index(clear) < text.index("Error in rule"), text[-4000:]
    assert "width~4/wd~0: not converged (stop reason" in text
    assert "Traceback" not in text[:text.index("Error in rule")]
    notice = text[text.index("convflat: some runs are not usable"):]
    assert "study tiny: 2 of 2 runs not usable (not converged: 2)" in notice
    report, rtext = run_snakemake(tmp_path, "--configfile", str(configfile),
                                  "--report", "results/report.html")
    assert report.returncode == 0, rtext[-4000:]
    html = (tmp_path / "results/report.html").read_text(errors="replace")
    assert ("no result: no usable run (2 run(s), none with status ok and converged)"
            in html)
    assert "results/tables/tiny/correlation.csv" in html  # listed as missing
    assert "runs.csv" in html  # what exists is in the report


def test_killed_training_resumes(tmp_path):
    """Kill Snakemake and its job (SIGKILL, as a power loss would) midway through training;
    after `--unlock`, the rerun resumes from the run's checkpoint instead of starting again."""
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    study = config["studies"]["tiny"]
    study["train"]["epochs"] = 120
    study["grid"] = {"width": [4]}
    study["false_friend"] = False  # no weight-decay axis left to sweep
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    target = "results/runs/tiny/width~4/train.json"
    run_dir = tmp_path / "results/runs/tiny/width~4"
    args = [*SNAKEMAKE, target, "--directory", str(tmp_path), "--cores", "1",
            "--configfile", str(configfile)]
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "checkpoint.pt").exists():
            assert proc.poll() is None, (
                "Snakemake ended before training wrote a checkpoint:\n"
                + (tmp_path / "killed.log").read_text()[-3000:])
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # Snakemake and its job, at once
        proc.wait()
        log.close()
    assert (run_dir / "checkpoint.pt").exists()
    assert not (run_dir / "train.json").exists()
    # A hard kill leaves Snakemake's lock behind; its error message says to unlock.
    unlock, text = run_snakemake(tmp_path, target, "--unlock", "--configfile", str(configfile))
    assert unlock.returncode == 0, text[-3000:]
    done, text = run_snakemake(tmp_path, target, "--cores", "1", "--rerun-incomplete",
                               "--configfile", str(configfile))
    assert done.returncode == 0, text[-4000:]
    record = json.loads((run_dir / "train.json").read_text())
    assert record["status"] == "ok" and record["resumes"] == 1
    assert record["epochs_run"] == 120
    assert not (run_dir / "checkpoint.pt").exists()
