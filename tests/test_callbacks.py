"""convflat.callbacks.FlatnessCallback and convflat.lightning.FlatnessLightningCallback: the
values they report in a training loop are exact_curvature's on the weights of that epoch,
and the plain one's are the dense float64 autograd Hessian's; measuring changes nothing of
the training (weights, gradients, flags, RNG)."""

from __future__ import annotations

import copy
import csv
import importlib
import math
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convflat import FlatnessCallback, exact_curvature
from convflat.curvature import OutOfClassError
from convflat.models import build_model
from convflat.reference import autograd_kernel_hessian, dense_measures

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = {"family": "gapcnn", "in_channels": 1, "num_classes": 3, "image_size": [8, 8],
        "width": 3, "depth": 2}
CONV = "features.1.conv"  # the conv that feeds GAP in SPEC's net (3 -> 6 channels)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(SPEC)


def _epoch(model, opt, x, y, steps=3, batch=16):
    """A few SGD steps in train mode (BatchNorm statistics move too)."""
    model.train()
    for i in range(steps):
        xb, yb = x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def test_plain_callback_is_exact_curvature_each_epoch_and_the_dense_hessian():
    x, y = _data()
    xm, ym = x[:20], y[:20]
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    logged = []
    cb = FlatnessCallback((xm, ym), every=1, batch_size=8, device="cpu", log=logged.append)
    snapshots = []
    for epoch in (1, 2, 3):
        _epoch(model, opt, x, y)
        values = cb(model, epoch)
        snapshots.append(copy.deepcopy(model))
        assert values is not None and values["epoch"] == epoch
    assert logged == cb.history and [v["epoch"] for v in cb.history] == [1, 2, 3]
    traces = [v["conv_trace"] for v in cb.history]
    assert len(set(traces)) == 3, "training should move the trace"
    for values, snap in zip(cb.history, snapshots, strict=True):
        ref = exact_curvature(snap, (xm, ym), batch_size=20, device="cpu")
        assert ref.layer == CONV
        assert values["conv_trace"] == pytest.approx(ref.trace, rel=1e-9)
        assert values["conv_relative_flatness"] == pytest.approx(ref.relative_flatness,
                                                                 rel=1e-9)
        assert values["classifier_trace"] == pytest.approx(ref.classifier_trace, rel=1e-9)
        assert values["classifier_relative_flatness"] == pytest.approx(
            ref.classifier_relative_flatness, rel=1e-9)
        assert values["loss"] == pytest.approx(ref.loss, rel=1e-9)

    # the last epoch against the dense Hessian of a float64 copy, conv and classifier
    ref64 = copy.deepcopy(snapshots[-1]).double()
    x64 = xm.double()
    H = autograd_kernel_hessian(ref64, CONV, x64, ym)
    dense = dense_measures(H, dict(ref64.named_modules())[CONV].weight.detach())
    last = cb.history[-1]
    assert _rel(last["conv_trace"], dense["trace"]) < 1e-5
    assert _rel(last["conv_relative_flatness"], dense["relative_flatness"]) < 1e-5
    Hv = autograd_kernel_hessian(ref64, "classifier", x64, ym)
    dense_v = dense_measures(Hv, ref64.classifier.weight.detach())
    assert _rel(last["classifier_trace"], dense_v["trace"]) < 1e-5
    assert _rel(last["classifier_relative_flatness"], dense_v["relative_flatness"]) < 1e-5
    assert torch.allclose(cb.last.block_traces, dense["block_traces"], rtol=1e-5,
                          atol=1e-12 * float(dense["block_traces"].abs().max()))


def test_every_skips_epochs():
    x, y = _data(12)
    cb = FlatnessCallback((x, y), every=2, device="cpu", log=False)
    model = _model()
    out = [cb(model, epoch) for epoch in range(1, 6)]
    assert [o is None for o in out] == [True, False, True, False, True]
    assert [v["epoch"] for v in cb.history] == [2, 4]
    assert cb.history[0]["conv_trace"] == cb.history[1]["conv_trace"]  # same weights


def test_measuring_changes_nothing_of_the_training():
    """Weights, BatchNorm statistics, gradients, train/eval flags and the global RNG are
    the same after a measurement on a shuffling DataLoader, so the run goes on as without."""
    x, y = _data(32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=8, shuffle=True)
    model = _model()
    F.cross_entropy(model(x), y).backward()  # grads present, BN stats moved once
    model.features[0].eval()  # a mixed state of flags, to be kept as it is
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    cb = FlatnessCallback(loader, device="cpu", log=False)
    assert cb(model, 1) is not None
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters(), strict=True))
    assert [m.training for m in model.modules()] == flags
    # the DataLoader's order does not matter to the sums: same value as on the tensors
    ref = exact_curvature(model, (x, y), device="cpu")
    assert cb.history[0]["conv_trace"] == pytest.approx(ref.trace, rel=1e-9)


