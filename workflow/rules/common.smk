# Helpers shared by the stage files. Config validation, the run grid, paths, targets.
#
# Loading imports neither convflat nor torch (only the time estimate does, when it runs), so
# a dry run is fast. The rule files hold rules only; every function lives here.

import itertools
import re
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# ---------------------------------------------------------------------------- validation

SCHEMA = "../schemas/config.schema.yaml"


def _key_path(path):
    """['studies', 'digits', 'grid', 'width', 0] -> 'studies.digits.grid.width[0]'."""
    text = ""
    for part in path:
        text += (
            f"[{part}]"
            if isinstance(part, int)
            else (f".{part}" if text else str(part))
        )
    return text or "<top level>"


def _schema_error(exc):
    """The jsonschema error inside Snakemake's WorkflowError, as one line naming the key."""
    import jsonschema

    chain = [exc.__cause__, exc.__context__, *exc.args]
    err = next((a for a in chain if isinstance(a, jsonschema.ValidationError)), None)
    if err is None:
        return str(exc)
    best = jsonschema.exceptions.best_match([err] + list(err.context or [])) or err
    return f"config key '{_key_path(best.absolute_path)}': {best.message}"


def check_config(config):
    """Validate ``config`` against the schema (filling defaults), then cross-check names.

    Every error is a WorkflowError whose first line names the offending key.
    """
    try:
        validate(config, SCHEMA)
    except WorkflowError as exc:
        raise WorkflowError(
            f"invalid config: {_schema_error(exc)}\n"
            "(every key is documented in workflow/schemas/config.schema.yaml)"
        ) from None
    for name, study in config["studies"].items():
        if study["dataset"] not in config["datasets"]:
            raise WorkflowError(
                f"invalid config: config key 'studies.{name}.dataset': "
                f"{study['dataset']!r} is not one of datasets {sorted(config['datasets'])}"
            )
        if study["false_friend"] and "weight_decay" not in study["grid"]:
            raise WorkflowError(
                f"invalid config: config key 'studies.{name}.false_friend' is true, but "
                f"studies.{name}.grid has no 'weight_decay' axis to sweep"
            )
    val = config["validation"]
    if val["enabled"]:
        if val["study"] is not None and val["study"] not in config["studies"]:
            raise WorkflowError(
                f"invalid config: config key 'validation.study': {val['study']!r} is not "
                f"one of the studies {sorted(config['studies'])}"
            )


check_config(config)

# ------------------------------------------------------------------------ code versions

# Bump a stage's number when a library change alters what that stage computes: the
# version string is in the rule's params, so Snakemake reruns exactly those jobs.
STAGE_VERSIONS = {
    "prepare": 1,
    "train": 1,
    "measure": 1,
    "analysis": 1,
    "validation": 1,
    "notebook": 1,
}


def _library_version():
    """convflat.__version__, read from the source without importing torch."""
    init = Path(workflow.basedir) / "src" / "convflat" / "__init__.py"
    if init.is_file():
        m = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', init.read_text(), re.M)
        if m:
            return m.group(1)
    from importlib.metadata import version

    return version("convflat")


CONVFLAT_VERSION = _library_version()


def code_version(stage):
    """E.g. ``convflat-0.1.0/train-1``."""
    return f"convflat-{CONVFLAT_VERSION}/{stage}-{STAGE_VERSIONS[stage]}"


# ------------------------------------------------------------------------------- the grid

# grid axis -> (where it goes, key there, abbreviation in run ids)
AXES = {
    "width": ("model", "width", "width"),
    "depth": ("model", "depth", "depth"),
    "dropout": ("model", "dropout", "drop"),
    "weight_decay": ("train", "weight_decay", "wd"),
    "lr": ("train", "lr", "lr"),
    "batch_size": ("train", "batch_size", "bs"),
    "epochs": ("train", "epochs", "ep"),
    "augment": ("train", "augment", "aug"),
    "label_noise": ("data", "label_noise", "noise"),
    "seed": ("train", "seed", "seed"),
}


RUN_ID_SEP = "/"  # one directory level per axis, as in Snakemake's Paramspace


