"""convflat.models: the families, their specs, their head, and checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convflat.curvature import find_head
from convflat.models import (
    MODEL_FORMAT,
    build_model,
    gapcnn_plan,
    load_checkpoint,
    normalize_spec,
    resnet_stages,
    save_checkpoint,
)

DIGITS = {"in_channels": 1, "num_classes": 10, "image_size": 8}

pytestmark = pytest.mark.usefixtures("one_thread")

# (spec, expected name of the conv that feeds GAP)
FAMILIES = [
    ({"family": "gapcnn", "width": 4, "depth": 3, **DIGITS}, "features.2.conv"),
    ({"family": "gapcnn", "width": 4, "depth": 3, "batchnorm": False, "activation": "silu",
      "dropout": 0.2, **DIGITS}, "features.4.conv"),
    ({"family": "gapcnn", "width": 4, "depth": 1, "activation": "gelu", **DIGITS},
     "features.0.conv"),
    ({"family": "resnet", "depth": 8, "width": 4, **DIGITS}, "layers.2.0.conv2"),
    ({"family": "resnet", "depth": 8, "width": 4, "preact": True, **DIGITS}, "layers.2.0.conv2"),
    ({"family": "resnet", "depth": 10, "width": 4, "activation": "silu", **DIGITS},
     "layers.3.0.conv2"),
    pytest.param({"family": "torchvision", "arch": "resnet18", "in_channels": 1,
                  "num_classes": 10}, "layer4.1.conv2", marks=pytest.mark.slow),
    pytest.param({"family": "torchvision", "arch": "mobilenet_v2", "in_channels": 3,
                  "num_classes": 5}, "features.18.0", marks=pytest.mark.slow),
]
IDS = ["gapcnn", "gapcnn-silu-nobn-dropout", "gapcnn-depth1-gelu", "resnet8", "preact-resnet8",
       "resnet10-silu", "tv-resnet18", "tv-mobilenet_v2"]


def _input(spec, n=4, size=8):
    torch.manual_seed(1)
    return torch.randn(n, spec["in_channels"], size, size)


@pytest.mark.parametrize("spec, conv", FAMILIES, ids=IDS)
def test_family_forward_trace_and_head(spec, conv):
    torch.manual_seed(0)
    model = build_model(spec)
    size = 8 if spec["family"] != "torchvision" else 32
    x = _input(spec, size=size)
    out = model(x)
    assert out.shape == (4, spec["num_classes"])
    torch.fx.symbolic_trace(model)  # head detection traces the model
    head = find_head(model.eval(), x)
    assert head.conv_name == conv
    assert isinstance(head.linear, nn.Linear)
    assert model.spec == normalize_spec(spec)


def test_build_is_seeded():
    spec = FAMILIES[0][0]
    torch.manual_seed(3)
    a = build_model(spec)
    torch.manual_seed(3)
    b = build_model(spec)
    assert all(torch.equal(p, q)
               for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_gapcnn_downsampling_rule():
    # digits 8 x 8: two stride-2 steps, ending at 2 x 2 (never below)
    plan = gapcnn_plan({"family": "gapcnn", "width": 8, "depth": 3, **DIGITS})
    assert plan == [(1, 8, 1), (8, 16, 2), (16, 32, 2)]
    plan = gapcnn_plan({"family": "gapcnn", "width": 8, "depth": 6, **DIGITS})
    assert [s for *_, s in plan] == [1, 1, 2, 1, 2, 1]  # extra layers go to later stages
    # depth 2 can downsample only once
    assert [s for *_, s in gapcnn_plan({"family": "gapcnn", "depth": 2, **DIGITS})] == [1, 2]
    # CIFAR 32 x 32: at most max_downsample = 3 steps -> 4 x 4, channels doubling
    cifar = {"family": "gapcnn", "in_channels": 3, "num_classes": 10, "width": 16, "depth": 4}
    assert gapcnn_plan(cifar) == [(3, 16, 1), (16, 32, 2), (32, 64, 2), (64, 128, 2)]
    # 3 x 3 images go to 2 x 2 once; 2 x 2 images are never downsampled
    tiny = {"family": "gapcnn", "in_channels": 1, "num_classes": 2, "image_size": 3, "depth": 3}
    assert [s for *_, s in gapcnn_plan(tiny)] == [1, 2, 1]
    assert [s for *_, s in gapcnn_plan({**tiny, "image_size": 2})] == [1, 1, 1]
    model = build_model({"family": "gapcnn", "width": 4, "depth": 5, **DIGITS})
    feats = model.features(torch.zeros(1, 1, 8, 8))
    assert feats.shape[-2:] == (2, 2)


def test_resnet_structure():
    assert resnet_stages(20) == [3, 3, 3] and resnet_stages(18) == [2, 2, 2, 2]
    assert resnet_stages(14) == [2, 2, 2] and resnet_stages(34) == [3, 4, 6, 3]
    cifar = {"in_channels": 3, "num_classes": 10}
    r20 = build_model({"family": "resnet", "depth": 20, **cifar})
    n20 = sum(p.numel() for p in r20.parameters())
    assert 0.26e6 < n20 < 0.29e6  # ResNet-20 (He et al.: 0.27M)
    r18 = build_model({"family": "resnet", "depth": 18, **cifar})
    assert r18.spec["width"] == 64
    assert 11.1e6 < sum(p.numel() for p in r18.parameters()) < 11.2e6  # CIFAR ResNet-18
    # the stem is 3 x 3, stride 1, no max-pool; CIFAR 32 x 32 ends at 8 x 8 (3 stages)
    assert r20.stem[0].kernel_size == (3, 3) and r20.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in r20.modules())
    assert r20.layers(r20.stem(torch.zeros(1, 3, 32, 32))).shape == (1, 64, 8, 8)
    # digits: 8 -> 4 -> 2 (never below 2 x 2)
    small = build_model({"family": "resnet", "depth": 10, "width": 4, **DIGITS})
    assert small.layers(small.stem(torch.zeros(1, 1, 8, 8))).shape == (1, 32, 2, 2)
    # post-activation: the last block ends bn2 -> add -> act; pre-activation: a final bn-act
    last = r20.layers[-1][-1]
    assert isinstance(last.bn2, nn.BatchNorm2d) and isinstance(last.act2, nn.ReLU)
    pre = build_model({"family": "resnet", "depth": 8, "preact": True, **cifar})
    assert isinstance(pre.final[0], nn.BatchNorm2d) and isinstance(pre.final[1], nn.ReLU)


@pytest.mark.parametrize("spec, pattern", [
    ({"family": "vgg", "in_channels": 1, "num_classes": 2}, "'family'"),
    ({"family": "gapcnn", "in_channels": 1, "num_classes": 2, "widht": 3}, "'widht'"),
    ({"family": "gapcnn", "num_classes": 2}, "'in_channels' is required"),
    ({"family": "gapcnn", "in_channels": 1, "num_classes": 2, "depth": 0}, "'depth'"),
    ({"family": "gapcnn", "in_channels": 1, "num_classes": 2, "activation": "tanh"},
     "'activation'"),
    ({"family": "gapcnn", "in_channels": 1, "num_classes": 2, "batchnorm": "yes"}, "'batchnorm'"),
    ({"family": "gapcnn", "in_channels": 1, "num_classes": 2, "dropout": 1.0}, "'dropout'"),
    ({"family": "resnet", "in_channels": 1, "num_classes": 2, "depth": 12}, "6n\\+2"),
    ({"family": "torchvision", "in_channels": 3, "num_classes": 2}, "'arch' is required"),
    ({"family": "torchvision", "in_channels": 3, "num_classes": 2, "arch": "resnet9000"},
     "resnet9000"),
    ({"family": "torchvision", "in_channels": 3, "num_classes": 2, "arch": "resnet18",
      "weights": "IMAGENET1K_V1"}, "'weights'"),
])
def test_bad_specs_name_the_key(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_model(spec)


@pytest.mark.parametrize("spec, conv", FAMILIES, ids=IDS)
def test_checkpoint_rebuilt_from_spec_gives_same_logits(tmp_path, spec, conv):
    torch.manual_seed(0)
    model = build_model(spec)
    size = 8 if spec["family"] != "torchvision" else 32
    model.train()
    with torch.no_grad():  # move the BN running statistics away from their init
        for _ in range(2):
            model(_input(spec, n=8, size=size) * 2 + 0.5)
    model.eval()
    x = _input(spec, size=size)
    path = save_checkpoint(tmp_path / "model.pt", model)
    rebuilt, ckpt = load_checkpoint(path)
    assert ckpt["format"] == MODEL_FORMAT and set(ckpt) == {"format", "spec", "state_dict"}
    assert ckpt["spec"] == model.spec and not rebuilt.training
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_load_checkpoint_errors(tmp_path):
    spec = FAMILIES[0][0]
    model = build_model(spec)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01 not a checkpoint")
    with pytest.raises(ValueError, match="not a convflat or torch checkpoint: .*junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")  # a bare state_dict
    with pytest.raises(ValueError, match="plain.pt is not a convflat checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    torch.save({"format": MODEL_FORMAT, "spec": spec}, tmp_path / "nostate.pt")
    with pytest.raises(ValueError, match="lacks key 'state_dict'"):
        load_checkpoint(tmp_path / "nostate.pt")

    wider = build_model({**spec, "width": 5})
    save_checkpoint(tmp_path / "wide.pt", wider)
    ckpt = torch.load(tmp_path / "wide.pt", weights_only=True)
    ckpt["spec"] = normalize_spec(spec)  # weights of a wider net under the narrow spec
    torch.save(ckpt, tmp_path / "mismatch.pt")
    with pytest.raises(ValueError, match=r"first mismatching key 'features.0.conv.weight' has "
                                         r"shape \(5, 1, 3, 3\)"):
        load_checkpoint(tmp_path / "mismatch.pt")
    state = dict(model.state_dict())
    state.pop("classifier.bias")
    state["extra.weight"] = torch.zeros(1)
    torch.save({"format": MODEL_FORMAT, "spec": spec, "state_dict": state}, tmp_path / "miss.pt")
    with pytest.raises(ValueError, match="'classifier.bias' is missing"):
        load_checkpoint(tmp_path / "miss.pt")
    state["classifier.bias"] = model.state_dict()["classifier.bias"]
    torch.save({"format": MODEL_FORMAT, "spec": spec, "state_dict": state}, tmp_path / "more.pt")
    with pytest.raises(ValueError, match="'extra.weight' is not in the model"):
        load_checkpoint(tmp_path / "more.pt")
    torch.save({"format": MODEL_FORMAT, "spec": {"family": "gapcnn"}, "state_dict": state},
               tmp_path / "badspec.pt")
    with pytest.raises(ValueError, match=r"badspec.pt: spec key 'in_channels' is required"):
        load_checkpoint(tmp_path / "badspec.pt")


# ------------------------------------------------------------------ typed specs, one source


def test_schema_model_block_is_the_spec_dataclasses():
    """The workflow schema's model block lists every key of every family's dataclass,
    with its type and range, and documents each."""
    from pathlib import Path

    import yaml

    from convflat.model_spec import schema_properties

    schema = yaml.safe_load((Path(__file__).resolve().parents[1]
                             / "workflow/schemas/config.schema.yaml").read_text())
    block = schema["properties"]["studies"]["additionalProperties"]["properties"]["model"]
    props = block["properties"]
    assert {k: {kk: vv for kk, vv in v.items() if kk != "description"}
            for k, v in props.items()} == schema_properties()
    assert all(p.get("description") for p in props.values())


def test_cli_model_flags_are_the_spec_keys():
    """``convflat train`` has one flag per spec key (the data's keys aside), parsed to the
    key's type."""
    from convflat.cli import train as cli_train
    from convflat.cli._args import model_flags
    from convflat.model_spec import DATA_KEYS, FAMILIES, options

    keys = {o.name for f in FAMILIES for o in options(f)} - set(DATA_KEYS)
    assert {key for key, _ in model_flags().values()} == keys
    assert cli_train.MODEL_FLAGS.keys() == model_flags().keys()
    import argparse

    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    cli_train.register(sub)
    args = p.parse_args(["train", "--data", "digits", "--out", "x", "--family", "gapcnn",
                         "--no-batchnorm", "--dropout", "0.25", "--max-downsample", "1"])
    assert cli_train.build_spec(args) == {"family": "gapcnn", "batchnorm": False,
                                          "dropout": 0.25, "max_downsample": 1}


def test_spec_defaults_build_the_documented_nets():
    """The dataclass defaults are the nets docs/training.md describes: gapcnn 4 convs,
    32 channels first (x2 per downsampling, 3 steps on 32 x 32); resnet 20: 19 convs in
    the trunk plus 2 projection shortcuts, 16 channels first."""
    torch.manual_seed(0)
    gap = build_model({"family": "gapcnn", "in_channels": 3, "num_classes": 10})
    convs = [m for m in gap.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256]
    assert [c.stride[0] for c in convs] == [1, 2, 2, 2]
    res = build_model({"family": "resnet", "in_channels": 3, "num_classes": 10})
    convs = [m for m in res.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19 + 2 and convs[0].out_channels == 16
    assert res.spec["width"] == 16
    assert build_model({"family": "resnet", "depth": 10, "in_channels": 3,
                        "num_classes": 10}).spec["width"] == 64


@pytest.mark.parametrize(
    ("change", "key", "message"),
    [
        ({"dropout": "high"}, "dropout", "spec key 'dropout' must be a number in [0, 1), "
                                         "got 'high'"),
        ({"dropout": 1.0}, "dropout", "must be a number in [0, 1), got 1.0"),
        ({"width": 0}, "width", "spec key 'width' must be a positive integer, got 0"),
        ({"width": 2.5}, "width", "must be a positive integer, got 2.5"),
        ({"batchnorm": 1}, "batchnorm", "spec key 'batchnorm' must be true or false"),
        ({"activation": "tanh"}, "activation", "must be one of ('relu', 'gelu', 'silu')"),
        ({"image_size": [8]}, "image_size", "must be an int or [H, W], got [8]"),
        ({"max_downsample": -1}, "max_downsample", "must be a non-negative integer"),
        ({"preact": True}, "preact", "spec key 'preact' is not a gapcnn option"),
        ({"family": "vgg"}, "family", "spec key 'family' must be one of"),
        ({"num_classes": None}, "num_classes", "spec key 'num_classes' is required"),
    ],
)
def test_spec_errors_carry_their_key(change, key, message):
    from convflat.errors import OptionError

    spec = {"family": "gapcnn", **DIGITS, **change}
    with pytest.raises(OptionError) as err:
        normalize_spec(spec)
    assert err.value.key == key
    assert message in str(err.value)


def test_resnet_depth_error_carries_its_key():
    from convflat.errors import OptionError

    with pytest.raises(OptionError, match="6n\\+2") as err:
        normalize_spec({"family": "resnet", "depth": 21, **DIGITS})
    assert err.value.key == "depth"


def test_model_spec_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, convflat.model_spec as m, convflat.cli._args as a; a.model_flags(); "
            "m.normalize({'family': 'gapcnn', 'in_channels': 1, 'num_classes': 2}); "
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_training_doc_names_every_spec_key():
    """docs/training.md's table of families names every key of each family's dataclass."""
    from pathlib import Path

    from convflat.model_spec import FAMILIES, options

    doc = (Path(__file__).resolve().parents[1] / "docs/training.md").read_text()
    rows = {line.split("|")[1].strip().strip("`"): line for line in doc.splitlines()
            if line.startswith("| `")}
    for family in FAMILIES:
        for opt in options(family):
            if opt.name in ("in_channels", "num_classes"):
                assert f"`{opt.name}`" in doc  # "All specs also need ..."
            else:
                assert f"`{opt.name}`" in rows[family], (family, opt.name)


def test_checkpoint_data_identity_is_read_back_or_refused(tmp_path):
    from convflat.models import checkpoint_data

    assert checkpoint_data({"format": "convflat-model/1"}) is None  # written before identities
    ident = {"format": "convflat-data-identity/1", "image_shape": [1, 8, 8], "classes": 10,
             "train_hash": "ab"}
    assert checkpoint_data({"data": ident}) == ident
    with pytest.raises(ValueError, match=r"m\.pt: its data identity has format 'other'"):
        checkpoint_data({"data": {**ident, "format": "other"}}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"m\.pt: its data identity lacks train_hash"):
        checkpoint_data({"data": {k: v for k, v in ident.items() if k != "train_hash"}},
                        tmp_path / "m.pt")