def test_one_shot_iterator_is_kept_for_later_epochs():
    x, y = _data(16)
    cb = FlatnessCallback(((x[i:i + 4], y[i:i + 4]) for i in range(0, 16, 4)),
                          device="cpu", log=False)
    model = _model()
    first, second = cb(model, 1), cb(model, 2)
    assert first["conv_trace"] == second["conv_trace"]
    assert first["conv_trace"] == pytest.approx(
        exact_curvature(model, (x, y), device="cpu").trace, rel=1e-9)


def test_default_log_line(caplog):
    x, y = _data(8)
    with caplog.at_level("INFO", logger="convflat.callbacks"):
        values = FlatnessCallback((x, y), device="cpu")(_model(), 1)
    assert f"epoch 1: conv trace {values['conv_trace']:.6g}" in caplog.text
    assert CONV in caplog.text


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"every": 0}, "every"), ({"every": 1.5}, "every"), ({"batch_size": 0}, "batch_size"),
    ({"log": "yes"}, "log"), ({"device": "tpu"}, "tpu"),
])
def test_bad_arguments_are_named(kwargs, word):
    x, y = _data(4)
    with pytest.raises((ValueError, RuntimeError), match=word):
        FlatnessCallback((x, y), **kwargs)


def test_out_of_class_model_is_refused_naming_the_op():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))  # an MLP head
    x, y = _data(4)
    cb = FlatnessCallback((x, y), device="cpu", log=False)
    with pytest.raises(OutOfClassError):
        cb(model, 1)
    assert cb.history == []


# ------------------------------------------------------------------------- Lightning


def test_lightning_callback_without_lightning_says_how_to_install(monkeypatch):
    """convflat.lightning imports without Lightning; asking for the class names the extra."""
    monkeypatch.setitem(sys.modules, "lightning", None)  # `import lightning...` fails
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)
    monkeypatch.delitem(sys.modules, "convflat.lightning", raising=False)
    module = importlib.import_module("convflat.lightning")
    with pytest.raises(ImportError, match=r"convflat\[lightning\]"):
        module.FlatnessLightningCallback  # noqa: B018
    with pytest.raises(ImportError, match=r"convflat\[lightning\]"):
        exec("from convflat.lightning import FlatnessLightningCallback", {})
    monkeypatch.delitem(sys.modules, "convflat.lightning", raising=False)


def test_lightning_callback_logs_exact_curvature_each_epoch(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from convflat.lightning import FlatnessLightningCallback

    x, y = _data()
    xm, ym = x[:20], y[:20]

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _model()

        def forward(self, inp):
            return self.model(inp)

        def training_step(self, batch, _):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    snapshots = {}

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snapshots[trainer.current_epoch + 1] = copy.deepcopy(pl_module.model)

    flat = FlatnessLightningCallback((xm, ym), every=1, module="model", batch_size=8)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path),
                         callbacks=[flat, Snapshot()], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer.fit(Module(), loader)

    with open(trainer.logger.log_dir + "/metrics.csv") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("flatness/conv_trace")]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [v["epoch"] for v in flat.history] == [1, 2, 3]
    for row, epoch in zip(rows, (1, 2, 3), strict=True):
        ref = exact_curvature(snapshots[epoch], (xm, ym), device="cpu")
        for key, field in (("conv_trace", "trace"),
                           ("conv_relative_flatness", "relative_flatness"),
                           ("classifier_trace", "classifier_trace"),
                           ("classifier_relative_flatness", "classifier_relative_flatness")):
            # the logger stores float32
            assert float(row["flatness/" + key]) == pytest.approx(getattr(ref, field),
                                                                  rel=1e-6), (epoch, key)
    assert len({r["flatness/conv_trace"] for r in rows}) == 3
    assert not any(math.isnan(float(r["flatness/conv_trace"])) for r in rows)
    assert isinstance(flat, pl.Callback)
    fresh = FlatnessLightningCallback((xm, ym), every=2)
    assert type(pickle.loads(pickle.dumps(fresh))) is FlatnessLightningCallback


def test_lightning_callback_names_a_missing_submodule():
    pl = pytest.importorskip("lightning.pytorch")
    from convflat.lightning import FlatnessLightningCallback

    x, y = _data(4)
    cb = FlatnessLightningCallback((x, y), module="net")
    with pytest.raises(AttributeError, match="module='net'"):
        cb.measured_module(pl.LightningModule())
