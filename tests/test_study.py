"""convflat.study: the run plan of a config, checked directly (no Snakemake run).

The expected plans are written out by hand from the configs (the grid's product in its
order, last axis fastest), not recomputed with the module's own expansion.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from convflat import study
from convflat.study import ConfigError

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def load(name: str) -> dict:
    """A config of the repository, validated with the schema's defaults filled in, as the
    workflow sees it."""
    config = yaml.safe_load((REPO / "config" / name).read_text())
    validate(config, SCHEMA)
    return config


def test_importing_study_imports_no_torch():
    code = ("import sys, convflat.study, convflat.sources, convflat.workflow; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert 'pandas' not in sys.modules, 'pandas imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_quick_study_plan():
    config = load("quick.yaml")
    runs = study.expand_studies(config)
    digits = runs["digits"]
    assert len(digits) == 2 * 2 * 2 * 2 * 2
    ids = list(digits)
    assert ids[:3] == ["n~300/noise~0/width~8/depth~3/seed~0",
                       "n~300/noise~0/width~8/depth~3/seed~1",
                       "n~300/noise~0/width~8/depth~4/seed~0"]
    assert ids[-1] == "n~1437/noise~0.2/width~16/depth~4/seed~1"
    run = digits["n~300/noise~0.2/width~16/depth~3/seed~1"]
    assert run.hp == {"subset": 300, "label_noise": 0.2, "width": 16, "depth": 3, "seed": 1}
    assert run.spec == {"family": "gapcnn", "batchnorm": True, "width": 16, "depth": 3}
    assert run.train["seed"] == 1 and run.train["schedule"] == "constant"
    assert run.train["epochs"] == 300 and run.train["stop_loss"] == 0.01
    assert "subset" not in run.train and "label_noise" not in run.train
    assert run.prepared == "digits-n300-noise0.2" and run.path == f"digits/{run.run_id}"
    assert run.data == {"label_noise": 0.2, "subset": 300}
    wd = runs["digits_wd"]
    assert list(wd) == [f"n~300/wd~{w}/seed~{s}" for w in ("0", "0.002", "0.004", "0.006")
                        for s in range(6)]
    assert wd["n~300/wd~0.006/seed~1"].spec == {"family": "gapcnn", "width": 16, "depth": 3,
                                                "batchnorm": False}
    assert wd["n~300/wd~0.006/seed~1"].prepared == "digits-n300"  # shared with digits
    assert study.prepared_files(config) == {
        "digits-n300": ("digits", 0.0, 300), "digits-n300-noise0.2": ("digits", 0.2, 300),
        "digits-n1437": ("digits", 0.0, 1437), "digits-n1437-noise0.2": ("digits", 0.2, 1437)}
    for name in ("digits", "digits_wd"):  # the matched-loss protocol
        train = config["studies"][name]["train"]
        assert (train["stop_loss"], train["schedule"]) == (0.01, "constant")


def test_default_config_has_131_runs_and_noise_files():
    config = load("config.yaml")
    runs = study.expand_studies(config)
    assert sum(len(r) for r in runs.values()) == 131
    names = study.prepared_files(config)
    assert names["cifar10-noise0.2"] == ("cifar10", 0.2, None)
    for name, s in config["studies"].items():  # the matched-loss protocol (Jiang et al.)
        assert (s["train"]["stop_loss"], s["train"]["epochs"], s["train"]["schedule"]) == (
            0.01, 300, "constant"), name


def tiny_config(grid: dict, **dataset) -> dict:
    config = {
        "datasets": {"d": {"source": "cifar10", **dataset}},
        "studies": {"s": {"dataset": "d", "model": {"family": "gapcnn"}, "grid": grid}},
    }
    validate(config, SCHEMA)
    return config


def test_axes_go_where_they_belong():
    config = tiny_config({"augment": [False, True], "label_noise": [0.0, 0.2],
                          "dropout": [0.5], "lr": [0.01]})
    runs = study.expand_studies(config)["s"]
    assert list(runs) == ["aug~false/noise~0/drop~0.5/lr~0.01",
                          "aug~false/noise~0.2/drop~0.5/lr~0.01",
                          "aug~true/noise~0/drop~0.5/lr~0.01",
                          "aug~true/noise~0.2/drop~0.5/lr~0.01"]
    off = runs["aug~false/noise~0.2/drop~0.5/lr~0.01"]
    on = runs["aug~true/noise~0/drop~0.5/lr~0.01"]
    assert (off.train["crop_padding"], off.train["flip"]) == (0, False)
    assert (on.train["crop_padding"], on.train["flip"]) == (None, None)
    assert off.prepared == "d-noise0.2" and on.prepared == "d"
    assert off.spec["dropout"] == 0.5 and off.train["lr"] == 0.01
    assert "label_noise" not in off.train and "label_noise" not in off.spec
    assert study.prepared_files(config) == {"d": ("d", 0.0, None),
                                            "d-noise0.2": ("d", 0.2, None)}


def test_subset_axis_prepares_one_file_per_size():
    """A subset value goes to the data (its own prepared file, named after it), never to
    the model or the training settings; with label noise, one file per combination."""
    config = tiny_config({"subset": [100, 2000], "label_noise": [0.0, 0.1], "seed": [0]},
                         label_noise=0.3, subset=500)
    runs = study.expand_studies(config)["s"]
    assert list(runs) == ["n~100/noise~0/seed~0", "n~100/noise~0.1/seed~0",
                          "n~2000/noise~0/seed~0", "n~2000/noise~0.1/seed~0"]
    r = runs["n~2000/noise~0.1/seed~0"]
    assert r.prepared == "d-n2000-noise0.1" and r.data == {"subset": 2000, "label_noise": 0.1}
    assert "subset" not in r.train and "subset" not in r.spec
    assert runs["n~100/noise~0/seed~0"].prepared == "d-n100"
    assert study.parse_run_id("n~100/noise~0/seed~0") == {
        "subset": "100", "label_noise": "0", "seed": "0"}
    # the dataset's own subset and noise (500, 0.3) are not prepared: every run overrides them
    assert study.prepared_files(config) == {
        "d-n100": ("d", 0.0, 100), "d-n100-noise0.1": ("d", 0.1, 100),
        "d-n2000": ("d", 0.0, 2000), "d-n2000-noise0.1": ("d", 0.1, 2000)}
    # without the axis the dataset's settings apply and the name carries no size
    plain = tiny_config({"seed": [0]}, subset=500)
    assert study.prepared_files(plain) == {"d": ("d", 0.0, None)}
    assert study.prepared_name("d", 0.2, 64) == "d-n64-noise0.2"
    assert study.prepared_name("d", 0.0) == "d"


def test_run_ids_format_and_parse():
    assert study.format_value(1e-4) == "0.0001" and study.format_value(True) == "true"
    assert study.format_value(3) == "3" and study.format_value(0.0) == "0"
    hp = {"width": 32, "weight_decay": 5e-4, "seed": 2}
    run_id = study.format_run_id(hp)
    assert run_id == "width~32/wd~0.0005/seed~2"
    assert study.parse_run_id(run_id) == {"width": "32", "weight_decay": "0.0005", "seed": "2"}
    import re

    assert re.fullmatch(study.RUN_ID_PATTERN, run_id)
    with pytest.raises(ValueError, match="'foo~1' is not <axis>~<value>"):
        study.parse_run_id("width~1/foo~1")
    with pytest.raises(ValueError, match="unknown grid axis 'height'"):
        study.format_run_id({"height": 3})


def test_repeated_value_is_a_config_error():
    config = tiny_config({"weight_decay": [0.001, 1e-3]})
    with pytest.raises(ConfigError, match="'studies.s.grid': gives run id 'wd~0.001' twice") \
            as err:
        study.expand_studies(config)
    assert err.value.key == "studies.s.grid"


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (lambda c: c["studies"]["s"].update(dataset="nope"), "studies.s.dataset",
         "config key 'studies.s.dataset': 'nope' is not one of datasets ['d']"),
        (lambda c: c["datasets"]["d"].update(source="imagenet"), "datasets.d.source",
         "config key 'datasets.d.source': 'imagenet' is not a known source"),
        (lambda c: c["studies"]["s"].update(false_friend=True), "studies.s.false_friend",
         "'studies.s.false_friend': true, but studies.s.grid has no 'weight_decay'"),
        (lambda c: c["validation"].update(study="t"), "validation.study",
         "config key 'validation.study': 't' is not one of the studies ['s']"),
    ],
)
def test_check_config_names_the_key(mutate, key, message):
    config = tiny_config({"seed": [0, 1]})
    study.check_config(config)
    bad = copy.deepcopy(config)
    mutate(bad)
    with pytest.raises(ConfigError) as err:
        study.check_config(bad)
    assert message in str(err.value)
    assert err.value.key == key


def test_sources_by_alias_and_user_files_pass_the_check():
    config = tiny_config({"seed": [0]}, source="CIFAR-10")
    study.check_config(config)
    config["datasets"]["d"]["source"] = "npz:/data/mine.npz"
    study.check_config(config)


def test_validation_run_default_and_explicit():
    config = load("quick.yaml")
    runs = study.expand_studies(config)
    assert study.validation_run(config, runs).path == "digits_wd/n~300/wd~0/seed~0"
    config["validation"]["run"] = "n~300/wd~0.006/seed~1"
    assert study.validation_run(config, runs).path == "digits_wd/n~300/wd~0.006/seed~1"
    config["validation"]["run"] = "wd~1/seed~0"
    with pytest.raises(ConfigError, match="'validation.run': 'wd~1/seed~0' is not a run"):
        study.validation_run(config, runs)


def test_estimate_adds_up_per_run():
    """Hours grow by the same amount for each identical run, and training time is linear in
    the epochs (the step and job costs aside)."""
    one = tiny_config({"seed": [0]}, subset=1000)
    two = tiny_config({"seed": [0, 1]}, subset=1000)
    for config in (one, two):
        config["studies"]["s"]["train"]["track_flatness"] = 0
        config["studies"]["s"]["measure"]["whole_split"] = []
    h1, n1 = study.estimate_hours(one, "cpu")
    h2, n2 = study.estimate_hours(two, "cpu")
    assert (n1, n2) == (1, 2) and h2 == pytest.approx(2 * h1)
    rate = study.RATES["cpu"]
    flops = 2 * study.forward_macs({"family": "gapcnn"}, (32, 32), 3, 10)
    expected = (3 * flops * 30 * 1000 / rate["flops"] + 30 * 1000 / 128 * rate["step_seconds"]
                + study.MEASURE_PASSES * flops * 1000 / rate["flops"] + 2 * rate["job_seconds"])
    assert h1 * 3600 == pytest.approx(expected)


def test_estimate_assumes_the_cap_and_counts_the_extra_passes():
    """With stop_loss a run is costed at its whole epoch cap plus one evaluation pass over
    the training split per epoch; the tracked flatness and the whole-split measures add
    their passes; a grid's subset sets the training-set size."""
    config = tiny_config({"subset": [1000], "seed": [0]})
    s = config["studies"]["s"]
    s["train"].update(stop_loss=0.01, epochs=300, track_flatness=200)
    s["measure"]["n_samples"] = 500
    hours, n = study.estimate_hours(config, "gpu")
    rate = study.RATES["gpu"]
    flops = 2 * study.forward_macs({"family": "gapcnn"}, (32, 32), 3, 10)
    passes = (3 + 1) * 300 * 1000 + study.TRACK_PASSES * 300 * 200 \
        + study.MEASURE_PASSES * 500 + study.EXACT_PASSES * 1000
    expected = (flops * passes / rate["flops"] + 300 * 1000 / 128 * rate["step_seconds"]
                + 2 * rate["job_seconds"])
    assert n == 1 and hours * 3600 == pytest.approx(expected)


