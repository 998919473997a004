"""``bench gpu``'s check ``pipeline``: the Snakemake workflow on the device, in temporary
directories, as subprocesses: the test study end to end, and one train + measure job of the
full reproduction's first CIFAR-10 study against what the estimate models for it."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from convflat.bench.gpu.common import Ctx, NotRun, Row, guarded
from convflat.bench.gpu.estimate import forward_flops, modelled_seconds
from convflat.bench.gpu.training import synthetic_uint8

PLANNED = [("pipeline/test-study", "pipeline: config/test.yaml end to end"),
           ("pipeline/one-job", "pipeline: one train + measure job of the first CIFAR-10 "
                                "study vs the estimate")]


def source_tree() -> Path:
    """The repository root (Snakefile, config/) above src/convflat, or NotRun."""
    root = Path(__file__).resolve().parents[4]
    if not (root / "Snakefile").is_file() or not (root / "config").is_dir():
        raise NotRun(f"no Snakefile and config/ at {root}: run from the source tree "
                     "(PYTHONPATH=src python -m convflat.bench gpu)")
    if importlib.util.find_spec("snakemake") is None:
        raise NotRun("snakemake is not installed")
    return root


def _snakemake(root: Path, workdir: Path, args: list[str], timeout: float
               ) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(root / "Snakefile"),
           "--directory", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _tail(text: str, n: int = 400) -> str:
    return " ".join(text.strip().splitlines()[-6:])[-n:]


def _dump_yaml(path: Path, obj: Any) -> None:
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def _run_problems(work: Path, device: str) -> tuple[int, list[str]]:
    """(runs trained, problems): every run must have trained on ``device`` and been
    measured."""
    problems = []
    records = sorted((work / "results" / "runs").glob("**/train.json"))
    for path in records:
        rec = json.loads(path.read_text())
        run = path.parent.relative_to(work / "results" / "runs")
        if rec.get("status") != "ok" or rec.get("device") != device:
            problems.append(f"{run}: train status {rec.get('status')} on {rec.get('device')}")
        meas = path.parent / "measures.json"
        if not meas.is_file() or json.loads(meas.read_text()).get("status") != "ok":
            problems.append(f"{run}: measures.json missing or not ok")
    return len(records), problems


def _test_study(ctx: Ctx) -> list[Row]:
    import yaml

    root = source_tree()
    config = yaml.safe_load((root / "config" / "test.yaml").read_text())
    config["device"] = str(ctx.device)
    cores = ctx.args.pipeline_cores or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-gpu-study-") as tmp:
        work = Path(tmp)
        _dump_yaml(work / "config.yaml", config)
        t0 = time.perf_counter()
        proc = _snakemake(root, work, ["--cores", str(cores), "--configfile",
                                       str(work / "config.yaml")], ctx.args.pipeline_timeout)
        seconds = time.perf_counter() - t0
        problems = []
        if proc.returncode != 0:
            problems.append(f"snakemake exited {proc.returncode}: "
                            f"{_tail(proc.stdout + proc.stderr)}")
        n_runs, more = _run_problems(work, str(ctx.device))
        problems += more
        if proc.returncode == 0 and n_runs == 0:
            problems.append("no run was trained")
    ok = not problems
    return [Row(PLANNED[0][0], f"pipeline: config/test.yaml end to end on {ctx.device}",
                "pass" if ok else "fail", f"{seconds:.0f} s, {n_runs} runs",
                "snakemake ok, every run trained and measured on the device",
                "; ".join(problems)[:600] if problems else f"--cores {cores}",
                {"seconds": seconds, "runs": n_runs, "returncode": proc.returncode,
                 "problems": problems, "log_tail": (proc.stdout + proc.stderr)[-4000:]})]


def _first_cifar_study(config: dict) -> tuple[str, dict]:
    for name, study in config["studies"].items():
        if config["datasets"][study["dataset"]]["source"] == "cifar10":
            return name, study
    raise NotRun("config/config.yaml has no CIFAR-10 study")


def _benchmark_seconds(work: Path, rule: str) -> float | None:
    files = sorted((work / "results" / "benchmarks" / rule).glob("**/*.tsv"))
    if not files:
        return None
    lines = files[0].read_text().splitlines()
    return float(lines[1].split("\t")[0]) if len(lines) > 1 else None


def _job_config(ctx: Ctx, root: Path, work: Path) -> tuple[str, dict]:
    """(study name, config) of one run of the first CIFAR-10 study on synthetic data written
    to ``work``."""
    import numpy as np
    import yaml

    a = ctx.args
    full = yaml.safe_load((root / "config" / "config.yaml").read_text())
    name, study = _first_cifar_study(full)
    study = copy.deepcopy(study)
    study["grid"] = {axis: [values[0]] for axis, values in study["grid"].items()}
    study["train"] = {**study.get("train", {}), "epochs": a.job_epochs}
    study["train"].setdefault("crop_padding", 4)  # CIFAR-10's default augmentation
    study["train"].setdefault("flip", True)
    study["false_friend"] = False
    if ctx.toy:
        study["measure"] = {**study.get("measure", {}), "n_samples": 64,
                            "names": ["conv_trace", "conv_relative_flatness", "frobenius_norm"]}
    x, y = synthetic_uint8(a.job_n + max(1, a.job_n // 5), 32)
    npz = work / "synthetic-cifar.npz"
    np.savez(npz, x_train=x[: a.job_n].numpy(), y_train=y[: a.job_n].numpy(),
             x_test=x[a.job_n:].numpy(), y_test=y[a.job_n:].numpy())
    return name, {
        "description": f"bench gpu: one job of {name} on synthetic CIFAR-shaped data",
        "device": str(ctx.device), "gpu": False,
        # the subset makes the estimate count these images (npz: CIFAR's 50000 else)
        "datasets": {study["dataset"]: {"source": f"npz:{npz}", "subset": a.job_n}},
        "studies": {name: study},
        "validation": {"enabled": False}, "notebooks": {"enabled": False},
    }


def _job_outcome(work: Path, name: str, proc: subprocess.CompletedProcess) -> dict[str, Any]:
    """The job's records, benchmark seconds and problems."""
    problems = []
    if proc.returncode != 0:
        problems.append(f"snakemake exited {proc.returncode}: "
                        f"{_tail(proc.stdout + proc.stderr)}")
    runs = work / "results" / "runs" / name
    rec_files = sorted(runs.glob("**/train.json"))
    meas_files = sorted(runs.glob("**/measures.json"))
    rec = json.loads(rec_files[0].read_text()) if rec_files else {}
    meas = json.loads(meas_files[0].read_text()) if meas_files else {}
    if rec.get("status") != "ok":
        problems.append(f"train status {rec.get('status')}: {rec.get('error')}")
    if meas.get("status") != "ok":
        problems.append(f"measure status {meas.get('status')}: {meas.get('error')}")
    return {"rec": rec, "problems": problems,
            "run_id": str(rec_files[0].parent.relative_to(runs)) if rec_files else None,
            "train_job_s": _benchmark_seconds(work, "train"),
            "measure_job_s": _benchmark_seconds(work, "measure")}


