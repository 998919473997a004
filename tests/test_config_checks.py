"""Config mistakes the schema cannot see, caught when the config loads (convflat.study
check_config: model specs, heads, measures, sources), and what a run says about studies
whose runs failed (convflat.workflow: the end-of-run notice, the analysis rule's refusal).
"""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml
from snakemake.utils import validate

from convflat import study
from convflat.study import ConfigError
from convflat.workflow import failed_runs_notice, no_usable_runs_message

REPO = Path(__file__).resolve().parents[1]
SCHEMA = str(REPO / "workflow/schemas/config.schema.yaml")


def load(name: str) -> dict:
    config = yaml.safe_load((REPO / "config" / name).read_text())
    validate(config, SCHEMA)
    return config


@pytest.mark.parametrize("name", ["config.yaml", "quick.yaml", "test.yaml"])
def test_the_repository_configs_pass(name):
    study.check_config(load(name))


def _torchvision(arch):
    def mutate(c):
        c["studies"]["tiny"]["model"] = {"family": "torchvision", "arch": arch}
        c["studies"]["tiny"]["grid"] = {"weight_decay": [0.0, 0.01]}
    return mutate


def _set(path, value):
    def mutate(c):
        node = c
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set(["studies", "tiny", "model", "widht"], 16),
         "config key 'studies.tiny.model.widht': unknown model option 'widht' of family "
         "gapcnn"),
        (_set(["studies", "tiny", "model", "batchnorm"], "yes"),
         "config key 'studies.tiny.model.batchnorm': spec key 'batchnorm' must be true or "
         "false, got 'yes'"),
        (_set(["studies", "tiny", "model", "activation"], "tanh"),
         "config key 'studies.tiny.model.activation': spec key 'activation' must be one of"),
        (_set(["studies", "tiny", "model", "in_channels"], 3),
         "config key 'studies.tiny.model.in_channels': 3, but source 'sklearn-digits' has 1"),
        (_torchvision("vgg11"),
         "config key 'studies.tiny.model.arch': vgg11 is outside the measurable class: conv "
         "layer 'features.18' is not in the class measured exactly: MaxPool2d"),
        (_torchvision("squeezenet1_0"),
         "config key 'studies.tiny.model.arch': squeezenet1_0 is outside the measurable class"),
        (_torchvision("vgg1100"),
         "config key 'studies.tiny.model.arch': spec key 'arch': 'vgg1100' is not a "
         "torchvision classification model"),
        (_set(["studies", "tiny", "measure", "names"],
              ["conv_trace", "frobenius_norm", "hutchinson_trace", "foo"]),
         "config key 'studies.tiny.measure.names[3]': unknown measure 'foo'"),
        (_set(["studies", "tiny", "measure", "params"], {"hutchinson_trace": {"probs": 4}}),
         "config key 'studies.tiny.measure.params.hutchinson_trace.probs': unknown parameter "
         "'probs' of measure 'hutchinson_trace' (it accepts"),
        (_set(["studies", "tiny", "measure", "params"], {"pacbayes_flatness": {}}),
         "config key 'studies.tiny.measure.params.pacbayes_flatness': parameters for measure "
         "'pacbayes_flatness', which studies.tiny.measure.names does not compute"),
        (_set(["studies", "tiny", "measure", "params"], {"hutchinson_trace": {"max_samples": 0}}),
         "config key 'studies.tiny.measure.params.hutchinson_trace.max_samples': measure "
         "'hutchinson_trace': max_samples must be a positive integer, got 0"),
        (_set(["validation", "cost", "names"], ["conv_trace", "bar"]),
         "config key 'validation.cost.names[1]': unknown measure 'bar'"),
        (_set(["datasets", "digits", "source"], "cifar11"),
         "config key 'datasets.digits.source': 'cifar11' is not a known source"),
    ],
)
def test_config_mistakes_name_the_key(mutate, message):
    """The checks on their own: the mistake is made after the schema has validated the
    config (the schema catches some of them first, e.g. a batchnorm that is no boolean)."""
    config = load("test.yaml")
    mutate(config)
    with pytest.raises(ConfigError) as err:
        study.check_config(config)
    assert message in str(err.value)