def test_forward_macs_of_a_known_model():
    """A gapcnn's multiply-adds counted by hand from its layers' shapes."""
    import torch

    from convflat.models import build_model

    spec = {"family": "gapcnn", "width": 4, "depth": 2, "batchnorm": False,
            "in_channels": 1, "num_classes": 10, "image_size": [8, 8]}
    model = build_model(spec)
    x, by_hand = torch.zeros(1, 1, 8, 8), 0
    for m in model.modules():  # a second count, from shapes propagated by hand
        if isinstance(m, torch.nn.Conv2d):
            x = m(x)
            by_hand += x.shape[1] * x.shape[2] * x.shape[3] * m.in_channels * m.kernel_size[0] \
                * m.kernel_size[1] // m.groups
        elif isinstance(m, torch.nn.Linear):
            by_hand += m.in_features * m.out_features
    spec = {k: v for k, v in spec.items() if k not in ("in_channels", "num_classes",
                                                       "image_size")}
    assert study.forward_macs(spec, (8, 8), 1, 10) == by_hand


def test_code_version():
    import convflat

    assert study.code_version("train") == f"convflat-{convflat.__version__}/train-1"


@pytest.mark.parametrize(
    ("spec", "hw", "channels", "classes"),
    [({"family": "gapcnn", "width": 8, "depth": 3}, (8, 8), 1, 10),
     ({"family": "gapcnn", "width": 16, "depth": 5, "batchnorm": False}, (32, 32), 3, 10),
     ({"family": "resnet", "depth": 8, "width": 4, "preact": True}, (32, 32), 3, 100)],
)
def test_forward_flops_agree_with_torchs_flop_counter(spec, hw, channels, classes):
    """The one FLOP counter (the estimate's, and bench gpu's cost model) against torch's
    own FlopCounterMode on the same model: 2 flops per multiply-add of every conv and
    linear layer."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from convflat.models import build_model

    full = {**spec, "in_channels": channels, "num_classes": classes, "image_size": list(hw)}
    model = build_model(full).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, channels, *hw))
    assert study.forward_flops(spec, hw, channels, classes) == counter.get_total_flops()
