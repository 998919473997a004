"""``convflat curvature``: end to end on sklearn digits, and each bad input's message."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from convflat.cli import main
from convflat.models import build_model, save_checkpoint
from convflat.reference import autograd_kernel_hessian


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = build_model({"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1,
                         "num_classes": 10})
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    return path, model


def run(args, capsys):
    code = main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_measures_a_convflat_checkpoint_and_matches_autograd(digits, ckpt, tmp_path, capsys):
    path, model = ckpt
    out = tmp_path / "curv.json"
    code, stdout, _ = run(["curvature", "--checkpoint", str(path), "--data", str(digits.path),
                           "--max-samples", "40", "--batch-size", "16", "--blocks",
                           "--out", str(out)], capsys)
    assert code == 0 and "trace=" in stdout
    rec = json.loads(out.read_text())
    m = rec["measures"]
    assert rec["status"] == "ok" and rec["torch_version"] == torch.__version__
    assert m["n_samples"] == 40 and len(m["block_traces"]) == m["n_filters"]
    # independent reference: the dense Hessian of the float64 model on the same 40 samples,
    # the seeded subset the workflow draws (seed 0), not the first 40
    x, y = digits.tensors("train", dtype=torch.float64)
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:40]
    assert rec["data"]["subset_seed"] == 0 and rec["data"]["max_samples"] == 40
    x, y = x[idx], y[idx]
    m64 = model.double().eval()
    H = autograd_kernel_hessian(m64, m["layer"], x, y)
    assert m["trace"] == pytest.approx(float(H.diagonal().sum()), rel=1e-5)
    loss = float(F.cross_entropy(m64(x).detach(), y))
    assert m["loss"] == pytest.approx(loss, rel=1e-5)


def test_measures_a_torchvision_state_dict(digits, tmp_path, capsys):
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    tv.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    path = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), path)
    code, stdout, err = run(["curvature", "--checkpoint", str(path), "--arch", "resnet18",
                             "--data", str(digits.path), "--max-samples", "8"], capsys)
    assert code == 0, err
    rec = json.loads(stdout)
    assert rec["measures"]["layer"] == "layer4.1.conv2" and rec["measures"]["trace"] > 0


def test_errors_name_the_problem(digits, ckpt, tmp_path, capsys):
    import torchvision

    data = ["--data", str(digits.path)]
    code, _, err = run(["curvature", "--checkpoint", str(tmp_path / "nope.pt"), *data], capsys)
    assert code == 2 and "nope.pt does not exist" in err

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r.pth")
    code, _, err = run(["curvature", "--checkpoint", str(tmp_path / "r.pth"), "--arch",
                        "resnet50", *data], capsys)
    assert code == 2 and "does not fit resnet50" in err and "key" in err

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(["curvature", "--checkpoint", str(tmp_path / "junk.pt"), *data], capsys)
    assert code == 2 and "not a convflat or torch checkpoint" in err

    # squeezenet ends in conv -> ReLU -> GAP with no nn.Linear: outside the class
    sq = torchvision.models.squeezenet1_1(weights=None, num_classes=10)
    sq.features[0] = torch.nn.Conv2d(1, 64, 3, stride=2)
    torch.save(sq.state_dict(), tmp_path / "sq.pth")
    code, _, err = run(["curvature", "--checkpoint", str(tmp_path / "sq.pth"), "--arch",
                        "squeezenet1_1", *data], capsys)
    assert code == 2 and "'classifier.1' is not in the class" in err and "without passing" in err

    path, _ = ckpt
    code, _, err = run(["curvature", "--checkpoint", str(path), *data, "--max-samples", "0"],
                       capsys)
    assert code == 2 and "--max-samples: must be a positive integer, got 0" in err

    model = build_model({"family": "gapcnn", "width": 4, "depth": 2, "in_channels": 1,
                         "num_classes": 10})
    with torch.no_grad():
        model.classifier.weight.fill_(float("inf"))
    save_checkpoint(tmp_path / "inf.pt", model)
    code, _, err = run(["curvature", "--checkpoint", str(tmp_path / "inf.pt"), *data], capsys)
    assert code == 2 and "non-finite logits in batch 0" in err