PROBES = "studies.tiny.measure.params.hutchinson_trace.probes"


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (_set(["studies", "tiny", "measure", "params", "hutchinson_trace", "probes"], 0),
         PROBES, "probes must be a positive integer, got 0"),
        (_set(["studies", "tiny", "measure", "params", "hutchinson_trace", "probes"], -4),
         PROBES, "probes must be a positive integer, got -4"),
        (_set(["studies", "tiny", "measure", "params", "hutchinson_trace", "probes"], "many"),
         PROBES, "probes must be a positive integer, got 'many'"),
        (_set(["studies", "tiny", "measure", "params", "hutchinson_trace", "probes"], 2.5),
         PROBES, "probes must be a positive integer, got 2.5"),
        (_set(["studies", "tiny", "measure", "params", "hutchinson_trace", "distribution"],
              "uniform"),
         "studies.tiny.measure.params.hutchinson_trace.distribution",
         "distribution must be one of ('rademacher', 'normal'), got 'uniform'"),
        (_set(["validation", "cost", "params"], {"frobenius_norm": {"fold_bn": "yes"}}),
         "validation.cost.params.frobenius_norm.fold_bn",
         "fold_bn must be true or false, got 'yes'"),
        (_set(["studies", "tiny", "grid", "subset"], [64, 5]),
         "studies.tiny.grid.subset[1]", "5 training images are fewer than the 10 classes"),
        (_set(["datasets", "digits", "subset"], 9),
         "datasets.digits.subset", "9 training images are fewer than the 10 classes"),
        (_set(["datasets", "digits", "subset"], 5000),
         "datasets.digits.subset", "5000 training images, but the training split of "
                                   "sklearn-digits has 1438"),
        (_set(["studies", "tiny", "model", "dropout"], 1.5),
         "studies.tiny.model.dropout", "spec key 'dropout' must be a number in [0, 1), got 1.5"),
        (_set(["studies", "tiny", "model", "max_downsample"], -1),
         "studies.tiny.model.max_downsample", "must be a non-negative integer, got -1"),
    ],
)
def test_values_are_checked_at_load_naming_the_key(mutate, key, message):
    """A parameter value, a data size or a spec value that the run would refuse (or, for
    a measure parameter, record as a failed measure in every run) fails the check, and the
    key travels with the exception (``err.key``), not only in its text."""
    config = load("test.yaml")
    mutate(config)  # after the schema (which catches some of these first)
    with pytest.raises(ConfigError) as err:
        study.check_config(config)
    assert err.value.key == key
    assert f"config key '{key}': " in str(err.value)
    assert message in str(err.value)


def test_a_model_value_of_the_wrong_type_names_its_key():
    """``model.dropout: "high"``: the schema names the key; so does the check on its own
    (which used to name only the model block)."""
    from snakemake.exceptions import WorkflowError

    config = load("test.yaml")
    config["studies"]["tiny"]["model"]["dropout"] = "high"
    with pytest.raises(WorkflowError) as err:
        validate(config, SCHEMA)
    assert "On instance['studies']['tiny']['model']['dropout']" in str(err.value)
    with pytest.raises(ConfigError) as err:
        study.check_config(config)
    assert err.value.key == "studies.tiny.model.dropout"
    assert "must be a number in [0, 1), got 'high'" in str(err.value)
    config["studies"]["tiny"]["model"]["dropout"] = 0.0
    config["studies"]["tiny"]["grid"]["dropout"] = [0.0, 1.0]
    with pytest.raises(ConfigError) as err:
        study.check_config(config)
    assert err.value.key == "studies.tiny.grid.dropout"


def test_the_subset_bound_is_the_prepared_training_split(tmp_path):
    """The largest subset the check lets through is the training split that
    data.prepare makes (1438 of the 1797 digits at the default test share, 899 at 0.5)."""
    from convflat.data import load_prepared, prepare

    def n_train(fraction):
        path = prepare("sklearn-digits", root=tmp_path, test_fraction=fraction)
        return load_prepared(path).x_train.shape[0]

    config = load("test.yaml")
    for fraction in (0.2, 0.5):
        n = n_train(fraction)
        config["datasets"]["digits"].update(subset=n, test_fraction=fraction)
        study.check_data(config)
        config["datasets"]["digits"]["subset"] = n + 1
        with pytest.raises(ConfigError, match=f"training split of sklearn-digits has {n}$"):
            study.check_data(config)
    config["datasets"]["digits"]["subset"] = None
    config["studies"]["tiny"]["grid"]["subset"] = [n_train(0.2)]  # more than 0.5 leaves
    with pytest.raises(ConfigError) as err:
        study.check_config(config)
    assert err.value.key == "studies.tiny.grid.subset[0]"


