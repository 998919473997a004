"""timm's networks in the class: small networks built from timm's own layers against the dense
float64 autograd Hessian, the issue's list of timm models measured, and what is out refused
with the op named. Skipped where timm is not installed (the ``timm`` extra; ``dev`` has it)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convflat.curvature import OutOfClassError, ZeroCurvatureWarning, exact_curvature, find_head
from convflat.reference import autograd_kernel_hessian, dense_measures

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.usefixtures("one_thread")


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def _randomized(model, x, seed=0):
    """float64, eval mode, BatchNorm running statistics those of a shifted batch (so that the
    logits stay of order one in a deep net) and affine terms away from (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 1.0
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64)
                               + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64)
                             * 0.6 - 0.3)
        model.train()
        model(x * 1.3 + 0.2)
    return model.eval()


class _TimmBNAct(nn.Module):
    """timm's BatchNormAct2d (a functional F.batch_norm and its activation) after the conv,
    timm's SelectAdaptivePool2d as the pool, and nn.Linear or timm's Linear (traced into
    F.linear) as the classifier."""

    def __init__(self, act, linear=nn.Linear):
        super().__init__()
        L = timm.layers
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn0 = L.BatchNormAct2d(3, act_layer=nn.Tanh)
        self.last = L.create_conv2d(3, 4, 3, padding="")
        self.bn = L.BatchNormAct2d(4, act_layer=act)
        self.pool = L.SelectAdaptivePool2d(pool_type="avg", flatten=True)
        self.fc = linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.bn(self.last(self.bn0(self.stem(x))))))


def _tiny(name):
    if name.startswith("bnact"):
        return _TimmBNAct(*{"bnact-silu": (nn.SiLU,),
                            "bnact-relu": (nn.ReLU, timm.layers.Linear)}[name])
    if name == "densenet":
        return timm.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2), num_classes=3,
                                             in_chans=2, bn_size=2)
    if name == "dla":
        from timm.models.dla import DLA, DlaBasic
        return DLA(levels=(1, 1, 1, 1, 1, 1), channels=(4, 4, 4, 4, 4, 4), num_classes=3,
                   in_chans=2, block=DlaBasic)
    raise KeyError(name)


