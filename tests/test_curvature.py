"""The closed form against independent references: the dense autograd Hessian in float64,
BackPACK's exact GGN diagonal at torchvision scale, and the invariances of docs/math.md
Eq. (11)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from convflat.curvature import (
    CurvatureOptions,
    OutOfClassError,
    exact_curvature,
    find_head,
    head_batch,
)
from convflat.curvature.contract import _GaussNewtonSum
from convflat.curvature.gram import _GatheredGram, _PhaseGram
from convflat.curvature.plan import _Plan, _Workspace
from convflat.reference import (
    Case,
    SmallGapNet,
    architecture_suite,
    autograd_kernel_hessian,
    build_case,
    dense_measures,
)

SUITE = architecture_suite()


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
def test_matches_dense_autograd_hessian(case, monkeypatch):
    """Every route against the dense Hessian: the automatic choice, the patch Gram from the
    input's stride phases and from gathered patches, and the direct route."""
    assert len(SUITE) >= 20
    model, x, y = build_case(case, seed=1)
    # batch size 3 does not divide the sample counts (7, 11, 13)
    assert x.shape[0] % 3 != 0
    H = autograd_kernel_hessian(model, "last", x, y)
    ref = dense_measures(H, model.last.weight.detach())
    blocks = ref["block_traces"]
    calls = []  # which patch Gram ran: the forced one must be the one measured
    for cls in (_PhaseGram, _GatheredGram):  # observe the calls, change nothing
        orig = cls.__call__
        monkeypatch.setattr(cls, "__call__", lambda self, *a, _o=orig, _c=cls:
                            calls.append(_c) or _o(self, *a))
    grouped = model.last.groups > 1
    for route, gram_from in [("auto", "auto"), ("gram", "phases"), ("gram", "patches"),
                             ("direct", "auto")]:
        calls.clear()
        res = exact_curvature(model, (x, y), layer="last", device="cpu", batch_size=3,
                              route=route, options=CurvatureOptions(gram_from=gram_from))
        expect = {"phases": {_PhaseGram}, "patches": {_GatheredGram}}
        if route == "gram" and not grouped:
            assert set(calls) == expect[gram_from], (route, gram_from)
        if route == "direct" or grouped:
            assert not calls and res.route == "direct"
        assert res.n_samples == x.shape[0]
        assert rel(res.trace, ref["trace"]) <= 1e-9, (route, gram_from)
        assert rel(res.relative_flatness, ref["relative_flatness"]) <= 1e-9, (route, gram_from)
        err = (res.block_traces - blocks).abs() / blocks.abs().clamp_min(1e-300)
        # every block trace to 1e-9 relative, or to 1e-12 of the largest where a block is ~0
        ok = (err <= 1e-9) | ((res.block_traces - blocks).abs() <= 1e-12 * blocks.abs().max())
        assert bool(ok.all()), f"{route}/{gram_from}: worst block error {float(err.max()):.2e}"


GEOMETRIES = [
    # kernel, stride, dilation, padding, padding_mode, input (H, W)
    ((3, 3), (1, 1), (1, 1), (1, 1), "zeros", (6, 6)),
    ((3, 3), (2, 2), (1, 1), (1, 1), "zeros", (8, 8)),
    ((3, 3), (2, 2), (1, 1), (1, 1), "zeros", (7, 9)),  # odd sizes: phases of unequal size
    ((3, 3), (2, 2), (2, 2), (2, 2), "zeros", (9, 8)),  # every offset in one phase
    ((2, 3), (3, 3), (1, 1), (1, 1), "zeros", (8, 8)),  # one phase per offset
    ((1, 1), (2, 2), (1, 1), (0, 0), "zeros", (7, 6)),  # a 1 x 1 shortcut: one phase of four
    ((5, 2), (1, 3), (2, 1), (3, 0), "zeros", (9, 7)),
    ((3, 3), (1, 1), (1, 1), "same", "zeros", (5, 6)),
    ((2, 2), (1, 1), (1, 1), "same", "zeros", (5, 4)),  # asymmetric "same" padding
    ((3, 3), (2, 1), (1, 1), (1, 1), "reflect", (7, 6)),
    ((3, 3), (1, 1), (1, 1), (1, 1), "circular", (5, 5)),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_phase_gram_equals_gram_of_unfolded_patches(geom):
    """The patch Gram from the input's stride phases against U^T U from ``F.unfold`` (torch's
    own im2col, which orders patches like ``W.view(C, -1)``), float64."""
    kernel, stride, dilation, padding, mode, hw = geom
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, kernel, stride=stride, dilation=dilation,
                                  padding=padding, padding_mode=mode),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net = net.double()
    conv = net[0]
    X = torch.randn(5, 3, *hw, dtype=torch.float64)
    # the phases also where gathered patches would be cheaper
    plan = _Plan(net, find_head(net), torch.device("cpu"), torch.float64,
                 CurvatureOptions(gram_from="phases"))
    Ho, Wo = conv(X).shape[2:]
    pg = plan.gram(hw[0], hw[1], Ho, Wo)
    assert isinstance(pg, _PhaseGram)
    Q = pg(pg.prepare(X), _Workspace(torch.device("cpu"), torch.float64))
    # reference: pad as the conv does (F.pad for the non-zero modes), then unfold
    if isinstance(padding, str) or mode != "zeros":
        Xp = F.pad(X, conv._reversed_padding_repeated_twice,
                   mode="constant" if mode == "zeros" else mode)
        U = F.unfold(Xp, kernel, dilation=dilation, stride=stride)
    else:
        U = F.unfold(X, kernel, dilation=dilation, padding=padding, stride=stride)
    assert U.shape[2] == Ho * Wo
    torch.testing.assert_close(Q, U.transpose(1, 2) @ U, rtol=1e-13, atol=1e-13)