def test_a_cuda_device_needs_cuda_here(monkeypatch):
    import torch

    config = load("test.yaml")
    config["device"] = "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match="'device': 'cuda', but this machine has no CUDA") \
            as err:
        study.check_config(config)
    assert err.value.key == "device"
    study.check_config(config, device_here=False)  # the jobs run elsewhere (SLURM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    study.check_config(config)
    config["device"] = "cuda:1"
    with pytest.raises(ConfigError, match="'cuda:1', but this machine has 1 CUDA device "):
        study.check_config(config)


REPO_SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.mark.parametrize(
    ("path", "value", "key"),
    [
        (["studies", "tiny", "measure", "params", "hutchinson_trace", "probes"], 0, PROBES),
        (["studies", "tiny", "grid", "subset"], [5], "studies.tiny.grid.subset[0]"),
        (["studies", "tiny", "model", "dropout"], "high", "studies.tiny.model.dropout"),
    ],
)
def test_the_dry_run_fails_naming_the_key(tmp_path, path, value, key):
    config = yaml.safe_load((REPO / "config/test.yaml").read_text())
    _set(path, value)(config)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    proc = subprocess.run([*REPO_SNAKEMAKE, "-n", "--cores", "1", "--configfile", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"config key '{key}': " in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_a_wrong_grid_value_names_the_grid_axis():
    config = load("test.yaml")
    config["studies"]["tiny"]["model"]["activation"] = "gelu"
    config["studies"]["tiny"]["grid"]["depth"] = [2, 3]
    study.check_config(config)  # fine: every spec builds
    config["studies"]["tiny"]["model"] = {"family": "resnet"}
    config["studies"]["tiny"].update(grid={"depth": [20, 21]}, false_friend=False)
    with pytest.raises(ConfigError, match="config key 'studies.tiny.grid.depth': "):
        study.check_config(config)


def test_user_data_sources_are_checked_with_stand_in_facts():
    """npz:/folder: data are not read when the config loads; the spec is still built."""
    config = load("test.yaml")
    config["datasets"]["digits"]["source"] = "npz:/nowhere/mine.npz"
    study.check_config(config)
    config["studies"]["tiny"]["model"]["depht"] = 3
    with pytest.raises(ConfigError, match="'studies.tiny.model.depht': unknown model option"):
        study.check_config(config)


def test_heads_are_traced_once_per_structure():
    """Specs that differ only in widths, classes or the dropout probability share one
    trace; a different depth is another structure."""
    config = load("test.yaml")
    config["studies"]["tiny"].update(grid={"width": [3, 5, 7, 9], "dropout": [0.1, 0.3]},
                                     false_friend=False)
    study._SPEC_CHECKS.clear()
    study.check_config(config)
    assert len(study._SPEC_CHECKS) == 1
    config["studies"]["tiny"]["grid"]["depth"] = [2, 3]
    study.check_config(config)
    assert len(study._SPEC_CHECKS) == 2


def test_check_config_imports_torch_only_when_it_runs():
    code = ("import sys, yaml; from snakemake.utils import validate; "
            "import convflat.study as s; assert 'torch' not in sys.modules; "
            f"c = yaml.safe_load(open({str(REPO / 'config/test.yaml')!r})); "
            f"validate(c, {SCHEMA!r}); s.check_config(c, deep=False); "
            "assert 'torch' not in sys.modules; s.check_config(c); "
            "assert 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------- failed runs


def _rows(*specs):
    """runs.csv rows: (run_id, status, converged, error)."""
    return [{"run_id": r, "study": "s", "status": st, "converged": conv, "error": err,
             "stop_reason": "max_epochs", "epochs_run": 3} for r, st, conv, err in specs]


def _write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_no_usable_runs_lists_why_per_run():
    rows = _rows(("wd~0", "failed", False, "ValueError: spec key 'widht'"),
                 ("wd~0.1", "diverged", False, "non-finite loss at epoch 2"),
                 ("wd~1", "ok", False, None))
    text = no_usable_runs_message(rows, "s", require_converged=True)
    assert text.startswith("s: no usable run (3 run(s), none with status ok and converged)")
    assert "  wd~0: status=failed: ValueError: spec key 'widht'" in text
    assert "  wd~0.1: status=diverged: non-finite loss at epoch 2" in text
    assert "  wd~1: not converged (stop reason max_epochs, 3 epochs)" in text
    assert no_usable_runs_message(rows, "s", require_converged=False) is None
    rows[2]["converged"] = True
    assert no_usable_runs_message(rows, "s", require_converged=True) is None


def test_failed_runs_notice_names_the_studies(tmp_path):
    good = _write_csv(tmp_path / "a/runs.csv", _rows(("x~1", "ok", True, ""),
                                                     ("x~2", "ok", True, "")))
    some = _write_csv(tmp_path / "b/runs.csv", _rows(("x~1", "ok", True, ""),
                                                     ("x~2", "failed", False, "boom")))
    every = _write_csv(tmp_path / "c/runs.csv", _rows(("x~1", "failed", False, "bad spec"),
                                                      ("x~2", "failed", False, "bad spec")))
    assert failed_runs_notice({"a": good, "missing": tmp_path / "none.csv"}) is None
    text = failed_runs_notice({"a": good, "b": some, "c": every})
    assert "study a" not in text
    assert f"study b: 1 of 2 runs not usable (status=failed: 1); see {some}" in text
    assert "    x~2: status=failed: boom" in text
    assert "study c: 2 of 2 runs not usable (status=failed: 2)" in text
    assert "no run is usable: this study has no result" in text


def test_failed_runs_notice_names_not_converged_and_diverged_runs(tmp_path):
    """The end-of-run notice counts every reason convflat.usable gives, not-converged runs
    included: left out with analysis.require_converged, named on their own line without."""
    rows = _rows(("x~1", "ok", True, ""), ("x~2", "ok", False, ""), ("x~3", "ok", False, ""),
                 ("x~4", "failed", False, "boom"))
    for row in rows:
        row.update(train_loss=0.5, initial_loss=2.3)
    rows[2].update(train_loss=7e18)  # above its initial loss: diverged, whatever converged says
    path = _write_csv(tmp_path / "s/runs.csv", rows)
    text = failed_runs_notice({"s": path}, require_converged=True)
    assert text.startswith("convflat: some runs are not usable (failed, diverged or not "
                           "converged)")
    assert (f"study s: 3 of 4 runs not usable (not converged: 1, diverged: 1, "
            f"status=failed: 1); see {path}") in text
    assert "    x~2: not converged (stop reason max_epochs, 3 epochs)" in text
    assert "    x~3: diverged: final training loss 7e+18 is not below the initial loss 2.3" \
        in text
    loose = failed_runs_notice({"s": path}, require_converged=False)
    assert "study s: 2 of 4 runs not usable (diverged: 1, status=failed: 1)" in loose
    assert ("study s: 1 of 4 runs did not converge (used all the same: "
            "analysis.require_converged is false)") in loose
    assert "    x~2: not converged" in loose
    # a study whose every run is usable but one did not converge is named too
    only = _write_csv(tmp_path / "t/runs.csv", rows[:2])
    assert failed_runs_notice({"t": only}, require_converged=True).count("x~2: not conv") == 1
    assert failed_runs_notice({"t": _write_csv(tmp_path / "u/runs.csv", rows[:1])}) is None


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "workflow/scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_correlation_job_fails_without_a_usable_run(tmp_path, capfd):
    """The analysis rule's script exits 1 with every run's status and error on the console
    (not a traceback about an empty table)."""
    import pandas as pd

    rows = _rows(("width~4", "failed", False, "ValueError: spec key 'widht' is not a "
                                               "gapcnn option"),
                 ("width~8", "failed", False, "ValueError: spec key 'widht' is not a "
                                              "gapcnn option"))
    for row in rows:
        row.update({"hp_width": int(row["run_id"][-1]), "loss_gap": None, "acc_gap": None,
                    "test_error": None, "m_conv_trace": None})
    runs = tmp_path / "runs.csv"
    pd.DataFrame(rows).to_csv(runs, index=False)
    params = {"analysis": {"targets": ["loss_gap"], "n_boot": 10, "seed": 0,
                           "require_converged": False}, "title": "tiny", "version": "v"}
    sm = types.SimpleNamespace(
        input=types.SimpleNamespace(runs=str(runs)),
        output=types.SimpleNamespace(csv=str(tmp_path / "correlation.csv")),
        params=types.SimpleNamespace(**params, get=params.get), log=[str(tmp_path / "log")],
        threads=1, rule="correlation", wildcards={"study": "tiny"})
    with pytest.raises(SystemExit) as exit_:
        _load_script("correlation").main(sm)
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    assert exit_.value.code == 1
    err = capfd.readouterr().err
    assert "tiny: no usable run (2 run(s), none with status ok)" in err
    assert "width~8: status=failed: ValueError: spec key 'widht'" in err
    assert not (tmp_path / "correlation.csv").exists()


def test_a_run_with_failed_runs_says_so_at_the_end(tmp_path):
    """A real (not dry) Snakemake run, here of the cheap `estimate` rule, ends with the
    notice when a runs table of the working directory has failed runs."""
    _write_csv(tmp_path / "results/tables/tiny/runs.csv",
               _rows(("width~4/wd~0", "failed", False, "RuntimeError: out of memory"),
                     ("width~8/wd~0", "ok", True, "")))
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "estimate", "-s", str(REPO / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "1", "--configfile",
         str(REPO / "config/test.yaml")], capture_output=True, text=True, timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    assert "convflat: some runs are not usable" in text, text[-3000:]
    assert "study tiny: 1 of 2 runs not usable (status=failed: 1)" in text
    assert "width~4/wd~0: status=failed: RuntimeError: out of memory" in text


def test_validation_extra_runs_name_the_key():
    config = load("quick.yaml")
    runs = study.expand_studies(config)
    last = list(runs["digits_wd"])[-1]
    config["validation"]["invariance"]["extra_runs"] = [f"digits_wd/{last}", "digits"]
    got = study.validation_extra_runs(config, runs)
    first = next(iter(runs["digits"].values())).path
    assert [r.path for r in got] == [f"digits_wd/{last}", first]
    config["validation"]["invariance"]["extra_runs"] = ["digits", "nope"]
    with pytest.raises(ConfigError, match=r"'validation.invariance.extra_runs\[1\]': 'nope' is "
                                          "not one of the studies"):
        study.validation_extra_runs(config, runs)
    config["validation"]["invariance"]["extra_runs"] = ["digits/wd~9"]
    with pytest.raises(ConfigError, match=r"extra_runs\[0\]': 'wd~9' is not a run of study"):
        study.validation_extra_runs(config, runs)


def test_training_settings_between_fields_name_the_key():
    """What the schema checks field by field but TrainConfig refuses as a whole."""
    config = load("test.yaml")
    config["studies"]["tiny"]["train"]["warmup_epochs"] = 5.0  # epochs: 3
    with pytest.raises(ConfigError, match=r"config key 'studies.tiny.train.warmup_epochs': "
                                          r"TrainConfig.warmup_epochs must be in \[0, epochs\]"):
        study.check_config(config, deep=False)
    config = load("test.yaml")
    config["studies"]["tiny"]["train"].update(optimizer="adam", nesterov=True)
    with pytest.raises(ConfigError, match="'studies.tiny.train.nesterov': TrainConfig.nesterov "
                                          "needs optimizer='sgd'"):
        study.check_config(config)


def test_every_measure_parameter_declares_its_type():
    """The registry knows each parameter's type (from its Param, or its default's) and
    each default lies in its own declared range."""
    from convflat.measures import MEASURES

    for name, measure in MEASURES.items():
        for param, spec in measure.params.items():
            assert spec.kind in ("int", "float", "str", "bool"), (name, param)
            assert spec.accepts(spec.default), (name, param, spec.default)


@pytest.mark.parametrize(
    ("declared", "good", "bad", "words"),
    [
        (dict(default=6, minimum=1), [1, 6, 6.0], [0, -4, "many", 2.5, True, None],
         "a positive integer"),
        (dict(default=0.1, above=0, maximum=1), [1, 0.5, 1e-9], [0, -0.1, 1.5, "x"],
         "a number in (0, 1]"),
        (dict(default=0.0, minimum=0), [0, 3.5], [-1e-9, float("nan")], "a number >= 0"),
        (dict(default="l2", choices=("l2", "linf")), ["linf"], ["l1", 2],
         "one of ('l2', 'linf')"),
        (dict(default=True), [False], ["yes", 1], "true or false"),
        (dict(default=None, kind="int", minimum=1, nullable=True), [None, 3], [0],
         "a positive integer"),
    ],
)
def test_param_ranges(declared, good, bad, words):
    """Param.accepts and describe, value by value (the rule written out by hand)."""
    from convflat.measures.base import Param

    p = Param(**declared)
    assert all(p.accepts(v) for v in good), [v for v in good if not p.accepts(v)]
    assert not any(p.accepts(v) for v in bad), [v for v in bad if p.accepts(v)]
    assert p.describe() == words