def format_value(value):
    """A hyperparameter value as it appears in a run id: 1e-4 -> '0.0001', True -> 'true'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def prepared_name(dataset, label_noise):
    """The stem of a prepared file: ``cifar10``, or ``cifar10-noise0.2`` with label noise."""
    return dataset if not label_noise else f"{dataset}-noise{format_value(label_noise)}"


def expand_study(name, study):
    """{run_id: record} for every point of the study's grid, in grid order.

    A record holds ``hp`` (the axes' values), ``spec`` (the model spec without the data's
    channels and classes, which the train script adds), ``train`` (the training settings)
    and ``prepared`` (the stem of the prepared dataset file).
    """
    grid = study["grid"]
    axes = list(grid)
    runs = {}
    for values in itertools.product(*(grid[a] for a in axes)):
        hp = dict(zip(axes, values))
        spec = dict(study["model"])
        train = dict(study["train"])
        label_noise = config["datasets"][study["dataset"]]["label_noise"]
        for axis, value in hp.items():
            where, key, _ = AXES[axis]
            if where == "model":
                spec[key] = value
            elif axis == "augment":
                # off: no crop, no flip; on: the dataset's default augmentation
                train["crop_padding"] = None if value else 0
                train["flip"] = None if value else False
            elif where == "train":
                train[key] = value
            else:
                label_noise = value
        run_id = RUN_ID_SEP.join(f"{AXES[a][2]}~{format_value(hp[a])}" for a in axes)
        if run_id in runs:
            raise WorkflowError(
                f"invalid config: config key 'studies.{name}.grid' gives run id {run_id!r} "
                "twice (a value is repeated)"
            )
        runs[run_id] = {
            "hp": hp,
            "spec": spec,
            "train": train,
            "prepared": prepared_name(study["dataset"], label_noise),
        }
    return runs


STUDIES = config["studies"]
RUNS = {name: expand_study(name, study) for name, study in STUDIES.items()}


wildcard_constraints:
    study="|".join(re.escape(s) for s in STUDIES),
    run_id=r"[^/~]+~[^/]+(/[^/~]+~[^/]+)*",
    prepared=r"[A-Za-z0-9_.-]+",
    source=r"[a-z0-9-]+",


# prepared stem -> (dataset key, label noise)
PREPARED = {}
for _study in STUDIES.values():
    _ds = _study["dataset"]
    PREPARED[prepared_name(_ds, config["datasets"][_ds]["label_noise"])] = (
        _ds,
        config["datasets"][_ds]["label_noise"],
    )
    for _noise in _study["grid"].get("label_noise", []):
        PREPARED[prepared_name(_ds, _noise)] = (_ds, _noise)


def run_record(wildcards):
    try:
        return RUNS[wildcards.study][wildcards.run_id]
    except KeyError:
        known = list(RUNS.get(wildcards.study, {}))[:3]
        raise WorkflowError(
            f"no run {wildcards.run_id!r} in study {wildcards.study!r} "
            f"(studies: {sorted(RUNS)}; run ids look like {known})"
        ) from None


def run_files(study, name):
    """The file ``name`` (model.pt, train.json, measures.json) of every run of ``study``."""
    return [f"results/runs/{study}/{run_id}/{name}" for run_id in RUNS[study]]


def study_run_ids(study):
    return list(RUNS[study])


# ------------------------------------------------------------------------------ datasets

TORCHVISION_SOURCES = {
    "mnist",
    "fashion-mnist",
    "kmnist",
    "cifar10",
    "cifar100",
    "svhn",
}


def dataset_config(wildcards):
    """The slice of config a prepared file depends on (its dataset entry and noise)."""
    try:
        dataset, noise = PREPARED[wildcards.prepared]
    except KeyError:
        raise WorkflowError(
            f"data/prepared/{wildcards.prepared}.pt is not a dataset of this config "
            f"(known: {sorted(PREPARED)})"
        ) from None
    return {**config["datasets"][dataset], "label_noise": noise}


def prepare_input(wildcards):
    """The download marker, for torchvision sources only (the rest need no network)."""
    source = dataset_config(wildcards)["source"]
    if source in TORCHVISION_SOURCES:
        return {"download": f"data/raw/{source}/download.json"}
    return {}


def study_prepared(wildcards):
    return f"data/prepared/{run_record(wildcards)['prepared']}.pt"


def validation_study():
    val = config["validation"]
    return val["study"] or next(iter(STUDIES))


def validation_run():
    run = config["validation"]["run"]
    study = validation_study()
    if run is None:
        return next(iter(RUNS[study]))
    if run not in RUNS[study]:
        raise WorkflowError(
            f"invalid config: config key 'validation.run': {run!r} is not a run of study "
            f"{study!r} (e.g. {next(iter(RUNS[study]))!r})"
        )
    return run


def validation_slice(table):
    """The part of config['validation'] that the table ``table`` depends on."""
    val = config["validation"]
    if table == "exactness":
        return {"seed": val["seed"], "exactness": val["exactness"]}
    return {
        "model": f"{validation_study()}/{validation_run()}",
        **{k: val[k] for k in ("n_samples", "batch_size", "seed")},
        table: val[table],
    }


def validation_inputs(wildcards):
    """The trained run the invariance, Hutchinson and cost tables use, and its data."""
    study, run = validation_study(), validation_run()
    base = f"results/runs/{study}/{run}"
    return {
        "model": f"{base}/model.pt",
        "init": f"{base}/init.pt",
        "train": f"{base}/train.json",
        "data": f"data/prepared/{RUNS[study][run]['prepared']}.pt",
    }


# ---------------------------------------------------------------------------- resources


def res(stage, key):
    """config['resources'][stage][key] (schema defaults fill what the config leaves out)."""
    return config["resources"][stage][key]


def gpus(stage):
    """1 for a GPU stage when the config asks for GPUs (config key ``gpu``), else 0."""
    return 1 if config["gpu"] and stage in ("train", "measure") else 0


# ----------------------------------------------------------------------------- targets

STUDY_FIGURES = ["measure_vs_gap", "tau_psi", "psi_heatmap"]
VALIDATION_TABLES = ["exactness", "invariance", "hutchinson", "cost"]


def study_targets(study):
    out = [f"results/tables/{study}/runs.csv"]
    out += expand(
        "results/tables/{study}/{t}.{ext}",
        study=study,
        t=["correlation", "runs_summary"],
        ext=["csv", "md", "tex"],
    )
    out += expand(
        "results/figures/{study}/{f}.{ext}",
        study=study,
        f=STUDY_FIGURES,
        ext=["png", "pdf"],
    )
    if STUDIES[study]["false_friend"]:
        out += expand(
            "results/figures/{study}/false_friend.{ext}",
            study=study,
            ext=["png", "pdf"],
        )
    if config["notebooks"]["enabled"]:
        out += expand(
            "results/notebooks/{study}/overview.{ext}",
            study=study,
            ext=["ipynb", "html"],
        )
    return out


def overall_targets():
    """The pooled analysis over every study, when there are at least two."""
    if len(STUDIES) < 2 or not config["analysis"]["overall"]:
        return []
    out = expand("results/tables/overall/correlation.{ext}", ext=["csv", "md", "tex"])
    out += expand(
        "results/figures/overall/{f}.{ext}",
        f=["tau_psi", "psi_heatmap"],
        ext=["png", "pdf"],
    )
    return out


def validation_targets():
    if not config["validation"]["enabled"]:
        return []
    out = expand(
        "results/tables/validation/{t}.{ext}", t=VALIDATION_TABLES, ext=["csv", "md"]
    )
    out += expand(
        "results/figures/validation/hutchinson_convergence.{ext}", ext=["png", "pdf"]
    )
    if config["notebooks"]["enabled"]:
        out += expand("results/notebooks/validation.{ext}", ext=["ipynb", "html"])
    return out


def all_targets():
    out = []
    for study in STUDIES:
        out += study_targets(study)
    return out + overall_targets() + validation_targets()


def notebook_template(name):
    """notebooks/<name>.ipynb beside the Snakefile, relative to the working directory
    when it is below it (so paths in logs stay short)."""
    path = Path(workflow.basedir) / "notebooks" / f"{name}.ipynb"
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------- time estimate

# How long a config takes: for every run, the multiply-adds of one forward pass (counted
# on the model itself, built from its spec), times 3 for a training step (forward and
# backward) and the images of all epochs, at an achieved rate; plus a fixed cost per
# optimizer step (kernel launches, Python: the floor for small nets), the measures (about
# MEASURE_PASSES forward passes over the measured images: Lanczos, Hutchinson, the PAC-Bayes
# search and sharpness steps dominate), and the start-up of two jobs. docs/workflow.md gives
# the reasoning behind the rates; `snakemake --cores 1 estimate` prints the result.

# source -> (training images, (H, W), channels, classes)
DATASET_SHAPES = {
    "cifar10": (50000, (32, 32), 3, 10),
    "cifar100": (50000, (32, 32), 3, 100),
    "svhn": (73257, (32, 32), 3, 10),
    "mnist": (60000, (28, 28), 1, 10),
    "kmnist": (60000, (28, 28), 1, 10),
    "fashion-mnist": (60000, (28, 28), 1, 10),
    "sklearn-digits": (1437, (8, 8), 1, 10),
}
MEASURE_PASSES = 1000
RATES = {
    # one H100-class GPU, bf16 autocast, eager PyTorch, batch 64-256 of 32 x 32 images
    "gpu": {"flops": 25e12, "step_seconds": 0.003, "job_seconds": 15.0},
    # a 2-core x86 CPU, fp32, measured here on the quick study's nets
    "cpu": {"flops": 2.0e10, "step_seconds": 0.003, "job_seconds": 5.0},
}


def _forward_macs(spec, image_hw, in_channels, num_classes):
    """Multiply-adds of one image's forward pass, from forward hooks on the built model."""
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


