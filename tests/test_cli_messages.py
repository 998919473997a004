"""Issue 21 item 7, the command-line messages: ``prepare --help`` does not offer a prepared
file for ``--data``; a bad ``--layer`` lists the conv layers one could name; a classifier
with another number of classes names its key and suggests ``--num-classes``."""

from __future__ import annotations

import pytest
import torch

from convflat.cli import main
from convflat.models import build_model, save_checkpoint


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_prepare_help_offers_sources_only(capsys):
    code, out, _ = run(["prepare", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    assert "a prepared .pt file, or" not in text
    assert "not a prepared .pt file" in text and "sklearn-digits" in text
    # and it refuses one, as the help says
    code, _, err = run(["prepare", "--data", "x.pt"], capsys)
    assert code == 2 and "not a prepared .pt file" in err


def test_train_help_still_offers_a_prepared_file(capsys):
    code, out, _ = run(["train", "--help"], capsys)
    assert code == 0 and "a prepared .pt file, or a dataset name" in " ".join(out.split())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, digits):
    from convflat.data import data_identity

    path = tmp_path_factory.mktemp("msg") / "model.pt"
    torch.manual_seed(0)
    save_checkpoint(path, build_model(
        {"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1, "num_classes": 10}),
        data=data_identity(digits))
    return path


@pytest.mark.parametrize("layer", ["features.9.conv", "classifier"])
def test_bad_layer_lists_the_conv_layers(digits, ckpt, capsys, layer):
    code, _, err = run(["curvature", "--checkpoint", str(ckpt), "--data", str(digits.path),
                        "--layer", layer], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"layer={layer!r}" in lines[0]
    assert "the conv layers of GapCNN: features.0.conv, features.1.conv" in lines[0]


def test_class_count_mismatch_names_the_key_and_suggests_num_classes(digits, tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=100)
    tv.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    argv = ["curvature", "--checkpoint", str(path), "--arch", "resnet18", "--data",
            str(digits.path), "--max-samples", "4"]
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert "fc.weight has 100 outputs" in lines[0] and "--num-classes 100" in lines[0]
    assert f"the classes of {digits.path}" in lines[0]
    code, _, err = run([*argv, "--num-classes", "7"], capsys)
    assert code == 2 and "(--num-classes); pass --num-classes 100" in err