TINY = {  # name -> (conv, classifier) that find_head must choose
    "bnact-silu": ("last", "fc"),
    "bnact-relu": ("last", "fc"),  # timm's Linear: F.linear with fc.weight
    "densenet": ("features.denseblock2.denselayer2.conv2", "classifier"),  # concatenation
    "dla": ("level5.root.conv", "fc"),  # a 1x1 conv as the classifier
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_timm_networks_match_dense_autograd_hessian(name):
    torch.manual_seed(3)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 2, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    model = _randomized(_tiny(name), x, seed=4)
    head = find_head(model)
    assert (head.conv_name, head.linear_name) == TINY[name]
    assert head.piecewise_linear is (name != "bnact-silu")
    assert isinstance(head.linear, (nn.Linear, nn.Conv2d))
    if name == "bnact-relu":  # the classifier really is the functional call
        assert any(op.startswith("function 'linear'") for op in head.ops)
    H = autograd_kernel_hessian(model, head.conv_name, x, y)
    ref = dense_measures(H, head.conv.weight.detach())
    assert ref["trace"] != 0  # SiLU's sigma'' part can make it negative
    for route in ("gram", "direct"):
        res = exact_curvature(model, (x, y), device="cpu", batch_size=2, route=route)
        assert rel(res.trace, ref["trace"]) <= 1e-9, route
        assert rel(res.relative_flatness, ref["relative_flatness"]) <= 1e-9, route
        torch.testing.assert_close(res.block_traces, ref["block_traces"], rtol=1e-9,
                                   atol=1e-12 * float(ref["block_traces"].abs().max()))
    # the classifier's own trace reads all pooled features (a DenseNet's concatenation too)
    Hv = autograd_kernel_hessian(model, head.linear_name, x, y)
    assert rel(res.classifier_trace, float(Hv.diagonal().sum())) <= 1e-10


class _TimmSE(nn.Module):
    """timm's SqueezeExcite between the conv and the pool: out of the class."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.last = nn.Conv2d(3, 8, 3, padding=1)
        self.se = timm.layers.SqueezeExcite(8, rd_channels=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(F.relu(self.se(self.last(self.stem(x)))).mean((2, 3)))


def test_timm_squeeze_excite_before_the_pool_is_refused():
    with pytest.raises(OutOfClassError, match="follows the classifier 'se.fc1'.*"
                                              "squeeze-and-excitation"):
        find_head(_TimmSE(), layer="last")


def _timm_model(arch):
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=10)


# the issue's list: each measured, with the conv and classifier find_head chooses
IN_CLASS = {
    "efficientnet_b0": ("conv_head", "classifier"),
    "mobilenetv2_100": ("conv_head", "classifier"),
    "regnetx_002": ("s4.b7.conv3.conv", "head.fc"),
    "resnext26ts": ("stages.3.1.conv3_1x1.conv", "head.fc"),
    "densenet121": ("features.denseblock4.denselayer16.conv2", "classifier"),
    "dla34": ("level5.root.conv", "fc"),
    "starnet_s1": ("stages.3.3.dwconv2.conv", "head"),  # timm's Linear as the classifier
}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(IN_CLASS))
def test_timm_models_of_the_issue_are_measured(arch):
    """Measured: exact_curvature itself checks that the traced head reproduces the model's
    logits (to float32 rounding); the block traces are finite and sum to the trace. The
    exactness of each form these models use is checked on the tiny networks above."""
    model = _timm_model(arch)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (2,), generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZeroCurvatureWarning)
        res = exact_curvature(model, (x, y), device="cpu")
    assert (res.layer, res.classifier) == IN_CLASS[arch]
    assert torch.isfinite(res.block_traces).all()
    assert rel(res.trace, float(res.block_traces.diagonal().sum())) < 1e-10


@pytest.mark.parametrize("arch,pattern", [
    ("mobilenetv3_small_100", "Hardswish module 'act2' follows the classifier 'conv_head'"
                              ".*MLP head"),
    ("ghostnet_100", "ReLU module 'act2' follows the classifier 'conv_head'.*MLP head"),
    ("convnext_atto", "'layer_norm'.*normalizes across the channels"),
    ("vgg11", "could not trace"),
])
def test_timm_models_out_of_the_class_are_refused_with_the_reason(arch, pattern):
    with pytest.raises(OutOfClassError, match=pattern):
        find_head(_timm_model(arch))


def test_fresh_timm_resnet_has_zero_trace_and_says_why():
    """timm zero-initializes the last BatchNorm gamma of each residual block: the last conv's
    Hessian is exactly 0 (the loss does not depend on that kernel), and the warning says so."""
    model = _timm_model("resnet18")
    assert not bool(model.layer4[1].bn2.weight.any())
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([1, 7])
    with pytest.warns(ZeroCurvatureWarning, match="BatchNorm 'layer4.1.bn2'.*gamma = 0"):
        res = exact_curvature(model, (x, y), device="cpu")
    assert res.layer == "layer4.1.conv2" and res.trace == 0.0
    # the reference: the gradient of the loss in that kernel vanishes for every input
    loss = F.cross_entropy(model.eval()(x), y)
    (grad,) = torch.autograd.grad(loss, model.layer4[1].conv2.weight)
    assert not bool(grad.any())
    with torch.no_grad():
        model.layer4[1].bn2.weight.fill_(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroCurvatureWarning)
        assert exact_curvature(model, (x, y), device="cpu").trace > 0


def test_zoo_survey_rows_and_table():
    """bench zoo's rows: a model in the class with its conv and timings, a refusal with the
    op and reason (no generic advice), an untraceable one; the table counts them."""
    from convflat.bench import zoo

    assert zoo.pick_variant(timm, "dla")[0] == "dla34"
    name, n = zoo.pick_variant(timm, "fasternet")  # no preference: the smallest of the first
    assert name in timm.list_models(module="fasternet") and n == zoo._n_params(timm, name)
    rows = [zoo.survey(timm, fam, arch, None, 2, 32) for fam, arch in
            [("dla", "dla34"), ("ghostnet", "ghostnet_100"), ("vgg", "vgg11")]]
    dla, ghost, vgg = rows
    assert dla["status"] == "in" and "`level5.root.conv` -> `fc`" in dla["detail"]
    assert dla["exact_s"] > 0 and dla["forward_s"] > 0
    assert dla["params"] == sum(p.numel() for p in _timm_model("dla34").parameters())
    assert ghost["status"] == "out"
    assert ghost["detail"].startswith("ReLU module 'act2' follows the classifier 'conv_head'")
    assert "Pass layer=" not in ghost["detail"]
    assert vgg["status"] == "untraceable" and "TraceError" in vgg["detail"]
    text = zoo.render(rows, {"timm": timm.__version__, "torch": torch.__version__,
                             "date": "2026-01-01", "threads": 1, "batch": 2, "size": 32})
    assert f"timm {timm.__version__}" in text and "Of 3 families, **1 are in the class**" in text
    assert text.count("\n| ") == 4  # header and three rows