_MACS_CACHE = {}  # spec and data shape -> forward FLOPs per image


def estimate_hours(device):
    """(hours, number of runs) of training and measuring every run of the config."""
    rate = RATES[device]
    seconds, n_runs, cache = 0.0, 0, _MACS_CACHE
    for name, study in STUDIES.items():
        ds = config["datasets"][study["dataset"]]
        n_full, image_hw, channels, classes = DATASET_SHAPES.get(
            ds["source"], (50000, (32, 32), 3, 10)
        )
        n_train = ds["subset"] or n_full
        if ds["source"] == "sklearn-digits":
            n_train = round(n_train * (1 - ds["test_fraction"]))
        for record in RUNS[name].values():
            spec, train = record["spec"], record["train"]
            key = repr(sorted(spec.items())) + repr((image_hw, channels, classes))
            if key not in cache:
                cache[key] = 2 * _forward_macs(spec, image_hw, channels, classes)
            flops = cache[key]
            images = train.get("epochs", 30) * n_train
            steps = images / train.get("batch_size", 128)
            n_measure = min(study["measure"]["n_samples"] or n_train, n_train)
            seconds += 3 * flops * images / rate["flops"] + steps * rate["step_seconds"]
            seconds += MEASURE_PASSES * flops * n_measure / rate["flops"]
            seconds += 2 * rate["job_seconds"]
            n_runs += 1
    return seconds / 3600.0, n_runs