CHUNK_CASES = [c for c in SUITE if c.name in (
    "silu+bn+residual, no bias", "relu6, groups 3", "silu+bn, K=10", "gelu, reflect padding")]


@pytest.mark.parametrize("case", CHUNK_CASES, ids=[c.name for c in CHUNK_CASES])
def test_chunks_of_one_sample_match_dense_autograd_hessian(case):
    """chunk_bytes=1 runs the head, the patches and the products one sample at a time,
    slicing the residual branch (an external of the head) with the conv output."""
    assert len(CHUNK_CASES) == 4
    model, x, y = build_case(case, seed=4)
    H = autograd_kernel_hessian(model, "last", x, y)
    ref = dense_measures(H, model.last.weight.detach())
    for route in ("gram", "direct"):
        res = exact_curvature(model, (x, y), layer="last", device="cpu", batch_size=5,
                              route=route, chunk_bytes=1)
        assert rel(res.trace, ref["trace"]) <= 1e-9
        assert rel(res.relative_flatness, ref["relative_flatness"]) <= 1e-9
        torch.testing.assert_close(res.block_traces, ref["block_traces"], rtol=1e-9,
                                   atol=1e-12 * float(ref["block_traces"].abs().max()))


@pytest.mark.parametrize("tiles", ["one row each", "as on CUDA"])
@pytest.mark.parametrize("outer_gemm", [True, False])
@pytest.mark.parametrize("class_sum", ["accumulated", "per chunk"])
def test_gauss_newton_sum_strategies_match_dense_autograd(monkeypatch, outer_gemm, class_sum,
                                                          tiles):
    """Both ways of the ``m m^T`` term and both ways of the class sum, on the upper triangle
    of JJ formed one row of filters at a time or in the few tiles used on CUDA (no byte
    budget), give the exact blocks; the options really select them."""
    options = CurvatureOptions(
        outer_by_gemm=outer_gemm, tile_bytes=1 if tiles == "one row each" else None,
        class_sum_max_bytes=0 if class_sum == "per chunk" else 256 * 2**20)
    seen = []  # (tiles, accumulated, outer GEMM) of every sum that ran: observation only
    orig = _GaussNewtonSum.add

    def add(self, *args):
        orig(self, *args)
        seen.append((len(self.tiles), self.R is not None, self.outer_gemm))

    monkeypatch.setattr(_GaussNewtonSum, "add", add)
    # 7 filters: four tiles of 2, 2, 2 and 1 rows in the CUDA layout
    case = Case("relu, K=10, no bias, 7 filters",
                {"act": "relu", "classes": 10, "bias": False, "filters": 7}, n=13)
    model, x, y = build_case(case, seed=6)
    H = autograd_kernel_hessian(model, "last", x, y)
    ref = dense_measures(H, model.last.weight.detach())
    res = exact_curvature(model, (x, y), layer="last", device="cpu", batch_size=4,
                          route="gram", chunk_bytes=20000, options=options)
    expect = (7 if tiles == "one row each" else 4, class_sum == "accumulated", outer_gemm)
    assert seen and set(seen) == {expect}
    assert rel(res.trace, ref["trace"]) <= 1e-9
    torch.testing.assert_close(res.block_traces, ref["block_traces"], rtol=1e-9,
                               atol=1e-12 * float(ref["block_traces"].abs().max()))
    # float32 products, float64 sums: float32 rounding, nothing more
    r32 = exact_curvature(model.float(), (x.float(), y), layer="last", device="cpu",
                          batch_size=4, route="gram", chunk_bytes=20000, dtype=torch.float32,
                          options=options)
    assert rel(r32.trace, ref["trace"]) <= 1e-5
    assert rel(r32.relative_flatness, ref["relative_flatness"]) <= 1e-5


