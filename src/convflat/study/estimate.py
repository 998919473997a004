"""How long a config takes to train and measure, and the one FLOP counter of a model.

:func:`forward_flops` counts the floating-point operations of one image's forward pass on
the model a spec builds (the time estimate here, and ``convflat bench gpu``'s cost model, use
it); :func:`estimate_hours` / :func:`estimate_text` turn them into hours. Imports torch only
when a count runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convflat.sources import find_source
from convflat.study.plan import Run, expand_studies

__all__ = ["EXACT_PASSES", "MEASURE_PASSES", "RATES", "TRACK_PASSES", "estimate_hours",
           "estimate_text", "forward_flops", "forward_macs"]

# How long a config takes: for every run, the multiply-adds of one forward pass (counted
# on the model itself, built from its spec), times 3 for a training step (forward and
# backward) and the images of all epochs, at an achieved rate; plus a fixed cost per
# optimizer step (kernel launches, Python: the floor for small nets), with stop_loss one
# evaluation pass over the training split per epoch, with track_flatness the per-epoch
# flatness (about TRACK_PASSES forward passes over its images), the measures (about
# MEASURE_PASSES forward passes over the subsample: Lanczos, Hutchinson, the PAC-Bayes
# search and sharpness steps dominate; EXACT_PASSES over the whole split for the measures
# of measure.whole_split), and the start-up of two jobs. A run with stop_loss is assumed to
# train for its whole epoch cap, so the estimate is an upper bound for such studies.
# docs/workflow.md gives the reasoning behind the rates; `snakemake --cores 1 estimate`
# prints the result.

MEASURE_PASSES = 1000
EXACT_PASSES = 15
TRACK_PASSES = 3
#: Achieved rates: "gpu" is one H100-class GPU (bf16 autocast, eager PyTorch), "cpu" a 2-core
#: x86 CPU in fp32. docs/benchmarks.md has the measurements they come from.
RATES = {
    "gpu": {"flops": 25e12, "step_seconds": 0.003, "job_seconds": 15.0},
    "cpu": {"flops": 2.0e10, "step_seconds": 0.003, "job_seconds": 5.0},
}
_OTHER_SOURCE = (50000, (32, 32), 3, 10)  # npz: and folder: data, size unknown here


def forward_macs(spec: Mapping[str, Any], image_hw: tuple[int, int], in_channels: int,
                 num_classes: int) -> float:
    """Multiply-adds of one image's forward pass, from forward hooks on the built model
    (imports torch)."""
    import torch

    from convflat.models import build_model

    spec = {**spec, "in_channels": in_channels, "num_classes": num_classes}
    if spec["family"] in ("gapcnn", "resnet"):
        spec["image_size"] = list(image_hw)
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            k = module.weight[0].numel()  # C_in / groups x kh x kw
            macs.append(output.numel() * k)
        elif isinstance(module, torch.nn.Linear):
            macs.append(output.numel() * module.in_features)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one tiny forward pass; the meta device is slower here
    try:
        with torch.no_grad():
            model = build_model(spec).eval()
            for m in model.modules():
                if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                    m.register_forward_hook(hook)
            model(torch.zeros(1, in_channels, *image_hw))
    finally:
        torch.set_num_threads(threads)
    return float(sum(macs))


def forward_flops(spec: Mapping[str, Any], image_hw: tuple[int, int], in_channels: int,
                  num_classes: int) -> float:
    """Floating-point operations of one image's forward pass (2 per multiply-add of
    :func:`forward_macs`: the convolutions and linear layers; what torch's
    ``FlopCounterMode`` counts). The one FLOP counter of convflat: the time estimate and
    ``convflat bench gpu`` use it (imports torch)."""
    return 2 * forward_macs(spec, image_hw, in_channels, num_classes)


_FLOPS_CACHE: dict[str, float] = {}  # spec and data shape -> forward FLOPs per image


def estimate_hours(config: Mapping[str, Any], device: str,
                   runs: Mapping[str, Mapping[str, Run]] | None = None) -> tuple[float, int]:
    """(hours, number of runs) of training and measuring every run of a validated config
    at the rates :data:`RATES` ``[device]`` ("gpu" or "cpu"). ``runs``: the expansion, when
    the caller has it already."""
    rate = RATES[device]
    runs = expand_studies(config) if runs is None else runs
    seconds, n_runs = 0.0, 0
    for name, study in config["studies"].items():
        ds = config["datasets"][study["dataset"]]
        source = find_source(ds["source"])
        n_full, image_hw, channels, classes = _OTHER_SOURCE if source is None else (
            source.n_images, source.image_size, source.channels, source.classes)
        measure = study["measure"]
        exact = set(measure["whole_split"])
        for record in runs[name].values():
            n_split = n_full  # the training split, then a subset of it
            if source is not None and source.split == "random":
                n_split = round(n_full * (1 - ds["test_fraction"]))
            subset = record.data.get("subset") or ds["subset"]
            n_train = min(subset, n_split) if subset else n_split
            spec, train = record.spec, record.train
            key = repr(sorted(spec.items())) + repr((image_hw, channels, classes))
            if key not in _FLOPS_CACHE:
                _FLOPS_CACHE[key] = forward_flops(spec, image_hw, channels, classes)
            flops = _FLOPS_CACHE[key]
            epochs = train.get("epochs", 30)  # with stop_loss, the cap: an upper bound
            images = epochs * n_train
            steps = images / train.get("batch_size", 128)
            passes = 3 * images
            if train.get("stop_loss") is not None:
                passes += images  # the evaluation pass of the stopping rule
            if train.get("track_flatness", 1024):
                passes += epochs * TRACK_PASSES * min(train.get("track_flatness", 1024), n_train)
            n_measure = min(measure["n_samples"] or n_train, n_train)
            passes += MEASURE_PASSES * n_measure + EXACT_PASSES * n_train * bool(exact)
            seconds += flops * passes / rate["flops"] + steps * rate["step_seconds"]
            seconds += 2 * rate["job_seconds"]
            n_runs += 1
    return seconds / 3600.0, n_runs


def estimate_text(config: Mapping[str, Any],
                  runs: Mapping[str, Mapping[str, Run]] | None = None) -> str:
    """One sentence: the number of runs and the hours on a GPU and on a 2-core CPU."""
    runs = expand_studies(config) if runs is None else runs
    gpu_h, n = estimate_hours(config, "gpu", runs)
    cpu_h, _ = estimate_hours(config, "cpu", runs)
    return (
        f"{n} runs to train and measure: about {gpu_h:.1f} h on one H100-class GPU, "
        f"about {cpu_h:.0f} h on a 2-core CPU (the analysis, validation and notebooks "
        "add minutes)"
    )