def _job_row(ctx: Ctx, name: str, out: dict[str, Any], modelled: tuple[float | None, str],
             log: str) -> Row:
    """The one-job row from the job's outcome and the modelled seconds."""
    a, rec, (secs, why) = ctx.args, out.pop("rec"), modelled
    t_train, t_meas, problems = out["train_job_s"], out["measure_job_s"], out["problems"]
    n_train = (rec.get("dataset") or {}).get("n_train") or a.job_n
    data: dict[str, Any] = {"study": name, "run_id": out["run_id"], "epochs": a.job_epochs,
                            "n_train": n_train, "train_job_s": t_train, "measure_job_s": t_meas,
                            "modelled_job_s": secs, "modelled_note": why,
                            "problems": problems, "log_tail": log[-4000:]}
    parts = []
    if t_train is not None and t_meas is not None:
        data["measured_job_s"] = t_train + t_meas
        parts.append(f"measured {t_train + t_meas:.0f} s (train {t_train:.0f} + measure "
                     f"{t_meas:.0f})")
    parts.append(f"modelled {secs:.0f} s" if secs is not None else f"modelled {why}")
    if secs and "measured_job_s" in data:
        data["measured_over_modelled"] = data["measured_job_s"] / secs
        parts.append(f"ratio {data['measured_over_modelled']:.2f}")
    note = f"{name} {out['run_id']}, {a.job_epochs} epoch(s) of {n_train} images"
    epochs = [h["seconds"] for h in rec.get("history", []) if h.get("seconds")]
    spec = rec.get("spec") or {}
    if epochs and spec:
        ips = n_train / statistics.median(epochs)
        flops = forward_flops({k: v for k, v in spec.items()
                               if k not in ("in_channels", "num_classes", "image_size")}, 32)
        data.update(train_images_per_s=ips, forward_flops=flops,
                    train_tflops=3 * flops * ips / 1e12)
        note += f"; training {ips:.0f} img/s = {3 * flops * ips / 1e12:.2f} TFLOP/s"
    return Row(PLANNED[1][0], PLANNED[1][1], "fail" if problems else "pass", ", ".join(parts),
               "both jobs ok; measured vs modelled reported",
               "; ".join(problems)[:600] if problems else note, data)


def _one_job(ctx: Ctx) -> list[Row]:
    root = source_tree()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-job-") as tmp:
        work = Path(tmp)
        name, config = _job_config(ctx, root, work)
        _dump_yaml(work / "config.yaml", config)
        cores = ctx.args.pipeline_cores or os.cpu_count() or 1
        proc = _snakemake(root, work, ["--cores", str(cores), "--configfile",
                                       str(work / "config.yaml"), "--until", "measure"],
                          ctx.args.pipeline_timeout)
        out = _job_outcome(work, name, proc)
        modelled = modelled_seconds(root, config, "gpu" if ctx.cuda else "cpu")
    return [_job_row(ctx, name, out, modelled, proc.stdout + proc.stderr)]


def check_pipeline(ctx: Ctx) -> list[Row]:
    """Rows ``pipeline/test-study`` and ``pipeline/one-job`` (see :mod:`convflat.bench.gpu`)."""
    rows: list[Row] = []
    guarded(rows, PLANNED[:1], lambda: _test_study(ctx))
    guarded(rows, PLANNED[1:], lambda: _one_job(ctx))
    return rows