def test_options_are_checked_and_default_to_the_documented_values():
    assert CurvatureOptions() == CurvatureOptions(
        gram_from="auto", tile_bytes=4 * 2**20, min_tiles=4, class_sum_max_bytes=256 * 2**20,
        outer_by_gemm=None)
    for bad in ({"gram_from": "unfold"}, {"tile_bytes": 0}, {"min_tiles": 0},
                {"class_sum_max_bytes": -1}, {"outer_by_gemm": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            CurvatureOptions(**bad)
    # options change how, not what: one tile, patches, in-tile outer term agree with defaults
    model, x, y = build_case(SUITE[2], seed=3)
    a = exact_curvature(model, (x, y), device="cpu", route="gram")
    b = exact_curvature(model, (x, y), device="cpu", route="gram", options=CurvatureOptions(
        gram_from="patches", min_tiles=1, tile_bytes=None, outer_by_gemm=False))
    assert rel(b.trace, a.trace) < 1e-12
    assert rel(b.relative_flatness, a.relative_flatness) < 1e-12


class _SizeInHead(nn.Module):
    """The head reshapes with the input's batch size, an external that is not a tensor: the
    head must then run on the whole batch (a chunk would be reshaped to the wrong size)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.last = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        n = x.size(0)
        h = F.gelu(self.last(torch.tanh(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(h, 1).view(n, -1))


def test_head_with_batch_size_external_runs_on_whole_batch():
    torch.manual_seed(5)
    model = _SizeInHead().double()
    x = torch.randn(7, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    H = autograd_kernel_hessian(model, "last", x, y)
    ref = dense_measures(H, model.last.weight.detach())
    res = exact_curvature(model, (x, y), device="cpu", batch_size=4, chunk_bytes=1)
    assert res.layer == "last"
    assert rel(res.trace, ref["trace"]) <= 1e-9
    assert rel(res.relative_flatness, ref["relative_flatness"]) <= 1e-9


def test_auto_head_detection_finds_last_conv_in_suite():
    model, _, _ = build_case(SUITE[0])
    assert find_head(model).conv_name == "last"
    model, _, _ = build_case(next(c for c in SUITE if "residual" in c.name))
    # the residual conv is as deep as `last` but runs first: the later one is chosen
    assert find_head(model).conv_name == "last"


def test_gram_and_direct_routes_agree():
    for case in (SUITE[2], SUITE[7], SUITE[15]):
        model, x, y = build_case(case, seed=3)
        g = exact_curvature(model, (x, y), device="cpu", route="gram")
        d = exact_curvature(model, (x, y), device="cpu", route="direct")
        assert g.route == "gram" and d.route == "direct"
        assert rel(g.trace, d.trace) < 1e-12
        assert rel(g.relative_flatness, d.relative_flatness) < 1e-12
        torch.testing.assert_close(g.block_traces, d.block_traces, rtol=1e-11, atol=1e-15)


def test_data_forms_and_batching_agree_and_mode_is_restored():
    model, x, y = build_case(SUITE[5], seed=2)  # with BatchNorm
    model.train()
    stats = model.bn.running_mean.clone()
    a = exact_curvature(model, (x, y), device="cpu", batch_size=2)
    b = exact_curvature(model, DataLoader(TensorDataset(x, y), batch_size=4), device="cpu")
    c = exact_curvature(model, [(x[:1], y[:1]), (x[1:], y[1:])], device="cpu")
    for r in (b, c):
        assert rel(r.trace, a.trace) < 1e-12
        assert rel(r.relative_flatness, a.relative_flatness) < 1e-12
    assert model.training and model.bn.training
    torch.testing.assert_close(model.bn.running_mean, stats)
    # measured in eval mode: equal to the autograd Hessian of the eval-mode model
    H = autograd_kernel_hessian(model, "last", x, y)
    assert rel(a.trace, float(H.diagonal().sum())) < 1e-9


def test_classifier_measures_match_autograd():
    model, x, y = build_case(SUITE[3], seed=4)  # SiLU
    res = exact_curvature(model, (x, y), device="cpu")
    Hv = autograd_kernel_hessian(model, "fc", x, y)
    assert rel(res.classifier_trace, float(Hv.diagonal().sum())) < 1e-10
    V = model.fc.weight.detach()
    K, C = V.shape
    blocks = torch.einsum("aibi->ab", Hv.reshape(K, C, K, C))  # neuron-by-neuron blocks
    kappa_v = float(((V @ V.T) * blocks).sum())
    assert rel(res.classifier_relative_flatness, kappa_v) < 1e-10
    # the loss and accuracy it reports are those of the model
    logits = model.eval()(x).detach()
    assert rel(res.loss, float(F.cross_entropy(logits, y))) < 1e-12
    assert res.accuracy == pytest.approx(float((logits.argmax(1) == y).double().mean()))


def test_gauss_newton_part_equals_trace_only_for_piecewise_linear():
    relu, x, y = build_case(SUITE[0], seed=5)
    r = exact_curvature(relu, (x, y), device="cpu")
    assert rel(r.gauss_newton_trace, r.trace) < 1e-12
    gelu, x, y = build_case(SUITE[2], seed=5)
    g = exact_curvature(gelu, (x, y), device="cpu")
    assert rel(g.gauss_newton_trace, g.trace) > 1e-6  # the sigma'' term is really there


# ---------------------------------------------------------------------------- invariances


def _relu_model(seed=0, **kw):
    case = next(c for c in SUITE if c.name == "relu")
    case = type(case)(case.name, {**case.kwargs, **kw}, case.n, case.hw)
    return build_case(case, seed)


def test_filter_rescaling_keeps_kappa_and_moves_trace():
    model, x, y = _relu_model(seed=6)
    before = exact_curvature(model, (x, y), device="cpu")
    alpha = torch.tensor([0.5, 2.0, 3.0, 0.25], dtype=torch.float64)
    scaled = copy.deepcopy(model)
    with torch.no_grad():
        scaled.last.weight.mul_(alpha.view(-1, 1, 1, 1))
        scaled.last.bias.mul_(alpha)
        scaled.fc.weight.div_(alpha.view(1, -1))
    torch.testing.assert_close(scaled(x), model(x))  # the function is unchanged
    after = exact_curvature(scaled, (x, y), device="cpu")
    assert rel(after.relative_flatness, before.relative_flatness) < 1e-10
    assert rel(after.trace, before.trace) > 0.1
    # block (c, c') scales by 1/(alpha_c alpha_c')
    expected = before.block_traces / (alpha[:, None] * alpha[None, :])
    torch.testing.assert_close(after.block_traces, expected, rtol=1e-9, atol=1e-15)


def test_batchnorm_rescaling_keeps_kappa():
    model, x, y = _relu_model(seed=7, bn=True)
    before = exact_curvature(model, (x, y), device="cpu")
    a = 3.0
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.last.weight.mul_(a)
        m.last.bias.mul_(a)
        m.bn.running_mean.mul_(a)
        m.bn.running_var.mul_(a * a)
    m.bn.eps *= a * a  # so that var + eps scales by a^2 exactly
    torch.testing.assert_close(m.eval()(x), model.eval()(x))
    after = exact_curvature(m, (x, y), device="cpu")
    assert rel(after.relative_flatness, before.relative_flatness) < 1e-10
    assert rel(after.trace, before.trace * a**-2) < 1e-10


def test_bn_affine_and_classifier_rescaling_keeps_both():
    model, x, y = _relu_model(seed=8, bn=True)
    before = exact_curvature(model, (x, y), device="cpu")
    alpha = torch.tensor([2.0, 0.5, 1.5, 4.0], dtype=torch.float64)
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.bn.weight.mul_(alpha)
        m.bn.bias.mul_(alpha)
        m.fc.weight.div_(alpha.view(1, -1))
    after = exact_curvature(m, (x, y), device="cpu")
    assert rel(after.trace, before.trace) < 1e-10
    assert rel(after.relative_flatness, before.relative_flatness) < 1e-10


class _Scale(nn.Module):
    def __init__(self, s):
        super().__init__()
        self.register_buffer("s", s)

    def forward(self, x):
        return x * self.s


def test_input_map_scaling_keeps_kappa_per_channel_scaling_does_not():
    model, x, y = _relu_model(seed=9)
    before = exact_curvature(model, (x, y), device="cpu")
    lam = 2.5
    m = copy.deepcopy(model)
    m.act0 = nn.Sequential(nn.Tanh(), _Scale(torch.tensor(lam, dtype=torch.float64)))
    with torch.no_grad():
        m.last.weight.div_(lam)
    torch.testing.assert_close(m(x), model(x))
    after = exact_curvature(m, (x, y), device="cpu")
    assert rel(after.relative_flatness, before.relative_flatness) < 1e-10
    assert rel(after.trace, before.trace * lam**2) < 1e-10
    # one input channel j scaled: function preserved, but both measures move
    s = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64).view(1, -1, 1, 1)
    m2 = copy.deepcopy(model)
    m2.act0 = nn.Sequential(nn.Tanh(), _Scale(s))
    with torch.no_grad():
        m2.last.weight.div_(s)
    torch.testing.assert_close(m2(x), model(x))
    after2 = exact_curvature(m2, (x, y), device="cpu")
    assert rel(after2.relative_flatness, before.relative_flatness) > 1e-3
    assert rel(after2.trace, before.trace) > 1e-3


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_kappa_is_trace_of_hessian_in_shared_patch_perturbation(act):
    """kappa = Tr of the Hessian in A of L(W (I + A)) at A = 0 (feature robustness)."""
    model, x, y = _relu_model(seed=10, act=act)
    res = exact_curvature(model, (x, y), device="cpu")
    W = model.last.weight.detach()
    C, d = W.shape[0], W[0].numel()

    def loss(A):
        Wa = (W.reshape(C, d) @ (torch.eye(d, dtype=W.dtype) + A)).reshape(W.shape)
        return F.cross_entropy(functional_call(model, {"last.weight": Wa}, (x,)), y)

    HA = torch.autograd.functional.hessian(loss, torch.zeros(d, d, dtype=W.dtype))
    assert rel(float(HA.reshape(d * d, d * d).diagonal().sum()), res.relative_flatness) < 1e-9


# ---------------------------------------------------------------------------- torchvision


@pytest.mark.parametrize(
    "arch,expected",
    [("resnet18", "layer4.1.conv2"), ("resnet50", "layer4.2.conv3"),
     ("mobilenet_v2", "features.18.0")],
)
def test_torchvision_heads_are_found(arch, expected):
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    head = find_head(model)
    assert head.conv_name == expected
    assert head.linear_name in ("fc", "classifier.1")
    assert head.piecewise_linear  # ReLU / ReLU6 heads


def test_mobilenet_v2_runs_and_gram_direct_agree():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=5)
    x, y = torch.randn(3, 3, 64, 64), torch.tensor([0, 3, 4])
    g = exact_curvature(model, (x, y), device="cpu", route="gram")
    d = exact_curvature(model, (x, y), device="cpu", route="direct")
    assert g.layer == "features.18.0" and g.trace > 0 and g.relative_flatness > 0
    assert rel(g.trace, d.trace) < 1e-10


def test_resnet18_trace_matches_backpack_exact_ggn_diagonal():
    """At scale: Tr H of layer4.1.conv2 (ReLU head, so H = GGN) against BackPACK's exact GGN
    diagonal summed over that kernel, float64, 64 x 64 inputs (last map 2 x 2)."""
    import torchvision
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # BackPACK builds helper convs in the default dtype
    try:
        torch.manual_seed(0)
        model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
        x = torch.randn(3, 3, 64, 64)
        y = torch.tensor([1, 7, 3])
        ours = exact_curvature(model, (x, y), device="cpu", batch_size=2)
        ext = extend(copy.deepcopy(model), use_converter=True)
        loss = extend(nn.CrossEntropyLoss())(ext(x), y)
        with backpack(DiagGGNExact()):
            loss.backward()
        oracle = {n: p for n, p in ext.named_parameters()}
        key = next(n for n in oracle if n.replace("_", ".").startswith("layer4.1.conv2"))
        ref = float(oracle[key].diag_ggn_exact.sum())
    finally:
        torch.set_default_dtype(old)
    assert ours.layer == "layer4.1.conv2"
    assert rel(ours.trace, ref) < 1e-6


def test_float32_model_measured_in_float64_close_to_float64_model():
    model, x, y = build_case(SUITE[3], seed=11)
    ref = exact_curvature(model, (x, y), device="cpu")
    m32 = copy.deepcopy(model).float()
    r32 = exact_curvature(m32, (x.float(), y), device="cpu")
    assert rel(r32.trace, ref.trace) < 1e-5
    assert next(m32.parameters()).dtype == torch.float32  # the model is not converted


def test_head_batch_quantities():
    model, x, y = build_case(SUITE[3], seed=12)
    head = find_head(model)
    hb = head_batch(model, head, x, y)
    B, _C, P = hb.S.shape
    assert hb.patches.shape == (B, P, model.last.weight[0].numel())
    torch.testing.assert_close(hb.logits, model.eval()(x))
    torch.testing.assert_close(hb.probs.sum(1), torch.ones(B, dtype=torch.float64))


# ---------------------------------------------------------------------------- refusals


class _MaxPoolAfter(SmallGapNet):
    def __init__(self):
        super().__init__()
        self.mp = nn.MaxPool2d(2)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.mp(self.act(self.last(self.act0(self.stem(x))))))))


class _ConvAfter(SmallGapNet):
    def __init__(self):
        super().__init__()
        self.extra = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        h = self.act(self.last(self.act0(self.stem(x))))
        return self.fc(self.flat(self.pool(self.extra(h))))


class _MLPHead(SmallGapNet):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.flat(self.pool(self.act(self.last(self.act0(self.stem(x))))))
        return self.fc(torch.relu(self.hidden(h)))


class _SqueezeExcite(SmallGapNet):
    def __init__(self):
        super().__init__()
        self.se = nn.Linear(4, 4)

    def forward(self, x):
        h = self.act(self.last(self.act0(self.stem(x))))
        s = torch.sigmoid(self.se(h.mean((2, 3)))).view(-1, 4, 1, 1)
        return self.fc(self.flat(self.pool(h * s)))


class _BatchStatsBN(SmallGapNet):
    """Eval BatchNorm without running statistics normalizes by the batch: not per-sample."""

    def __init__(self):
        super().__init__(bn=True)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)


class _Untraceable(SmallGapNet):
    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return super().forward(x)


@pytest.mark.parametrize(
    "cls,pattern",
    [
        (_MaxPoolAfter, "MaxPool2d module 'mp'"),
        (_ConvAfter, "second convolution"),
        (_MLPHead, "'relu'.* follows the classifier 'hidden'.*MLP head"),
        (_SqueezeExcite, "'sigmoid'.* follows the classifier 'se'.*squeeze-and-excitation"),
        (_Untraceable, "could not trace"),
        (_BatchStatsBN, "BatchNorm2d module 'bn'.*statistics of the batch"),
    ],
)
def test_out_of_class_models_are_refused_naming_the_op(cls, pattern):
    model = cls().double()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    with pytest.raises(OutOfClassError, match=pattern):
        exact_curvature(model, (x, torch.tensor([0, 1])), device="cpu", layer=(
            None if cls is _Untraceable else "last"))


def test_auto_detection_refuses_with_the_reason():
    with pytest.raises(OutOfClassError, match="MaxPool2d"):
        find_head(_MaxPoolAfter())


def test_bad_layer_names_and_data():
    model, x, y = build_case(SUITE[0])
    with pytest.raises(OutOfClassError, match="not a module"):
        find_head(model, layer="nope")
    with pytest.raises(OutOfClassError, match="BatchNorm2d|Identity|not an nn.Conv2d"):
        find_head(model, layer="bn")
    with pytest.raises(ValueError, match="empty"):
        exact_curvature(model, (x[:0], y[:0]), device="cpu")
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        exact_curvature(model, (x, y + 5), device="cpu")
    with pytest.raises(ValueError, match="differ in length"):
        exact_curvature(model, (x, y[:2]), device="cpu")
    bad = copy.deepcopy(model)
    xb = x.clone()
    batches = [(x[:3], y[:3]), (xb[3:], y[3:])]
    with torch.no_grad():
        bad.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite logits in batch 0"):
        exact_curvature(bad, batches, device="cpu")
    xb[4] = float("inf")
    with pytest.raises(ValueError, match="non-finite logits in batch 1"):
        exact_curvature(model, [(x[:3], y[:3]), (xb[3:], y[3:])], device="cpu")


# ------------------------------------------------ the class as it is: new forms, same exactness


class _FunctionalBN(nn.Module):
    """Eval batch norm as a functional call that reads ``self.training`` (as timm's
    BatchNormAct2d does), then swish written as ``x * x.sigmoid()``: a product of two tensors
    that both depend on the conv, elementwise and smooth."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.last = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = self.last(torch.tanh(self.stem(x)))
        n = self.norm
        h = F.batch_norm(a, n.running_mean, n.running_var, n.weight, n.bias,
                         self.training, 0.1, n.eps)
        h = h * h.sigmoid()
        return self.fc(h.mean((2, 3)))


class _DenseCat(nn.Module):
    """A DenseNet-like head: the conv's output concatenated along the channels with tensors
    that do not depend on its kernel (before and after it, and a nested concatenation), then
    BN, leaky ReLU, GAP and a classifier on all 3 + 4 + 2 + 3 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.other = nn.Conv2d(3, 2, 1)
        self.last = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        inner = torch.cat([h, self.last(h), self.other(h)], 1)
        out = torch.cat((inner, h * 0.5), dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.leaky_relu(self.bn(out), 0.1), 1), 1))


class _ConvClassifier(nn.Module):
    """dla34's head: GAP keeping the 1x1 map, a 1x1 conv as the classifier, flatten after."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.last = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(4, 3, 1)
        self.flat = nn.Flatten(1)

    def forward(self, x):
        h = F.silu(self.bn(self.last(torch.tanh(self.stem(x)))))
        return self.flat(self.fc(self.pool(h)))


def _randomize_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, generator=g, dtype=m.weight.dtype) * .3)
                m.running_var.copy_(torch.rand(C, generator=g, dtype=m.running_var.dtype) + .5)
                m.weight.copy_(torch.randn(C, generator=g, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(C, generator=g, dtype=m.bias.dtype) * 0.3)
    return model


def _check_against_dense(model, x, y, layer="last"):
    """exact_curvature (both routes, chunks of 3) against the dense float64 Hessian."""
    H = autograd_kernel_hessian(model, layer, x, y)
    ref = dense_measures(H, model.get_submodule(layer).weight.detach())
    assert ref["trace"] != 0
    for route in ("gram", "direct"):
        res = exact_curvature(model, (x, y), device="cpu", batch_size=3, route=route,
                              layer=layer)
        assert rel(res.trace, ref["trace"]) <= 1e-9, route
        assert rel(res.relative_flatness, ref["relative_flatness"]) <= 1e-9, route
        torch.testing.assert_close(res.block_traces, ref["block_traces"], rtol=1e-9,
                                   atol=1e-12 * float(ref["block_traces"].abs().max()))
    return res


def _check_classifier(model, res, x, y, name="fc"):
    """The classifier's trace and kappa against its dense Hessian (all its features)."""
    Hv = autograd_kernel_hessian(model, name, x, y)
    V = model.get_submodule(name).weight.detach()
    K = V.shape[0]
    V = V.reshape(K, -1)
    blocks = torch.einsum("aibi->ab", Hv.reshape(K, V.shape[1], K, V.shape[1]))
    assert rel(res.classifier_trace, float(Hv.diagonal().sum())) < 1e-10
    assert rel(res.classifier_relative_flatness, float(((V @ V.T) * blocks).sum())) < 1e-10


@pytest.mark.parametrize("cls", [_FunctionalBN, _DenseCat, _ConvClassifier])
def test_new_head_forms_match_dense_autograd_hessian(cls):
    torch.manual_seed(11)
    model = _randomize_norms(cls().double(), seed=12)
    g = torch.Generator().manual_seed(13)
    x = torch.randn(7, 2, 5, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    model.train()  # traced and measured as in eval mode whatever mode it comes in
    res = _check_against_dense(model, x, y)
    if cls is _DenseCat:  # the other conv of the concatenation, at channel offset 7
        _check_against_dense(model, x, y, layer="other")
    assert model.training
    _check_classifier(model, res, x, y)
    head = find_head(model, layer="last")
    assert head.linear_name == "fc"
    # the smooth heads keep their sigma'' part, the leaky ReLU one has none
    assert head.piecewise_linear is (cls is _DenseCat)


def test_batch_statistics_in_functional_batch_norm_are_refused():
    class _TrainBN(_FunctionalBN):
        def forward(self, x):
            a = self.last(torch.tanh(self.stem(x)))
            h = F.batch_norm(a, None, None, self.norm.weight, self.norm.bias, True)
            return self.fc(h.mean((2, 3)))

    with pytest.raises(OutOfClassError, match="'batch_norm'.*statistics of the batch"):
        find_head(_TrainBN(), layer="last")


class _SEBeforePool(_ConvClassifier):
    """timm's squeeze-and-excitation: reduce and expand as 1x1 convs on the pooled map."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.reduce, self.expand = nn.Conv2d(4, 2, 1), nn.Conv2d(2, 4, 1)

    def forward(self, x):
        h = self.bn(self.last(torch.tanh(self.stem(x))))
        s = self.expand(F.relu(self.reduce(h.mean((2, 3), keepdim=True))))
        return self.fc(self.flat(self.pool(h * s.sigmoid())))


class _ConvHeadMLP(_ConvClassifier):
    """MobileNetV3's head: GAP, a 1x1 conv, an activation, then the Linear: an MLP head."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(3, 2)

    def forward(self, x):
        h = self.bn(self.last(torch.tanh(self.stem(x))))
        return self.out(self.flat(F.hardswish(self.fc(self.pool(h)))))


class _ChannelNorm(_ConvClassifier):
    """LayerNorm across the channels after the conv (a GroupNorm of one group)."""

    def __init__(self):
        super().__init__()
        self.ln = nn.GroupNorm(1, 4)

    def forward(self, x):
        h = self.ln(self.last(torch.tanh(self.stem(x))))
        return self.flat(self.fc(self.pool(h)))


class _CatTwice(_DenseCat):
    def forward(self, x):
        h = torch.tanh(self.stem(x))
        a = self.last(h)
        return self.fc(torch.cat([a, a, h, h[:, :1]], 1).mean((2, 3)))


class _CatSpatial(_DenseCat):
    def forward(self, x):
        h = torch.tanh(self.stem(x))
        out = torch.cat([self.last(h), h[:, :4]], 2)
        return self.fc(torch.cat([out, out[:, :1].detach() * 0, h], 1).mean((2, 3))[:, :12])


class _ShiftedSum(_DenseCat):
    """Two concatenations that put the conv's channels at different offsets, then added:
    channel c of the sum mixes filters c and c + 2."""

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        a = self.last(h)
        o = self.other(h)
        s = torch.cat([o, a, h[:, :1], h[:, :1]], 1) + torch.cat([a, o, h[:, :2]], 1)
        return self.fc(torch.cat([s, o[:, :1], o[:, :1], o[:, :1], o[:, :1]], 1).mean((2, 3)))


class _ChannelSplit(_DenseCat):
    """DPN's dual path: the conv's channels split in two slices that land apart."""

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        a = self.last(h)
        out = torch.cat([a[:, :2] + h[:, :2], h, a[:, 2:], h[:, :2], h[:, :3]], 1)
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize(
    "cls,pattern",
    [
        (_ChannelSplit, "'getitem'.*indexes or slices the conv's output"),
        (_SEBeforePool, "ReLU|'relu'.* follows the classifier 'reduce'.*squeeze-and-excitation"),
        (_ConvHeadMLP, "'hardswish'.* follows the classifier 'fc'.*MLP head"),
        (_ChannelNorm, "GroupNorm module 'ln' normalizes across the channels"),
        (_CatTwice, "'cat'.*concatenates the conv's output other than once"),
        (_CatSpatial, "'cat'.*concatenates the conv's output other than once along the channels"),
        (_ShiftedSum, "'add'.*combines two tensors that both depend on the conv"),
    ],
)
def test_what_is_truly_out_is_refused_naming_the_op(cls, pattern):
    with pytest.raises(OutOfClassError, match=pattern):
        find_head(cls(), layer="last")


def test_zero_gamma_norm_gives_zero_trace_and_a_warning_that_names_it():
    from convflat.curvature import ZeroCurvatureWarning

    model, x, y = build_case(next(c for c in SUITE if c.name == "relu+bn+residual"), seed=2)
    with torch.no_grad():
        model.bn.weight.zero_()  # as timm's zero_init_last does
    H = autograd_kernel_hessian(model, "last", x, y)
    assert not bool(H.any())  # the reference: the loss does not depend on the kernel
    with pytest.warns(ZeroCurvatureWarning, match="BatchNorm 'bn'.*gamma = 0.*timm"):
        res = exact_curvature(model, (x, y), device="cpu")
    assert res.trace == 0 and not bool(res.block_traces.any())
    with torch.no_grad():
        model.bn.weight.fill_(0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroCurvatureWarning)
        assert exact_curvature(model, (x, y), device="cpu").trace > 0