def estimate_text():
    gpu_h, n = estimate_hours("gpu")
    cpu_h, _ = estimate_hours("cpu")
    return (
        f"{n} runs to train and measure: about {gpu_h:.1f} h on one H100-class GPU, "
        f"about {cpu_h:.0f} h on a 2-core CPU (the analysis, validation and notebooks "
        "add minutes)"
    )


def startup_message():
    """At the start of a real (not dry) run: warn when a GPU config meets no GPU."""
    if not config["gpu"] or not workflow.local_exec:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        logger.info(
            f"convflat: {estimate_text()}. Use --profile profiles/local so that jobs never "
            "share a GPU."
        )
        return
    logger.warning(
        "\n" + "=" * 78 + "\n"
        "convflat: this config asks for a GPU (config key 'gpu: true'), but torch sees no\n"
        f"CUDA device here. {estimate_text()}.\n"
        "For a complete study that runs offline on a CPU in minutes, use:\n"
        "    snakemake --cores all --configfile config/quick.yaml\n"
        "Continuing; stop with Ctrl-C (finished runs are kept, training resumes).\n"
        + "=" * 78
    )


def report_estimate(log_path):
    """The `estimate` rule: print the estimate and keep it in the log."""
    text = estimate_text()
    print(text)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    Path(log_path).write_text(text + "\n")
