"""``python -m convflat.bench gpu`` at toy sizes on the CPU: every check has a row with a
status, the exactness rows pass against the dense autograd Hessian and fail against a wrong
reference, errors and out-of-memory become rows, targets are judged on CUDA only."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math

import pytest
import torch

from convflat import reference
from convflat.bench import gpu

TOY_IDS = [
    "exactness/float64", "exactness/float32",
    "cost/gapcnn-w8/b_over_a", "cost/gapcnn-w8/b32_over_a", "cost/gapcnn-w8/c_over_b",
    "cost/gapcnn-w8/d_over_b", "cost/gapcnn-w8/peak_memory",
    "train/gapcnn-w8/throughput", "train/gapcnn-w8/dataloader", "train/accuracy",
    "pipeline/test-study", "pipeline/one-job", "wall",
]


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = gpu.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """One toy run without the pipeline: (exit status, printed text, JSON, rows by id)."""
    path = tmp_path_factory.mktemp("bench") / "bench-gpu.json"
    rc, text, _ = _run(["--device", "cpu", "--skip", "pipeline", "--out", str(path)])
    doc = json.loads(path.read_text())
    return rc, text, doc, {r["id"]: r for r in doc["rows"]}


def test_every_check_has_a_row_with_a_status(toy):
    rc, text, doc, _ = toy
    assert rc == 0
    assert [r["id"] for r in doc["rows"]] == TOY_IDS
    assert doc["format"] == gpu.FORMAT and doc["toy"] is True and doc["result"] == "pass"
    assert doc["checks"] == {"exactness": True, "cost": True, "train": True, "pipeline": False}
    table = text.split("\n| id | check |")[-1]  # the summary table at the end
    for row in doc["rows"]:
        assert row["status"] in gpu.STATUSES
        assert f"| {row['id']} | {row['name']} | {row['status']} |" in table
        if row["status"] == "not run":
            assert row["reason"]


def test_exactness_rows_pass_with_real_numbers(toy):
    rows = toy[3]
    f64 = rows["exactness/float64"]
    assert f64["status"] == "pass"
    assert f64["data"]["reference"] == "autograd"
    assert len(f64["data"]["cases"]) == len(reference.architecture_suite())
    for value in f64["data"]["max_rel_diff"].values():
        assert math.isfinite(value) and 0 <= value <= 1e-10
    # float32 products differ from float64 by float32 rounding: visible, small
    f32 = rows["exactness/float32"]
    assert f32["status"] == "info"
    for value in f32["data"]["max_rel_diff"].values():
        assert 1e-10 < value < 1e-3


def test_cost_rows_print_the_figure_and_judge_nothing_on_cpu(toy):
    rows = toy[3]
    for key in ("b_over_a", "c_over_b", "d_over_b"):
        row = rows[f"cost/gapcnn-w8/{key}"]
        assert row["status"] == "info"
        assert "target judged on cuda only" in row["note"]
        assert row["data"]["ratio"] > 0
    assert rows["cost/gapcnn-w8/b32_over_a"]["data"]["trace_rel_diff"] < 1e-4
    # BackPACK ran on all the data and sums the same Gauss-Newton diagonal (float32 model)
    bp = rows["cost/gapcnn-w8/d_over_b"]["data"]
    assert bp["samples_run"] == bp["n"] == 32
    assert bp["rel_diff_gauss_newton"] < 1e-5
    mem = rows["cost/gapcnn-w8/peak_memory"]
    assert mem["status"] == "not run" and "not measured on cpu" in mem["reason"]


def test_train_rows(toy):
    rows = toy[3]
    acc = rows["train/accuracy"]
    assert acc["status"] == "pass"
    assert acc["data"]["test_acc"]["cpu"] >= gpu.ACC_MIN
    thr = rows["train/gapcnn-w8/throughput"]
    assert set(thr["data"]["images_per_s"]) == {"fp32+cl", "fp32"}
    assert "amp not run" in thr["note"]
    loader = rows["train/gapcnn-w8/dataloader"]["data"]
    assert {r["pipeline"] for r in loader["rows"]} == {"resident", "loader/tensor/w0"}
    for r in ("pipeline/test-study", "pipeline/one-job"):
        assert rows[r]["status"] == "not run" and "--skip pipeline" in rows[r]["reason"]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("key", ["trace", "block_traces", "relative_flatness"])
def test_exactness_fails_against_a_wrong_reference(tmp_path, monkeypatch, key):
    true = reference.dense_measures

    def wrong(H, W):
        out = dict(true(H, W))
        out[key] = out[key] * (1 + 1e-8)  # far above 1e-10, far below float32 rounding
        return out

    monkeypatch.setattr(reference, "dense_measures", wrong)
    path = tmp_path / "out.json"
    rc, text, _ = _run(["--device", "cpu", "--only", "exactness", "--cases", "3",
                        "--out", str(path)])
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]}
    assert rc == 1
    assert rows["exactness/float64"]["status"] == "fail"
    name = {"trace": "trace", "block_traces": "blocks", "relative_flatness": "kappa"}[key]
    assert rows["exactness/float64"]["data"]["max_rel_diff"][name] > 1e-9
    assert rows["exactness/float32"]["status"] == "info"  # not compared with the reference
    assert "| exactness/float64 |" in text and "| fail |" in text


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("error, status, rc", [
    (RuntimeError("broken closed form"), "fail", 1),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "not run", 0),
])
def test_an_error_is_a_failed_row_and_out_of_memory_is_not_run(tmp_path, monkeypatch, error,
                                                              status, rc):
    import convflat.curvature

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(convflat.curvature, "exact_curvature", broken)
    path = tmp_path / "out.json"
    code, _, _ = _run(["--device", "cpu", "--only", "cost", "--out", str(path)])
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]}
    assert code == rc
    for key in ("b_over_a", "b32_over_a"):
        row = rows[f"cost/gapcnn-w8/{key}"]
        assert row["status"] == status
        assert str(error).split(".")[0] in row["note"]
    for key in ("c_over_b", "d_over_b", "peak_memory"):  # need (b): not run, said so
        assert rows[f"cost/gapcnn-w8/{key}"]["status"] == "not run"
        assert rows[f"cost/gapcnn-w8/{key}"]["reason"]


def test_targets_are_judged_on_cuda_at_full_size_only():
    args = argparse.Namespace()
    full = gpu.Ctx(torch.device("cuda"), False, args)
    assert gpu.target_row(full, "x", "x", "2.0", False, "<= 1.5").status == "fail"
    assert gpu.target_row(full, "x", "x", "1.2", True, "<= 1.5").status == "pass"
    toy = gpu.target_row(gpu.Ctx(torch.device("cuda"), True, args), "x", "x", "2", False, "")
    assert (toy.status, toy.note) == ("info", "target judged at full size only")
    cpu = gpu.target_row(gpu.Ctx(torch.device("cpu"), False, args), "x", "x", "2", False, "",
                         note="detail")
    assert (cpu.status, cpu.note) == ("info", "target judged on cuda only; detail")
    with pytest.raises(ValueError, match="status"):
        gpu.Row("x", "x", "passed")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_one_line_usage_error(tmp_path):
    path = tmp_path / "out.json"
    rc, out, err = _run(["--device", "cuda", "--out", str(path)])
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "CUDA is not available" in err
    assert not path.exists()


@pytest.mark.parametrize("argv", [["--only", "exactnes"], ["--skip", "gpu"],
                                  ["--cost-models", "resnet1000"]])
def test_usage_errors(tmp_path, argv):
    rc, _, err = _run(["--device", "cpu", "--out", str(tmp_path / "o.json"), *argv])
    assert rc == 2 and err.startswith("bench gpu: ")
    assert not (tmp_path / "o.json").exists()


@pytest.mark.slow
def test_pipeline_rows_run_the_workflow(tmp_path):
    """The test study end to end and one job of the first CIFAR-10 study, on the CPU
    (about 2.5 minutes on two cores)."""
    path = tmp_path / "out.json"
    rc, _, _ = _run(["--device", "cpu", "--only", "pipeline", "--out", str(path)])
    rows = {r["id"]: r for r in json.loads(path.read_text())["rows"]}
    assert rc == 0
    study = rows["pipeline/test-study"]
    assert study["status"] == "pass", study["note"]
    assert study["data"]["runs"] == 4  # two widths x two weight decays
    job = rows["pipeline/one-job"]
    assert job["status"] == "pass", job["note"]
    d = job["data"]
    assert d["study"] == "cifar10_gapcnn" and d["n_train"] == 512
    assert d["measured_job_s"] > 0 and d["train_images_per_s"] > 0
    assert d["modelled_job_s"] is not None and d["modelled_job_s"] > 0, d["modelled_note"]
    assert d["measured_over_modelled"] == pytest.approx(d["measured_job_s"]
                                                        / d["modelled_job_s"])
