"""The benches compose: one timing protocol (bench/timing.py), one set of oracles
(bench/oracles.py), ``bench gpu`` timing through ``bench curvature`` and ``bench train`` and
calling the time estimate. Each piece is checked against an independent computation."""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import validate

from convflat import study
from convflat.bench import curvature, gpu, oracles, timing
from convflat.bench import train as bench_train
from convflat.bench.gpu import estimate
from convflat.curvature import exact_curvature, find_head
from convflat.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def test_interleaved_runs_in_turn_and_ratios_are_per_repeat_medians(monkeypatch):
    """Calls go a, b, a, b, ...; each time is the clock around its own call; the ratio is the
    median of the per-repeat ratios, not the ratio of the medians."""
    clock = iter([0.0, 1.0, 1.0, 3.0, 3.0, 5.0, 5.0, 7.0, 7.0, 11.0, 11.0, 13.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    calls = []
    times = timing.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                               CPU, 3)
    assert calls == ["a", "b"] * 3
    assert times == {"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}
    assert timing.median_ratio(times, "b", "a") == 1.0  # ratios 2, 1, 0.5
    assert statistics.median(times["b"]) / statistics.median(times["a"]) == 1.0
    assert timing.median_ratio({"a": [1, 2, 4], "b": [1, 1, 8]}, "b", "a") == 1.0
    assert timing.medians(times) == {"a": 2.0, "b": 2.0}


def test_timed_returns_the_median_and_the_last_result(monkeypatch):
    clock = iter([0.0, 3.0, 3.0, 4.0, 4.0, 6.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    results = iter(["first", "second", "third"])
    assert timing.timed(lambda: next(results), CPU, 3) == (2.0, "third")


def _tiny():
    torch.manual_seed(0)
    spec = {"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 3, "num_classes": 3,
            "image_size": [8, 8]}
    model = build_model(spec).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 8, 8, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, list(zip(x.split(6), y.split(6), strict=True))


def test_hutchinson_oracle_is_unbiased_and_its_bookkeeping_adds_up():
    """The mean of 300 Rademacher probes lies within 4 standard errors of the exact trace
    from the dense float64 Hessian of the kernel (autograd); the probes for 1% follow from
    the reported sd; the caller's random state is untouched."""
    from convflat import reference

    model, batches = _tiny()
    head = find_head(model)
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    H = reference.autograd_kernel_hessian(model.double(), head.conv_name, x, y)
    exact = float(torch.diagonal(H).sum())
    model.float()
    before = torch.random.get_rng_state()
    h = oracles.hutchinson_to_1pct(model, head.conv.weight, batches, exact, CPU,
                                   max_probes=300, max_seconds=math.inf)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert h["probes_run"] == 300
    assert abs(h["mean"] - exact) <= 4 * h["sd"] / math.sqrt(300)
    assert h["stderr_rel"] == pytest.approx(h["sd"] / math.sqrt(300) / abs(exact))
    assert h["probes_1pct"] == math.ceil((h["sd"] / (0.01 * abs(exact))) ** 2)
    assert h["seconds"] == pytest.approx(h["probes_1pct"] * h["per_probe_s"])
    # at least min_probes even with no time at all; one probe has no sd and no count
    assert oracles.hutchinson_to_1pct(model, head.conv.weight, batches, exact, CPU,
                                      max_probes=50, max_seconds=0.0,
                                      min_probes=2)["probes_run"] == 2
    one = oracles.hutchinson_to_1pct(model, head.conv.weight, batches, exact, CPU,
                                     max_probes=1, max_seconds=math.inf)
    assert one["probes_1pct"] is None and one["seconds"] == one["per_probe_s"]


def test_backpack_oracle_cut_short_extrapolates_and_gives_no_trace():
    model, batches = _tiny()
    head = find_head(model)
    per_sample = oracles.backpack_bytes_per_sample(head, 3)
    d = oracles.backpack_ggn_trace(model, head, batches, CPU, max_bytes=4 * per_sample,
                                   max_seconds=0.0)
    assert (d["samples_run"], d["n"], d["sub_batch"], d["trace"]) == (4, 12, 4, None)
    full = oracles.backpack_ggn_trace(model, head, batches, CPU, max_bytes=4 * per_sample)
    assert full["samples_run"] == 12
    assert full["trace"] == pytest.approx(exact_curvature(model, batches, device="cpu").trace,
                                          rel=1e-5)


@pytest.fixture
def spy_time_exact(monkeypatch):
    """Record every call of bench curvature's timing protocol (and its result)."""
    seen = []
    original = curvature.time_exact

    def spy(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(curvature, "time_exact", spy)
    return seen


def test_gpu_cost_rows_and_bench_curvature_come_from_the_same_protocol(tmp_path, spy_time_exact):
    """``bench gpu``'s cost check and ``bench curvature`` both time through
    ``bench curvature``'s time_exact, and what each prints is what that call measured."""
    out = tmp_path / "gpu.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert gpu.main(["--device", "cpu", "--only", "cost", "--out", str(out)]) == 0
    assert len(spy_time_exact) == 1
    cost = spy_time_exact[0]
    rows = {r["id"]: r for r in json.loads(out.read_text())["rows"]}
    ba, b32a = rows["cost/gapcnn-w8/b_over_a"]["data"], rows["cost/gapcnn-w8/b32_over_a"]["data"]
    assert ba["ratio"] == statistics.median(
        b / a for a, b in zip(cost.times["forward"], cost.times["exact"], strict=True))
    assert b32a["ratio"] == cost.ratio("exact32")
    assert ba["seconds"] == {"a": statistics.median(cost.times["forward"]),
                             "b": statistics.median(cost.times["exact"]),
                             "b32": statistics.median(cost.times["exact32"])}
    assert rows["cost/gapcnn-w8/c_over_b"]["data"]["ratio"] == pytest.approx(
        rows["cost/gapcnn-w8/c_over_b"]["data"]["seconds"] / ba["seconds"]["b"])

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert curvature.main(["--models", "gapcnn-w16-d3", "--n", "8", "--batch-size", "4",
                               "--size", "16", "--repeats", "2", "--max-probes", "2",
                               "--no-backpack"]) == 0
    assert len(spy_time_exact) == 2
    cost = spy_time_exact[1]
    assert all(len(v) == 2 for v in cost.times.values())
    row = next(line for line in buf.getvalue().splitlines() if line.startswith("| gapcnn"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == f"{cost.ratio('exact'):.2f}" and cells[6] == f"{cost.ratio('exact32'):.2f}"
    assert cells[4] == f"{statistics.median(cost.times['exact']):.3f} s"


def test_gpu_throughput_and_bench_train_share_the_training_protocol(tmp_path, monkeypatch):
    """``bench gpu``'s throughput row and ``bench train`` (its dataloader row) both time
    through bench train's time_training; the row's images/s are steps x batch / median."""
    seen = []
    original = bench_train.time_training

    def spy(runs, device, **kw):
        times = original(runs, device, **kw)
        seen.append((sorted(runs), kw, times))
        return times

    monkeypatch.setattr(bench_train, "time_training", spy)
    out = tmp_path / "gpu.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gpu.main(["--device", "cpu", "--only", "train", "--out", str(out)])
    rows = {r["id"]: r for r in json.loads(out.read_text())["rows"]}
    (variants, kw, times), (pipes, kw2, times2) = seen
    assert variants == ["fp32", "fp32+cl"] and kw["data"] is False
    assert pipes == ["loader/tensor/w0", "resident"] and kw2.get("data", True)
    thr = rows["train/gapcnn-w8/throughput"]["data"]
    n_img = kw["steps"] * thr["batch"]
    assert thr["images_per_s"] == {k: n_img / statistics.median(v) for k, v in times.items()}
    loader = rows["train/gapcnn-w8/dataloader"]["data"]["rows"]
    resident = next(r for r in loader if r["pipeline"] == "resident")
    assert resident["train_images_per_s"] == kw2["steps"] * thr["batch"] / statistics.median(
        times2["resident"])
    assert resident["data_images_per_s"] == kw2["steps"] * thr["batch"] / statistics.median(
        times2["resident@data"])


def test_time_training_runs_each_stream_round_robin():
    """Per repeat and run: warm-up steps, timed steps, then batches alone, in that order."""
    log = []

    def stream(key):
        while True:
            log.append(("batch", key))
            yield torch.zeros(1), torch.zeros(1)

    runs = {k: (stream(k), lambda x, y, k=k: log.append(("step", k))) for k in ("p", "q")}
    times = bench_train.time_training(runs, CPU, repeats=2, warmup=1, steps=2)
    assert set(times) == {"p", "p@data", "q", "q@data"}
    assert all(len(v) == 2 for v in times.values())
    one_run = [("batch", "p"), ("step", "p")] * 3 + [("batch", "p")] * 2
    assert log[:8] == one_run
    assert log[8:16] == [(w, "q") for w, _ in one_run]
    assert len(log) == 2 * 2 * 8


def _job_config(subset: int = 512) -> dict:
    return {"datasets": {"d": {"source": "npz:/nowhere/synthetic.npz", "subset": subset}},
            "studies": {"s": {"dataset": "d", "model": {"family": "gapcnn", "width": 8},
                              "grid": {"seed": [0]}, "train": {"epochs": 2}}}}


def test_gpu_estimate_is_the_study_estimate_per_run():
    """The one-job row's modelled seconds are convflat.study.estimate_hours on the same
    config (validated here independently), per run, in seconds: no text in between."""
    raw = _job_config()
    config = yaml.safe_load(yaml.safe_dump(raw))
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    for kind in ("cpu", "gpu"):
        hours, n = study.estimate_hours(config, kind)
        seconds, why = estimate.modelled_seconds(REPO, raw, kind)
        assert n == 1 and why == ""
        assert seconds == pytest.approx(hours * 3600.0)
    assert raw == _job_config()  # the caller's config is not filled in
    two = _job_config()
    two["studies"]["s"]["grid"]["seed"] = [0, 1]
    assert estimate.modelled_seconds(REPO, two, "cpu")[0] == pytest.approx(
        estimate.modelled_seconds(REPO, raw, "cpu")[0])
    assert estimate.forward_flops({"family": "gapcnn", "width": 8}, 32) == 2 * study.forward_macs(
        {"family": "gapcnn", "width": 8}, (32, 32), 3, 10)


def test_gpu_estimate_of_a_bad_config_names_the_problem():
    bad = _job_config()
    bad["studies"]["s"]["train"]["epochs"] = "many"
    seconds, why = estimate.modelled_seconds(REPO, bad, "cpu")
    assert seconds is None and why.startswith("n/a: the estimate failed")
    assert "studies.s.train.epochs" in why and "many" in why
