"""BatchNorm folding of the norm measures and PAC-Bayes, and converged sharpness, against
references written here.

Everything the measures compute is recomputed in this file from first principles: the folded
net is built by hand from the BatchNorm formula, every convolution becomes an explicit dense
matrix built by index loops (not by a conv call), and the path norm, Frobenius norm, distance
from init and spectral norms are taken on those matrices. The nets are the quick study's
``gapcnn`` (width 8, depth 3) with and without BatchNorm, trained briefly on scikit-learn's
digits so that the running statistics and affine parameters are far from the identity.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from fitting import fit_full_batch
from torch import nn

from convflat.errors import OptionError
from convflat.measures import MEASURES
from convflat.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def digits(n: int = 300):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n], dtype=torch.float64).unsqueeze(1) / 16.0
    return (x - 0.3) / 0.4, torch.tensor(d.target[:n])


def gapcnn(batchnorm: bool) -> nn.Module:
    return build_model({"family": "gapcnn", "in_channels": 1, "num_classes": 10,
                        "image_size": [8, 8], "width": 8, "depth": 3, "batchnorm": batchnorm})


def train(model: nn.Module, x, y, steps: int = 120) -> nn.Module:
    """Seeded full-batch Adam; returned in float64 eval mode."""
    return fit_full_batch(model, x, y, steps=steps, seed=0)


@pytest.fixture(scope="module")
def nets():
    """{batchnorm: (trained model, init model)}, float64."""
    x, y = digits()
    out = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets: one thread (see conftest's one_thread)
    for bn in (True, False):
        torch.manual_seed(3)
        model = gapcnn(bn)
        init = copy.deepcopy(model).double().eval()
        model = train(model, x, y)
        acc = float((model(x).argmax(1) == y).double().mean())
        assert acc > 0.8, f"batchnorm={bn}: training failed, accuracy {acc:.2f}"
        out[bn] = (model, init)
    torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------ the reference, by hand


def hand_fold(model: nn.Module) -> list[dict[str, torch.Tensor | int]]:
    """The gapcnn as a list of layers {"w", "b", "stride"} (convs, BatchNorm folded by its
    eval formula) followed by {"w", "b"} of the classifier."""
    layers = []
    for block in model.features:
        conv = block.conv
        w = conv.weight.detach().double().clone()
        b = (conv.bias.detach().double().clone() if conv.bias is not None
             else torch.zeros(w.shape[0], dtype=torch.float64))
        bn = getattr(block, "bn", None)
        if bn is not None:
            s = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
            w = w * s[:, None, None, None]
            b = (b - bn.running_mean.double()) * s + bn.bias.detach().double()
        layers.append({"w": w, "b": b, "stride": conv.stride[0]})
    lin = model.classifier
    layers.append({"w": lin.weight.detach().double().clone(),
                   "b": lin.bias.detach().double().clone()})
    return layers


def conv_matrix(w: torch.Tensor, hw: int, stride: int, pad: int = 1):
    """Dense matrix of a square zero-padded convolution on (C_in, hw, hw) inputs (row-major
    flattening), built entry by entry from the kernel; returns (matrix, output side)."""
    co, ci, k, _ = w.shape
    ho = (hw + 2 * pad - k) // stride + 1
    m = torch.zeros(co * ho * ho, ci * hw * hw, dtype=torch.float64)
    rows = torch.arange(co) * ho * ho
    cols = torch.arange(ci) * hw * hw
    for i in range(ho):
        for j in range(ho):
            for u in range(k):
                for v in range(k):
                    r, q = i * stride + u - pad, j * stride + v - pad
                    if 0 <= r < hw and 0 <= q < hw:
                        out_idx, in_idx = rows + i * ho + j, cols + r * hw + q
                        m[out_idx[:, None], in_idx[None, :]] = w[:, :, u, v]
    return m, ho


def matrices(layers, hw: int = 8):
    """[(matrix, bias repeated over positions, positions)] of the convs, and the classifier."""
    out = []
    for layer in layers[:-1]:
        m, ho = conv_matrix(layer["w"], hw, layer["stride"])
        out.append((m, layer["b"].repeat_interleave(ho * ho), ho * ho))
        hw = ho
    return out, (layers[-1]["w"], layers[-1]["b"])


def forward_by_matrices(layers, x: torch.Tensor) -> torch.Tensor:
    convs, (wl, bl) = matrices(layers, x.shape[-1])
    h = x.reshape(x.shape[0], -1).T  # (features, batch)
    for m, b, _ in convs:
        h = torch.relu(m @ h + b[:, None])
    pos = convs[-1][2]
    pooled = h.reshape(-1, pos, h.shape[1]).mean(1)  # global average pooling
    return (wl @ pooled + bl[:, None]).T


def path_norm_by_definition(layers, hw: int = 8) -> float:
    r"""Path norm with biases (Neyshabur et al. 2015): the sum, over every path from an input
    pixel or a bias unit to an output, of the product of the squared weights on it, with the
    pooling's fixed 1/P weights unsquared (they are not parameters). A dynamic programme over
    the squared matrices: v_l = (M_l^2) v_{l-1} + b_l^2 with v_0 = 1."""
    convs, (wl, bl) = matrices(layers, hw)
    v = torch.ones(convs[0][0].shape[1], dtype=torch.float64)
    for m, b, _ in convs:
        v = (m**2) @ v + b**2
    pooled = v.reshape(-1, convs[-1][2]).mean(1)
    return float(((wl**2) @ pooled + bl**2).sum())


def frobenius_by_hand(layers) -> float:
    return math.sqrt(sum(float((layer["w"] ** 2).sum()) for layer in layers))


def spectral_by_hand(layers, hw: int = 8) -> list[float]:
    convs, (wl, _) = matrices(layers, hw)
    return [float(torch.linalg.matrix_norm(m, ord=2)) for m, _, _ in convs] + [
        float(torch.linalg.matrix_norm(wl, ord=2))]


def rescale_conv_and_stats(model: nn.Module, a_per_layer: list[torch.Tensor]) -> nn.Module:
    """Filter c of conv l times a_l[c], the running mean times a_l[c], and the running variance
    set so that sqrt(var + eps) is multiplied by exactly a_l[c] (var -> a^2 (var + eps) - eps,
    i.e. var times a^2 up to BatchNorm's eps): the eval function does not change."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for block, a in zip(out.features, a_per_layer, strict=True):
            block.conv.weight.mul_(a[:, None, None, None])
            block.bn.running_mean.mul_(a)
            block.bn.running_var.copy_(a**2 * (block.bn.running_var + block.bn.eps)
                                       - block.bn.eps)
    return out


def factors(model: nn.Module, kind: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for block in model.features:
        c = block.conv.out_channels
        if kind == "random":
            out.append(torch.exp(torch.empty(c, dtype=torch.float64).uniform_(
                math.log(0.25), math.log(4.0), generator=g)))
        else:
            out.append(torch.full((c,), float(kind), dtype=torch.float64))
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


NORMS = ["path_norm", "frobenius_norm", "distance_from_init", "spectral_norm_sum",
         "spectral_norm_product", "spectral_norm_balanced_sum"]


def norm_values(model, init, x, y, **params) -> dict[str, dict]:
    return {n: MEASURES[n](model, (x, y), init_model=init, device="cpu", **params)
            for n in NORMS}


def reference_values(model, init) -> dict[str, float]:
    layers, init_layers = hand_fold(model), hand_fold(init)
    sig = spectral_by_hand(layers)
    d = len(sig)
    return {
        "path_norm": path_norm_by_definition(layers),
        "frobenius_norm": frobenius_by_hand(layers),
        "distance_from_init": math.sqrt(sum(
            float(((a["w"] - b["w"]) ** 2).sum())
            for a, b in zip(layers, init_layers, strict=True))),
        "spectral_norm_sum": sum(sig),
        "spectral_norm_product": math.prod(sig),
        "spectral_norm_balanced_sum": d * math.prod(s**2 for s in sig) ** (1 / d),
    }


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("batchnorm", [True, False])
def test_hand_folded_matrices_compute_the_network(nets, batchnorm):
    model, _ = nets[batchnorm]
    x, _ = digits(40)
    with torch.no_grad():
        ref = model(x)
    by_hand = forward_by_matrices(hand_fold(model), x)
    assert torch.allclose(by_hand, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    if batchnorm:  # BatchNorm is far from the identity, so folding it is not a no-op
        bn = model.features[0].bn
        s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        assert float((s - 1).abs().max()) > 0.1 and float(bn.running_mean.abs().max()) > 0.1


@pytest.mark.parametrize("batchnorm", [True, False])
def test_norm_measures_equal_their_hand_folded_versions(nets, batchnorm):
    model, init = nets[batchnorm]
    x, y = digits(40)
    got = norm_values(model, init, x, y)
    want = reference_values(model, init)
    for name in NORMS:
        assert got[name]["status"] == "ok", got[name]
        assert got[name]["bn_folded"] == (3 if batchnorm else 0), name
        assert rel(got[name]["value"], want[name]) < 1e-6, (name, got[name]["value"],
                                                            want[name])
    if batchnorm:  # the raw parameters give other values: the test can tell them apart
        raw = norm_values(model, init, x, y, fold_bn=False)
        for name in ["frobenius_norm", "distance_from_init"]:
            assert rel(raw[name]["value"], want[name]) > 1e-2, name


@pytest.mark.parametrize("kind", ["2", "4", "random"])
def test_folded_norms_do_not_move_under_the_conv_and_statistics_rescaling(nets, kind):
    model, init = nets[True]
    x, y = digits(40)
    a = factors(model, kind)
    rescaled = rescale_conv_and_stats(model, a)
    with torch.no_grad():
        ref, new = model(x), rescaled(x)
    assert torch.allclose(new, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    assert not torch.allclose(rescaled.features[1].conv.weight, model.features[1].conv.weight)
    before = norm_values(model, init, x, y)
    after = norm_values(rescaled, init, x, y)
    want = reference_values(rescaled, init)
    for name in NORMS:
        assert rel(after[name]["value"], before[name]["value"]) < 1e-6, name
        assert rel(after[name]["value"], want[name]) < 1e-6, name
    # the raw-parameter path norm is what moved in the issue (8,290 -> 16,103 -> 31,729)
    raw_before = MEASURES["path_norm"](model, (x, y), device="cpu", fold_bn=False)["value"]
    raw_after = MEASURES["path_norm"](rescaled, (x, y), device="cpu", fold_bn=False)["value"]
    assert rel(raw_after, raw_before) > 1e-2


def hand_folded_module(model: nn.Module) -> nn.Module:
    """The hand-folded layers as a plain nn.Sequential (conv with bias, ReLU, ..., pool,
    flatten, linear), parameters in the same order as the measured folded copy."""
    mods: list[nn.Module] = []
    for layer in hand_fold(model)[:-1]:
        co, ci = layer["w"].shape[:2]
        conv = nn.Conv2d(ci, co, 3, stride=layer["stride"], padding=1).double()
        with torch.no_grad():
            conv.weight.copy_(layer["w"])
            conv.bias.copy_(layer["b"])
        mods += [conv, nn.ReLU()]
    last = hand_fold(model)[-1]
    lin = nn.Linear(last["w"].shape[1], last["w"].shape[0]).double()
    with torch.no_grad():
        lin.weight.copy_(last["w"])
        lin.bias.copy_(last["b"])
    return nn.Sequential(*mods, nn.AdaptiveAvgPool2d(1), nn.Flatten(), lin).eval()


def test_pacbayes_perturbs_the_folded_network(nets):
    """The sigma search on the BN net is the search on the hand-folded plain net (same seed,
    same parameter order, so the same noise draws), and the bound's distance is the folded
    one; the raw-parameter search is a different one."""
    model, init = nets[True]
    x, y = digits(120)
    search = {"mc_samples": 4, "depth": 10, "tol": 0.01}
    flat = hand_folded_module(model)
    flat_init = hand_folded_module(init)
    got = MEASURES["pacbayes_bound"](model, (x, y), init_model=init, device="cpu", seed=5,
                                     **search)
    want = MEASURES["pacbayes_bound"](flat, (x, y), init_model=flat_init, device="cpu", seed=5,
                                      fold_bn=False, **search)
    assert got["bn_folded"] == 3 and want["bn_folded"] == 0
    assert got["sigma"] == pytest.approx(want["sigma"], rel=1e-9)
    dist2 = sum(float(((p - q) ** 2).sum()) for p, q in
                zip(flat.parameters(), flat_init.parameters(), strict=True))
    assert got["distance_sq"] == pytest.approx(dist2, rel=1e-9)
    raw = MEASURES["pacbayes_bound"](model, (x, y), init_model=init, device="cpu", seed=5,
                                     fold_bn=False, **search)
    assert raw["distance_sq"] != pytest.approx(dist2, rel=1e-2)


class UnitBatchNorm(nn.Module):
    """The reference code's emptied BatchNorm, written out: gamma 1, beta 0, running mean 0 and
    variance 1, so ``gamma * x / sqrt(1 + eps) + beta`` per channel; gamma and beta trainable."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels, dtype=torch.float64))
        self.bias = nn.Parameter(torch.zeros(channels, dtype=torch.float64))
        self.eps = eps

    def forward(self, x):
        return (self.weight[:, None, None] * x / math.sqrt(1.0 + self.eps)
                + self.bias[:, None, None])


def hand_folded_kept_module(model: nn.Module) -> nn.Module:
    """The reference code's reparameterisation (Jiang et al.'s measures as re-implemented for
    Dziugaite et al. 2020): each conv takes the folded kernel and bias, and its BatchNorm stays
    as a unit BatchNorm whose gamma and beta are perturbed with everything else."""
    flat = hand_folded_module(model)
    mods: list[nn.Module] = []
    for m in flat:
        mods.append(m)
        if isinstance(m, nn.Conv2d):
            mods.append(UnitBatchNorm(m.out_channels, eps=1e-5))
    return nn.Sequential(*mods).eval()


def test_pacbayes_keep_perturbs_the_emptied_batchnorms_as_the_reference_code(nets):
    """``folded_bn="keep"``: the search is the one on the hand-built reference network (folded
    convs, unit BatchNorms with gamma and beta perturbed); the bound's distance counts the BN
    parameters too (0: both nets have gamma 1, beta 0). It differs from the default removal,
    and on a net without BatchNorm both conventions are the same search."""
    model, init = nets[True]
    x, y = digits(120)
    search = {"mc_samples": 4, "depth": 10, "tol": 0.01}
    ref, ref_init = hand_folded_kept_module(model), hand_folded_kept_module(init)
    with torch.no_grad():  # the reference net computes the function up to 1/sqrt(1+eps)
        assert torch.allclose(ref(x), model(x), rtol=1e-4, atol=1e-4)
    got = MEASURES["pacbayes_bound"](model, (x, y), init_model=init, device="cpu", seed=5,
                                     folded_bn="keep", **search)
    want = MEASURES["pacbayes_bound"](ref, (x, y), init_model=ref_init, device="cpu", seed=5,
                                      fold_bn=False, **search)
    assert got["status"] == "ok", got["error"]
    assert got["bn_folded"] == 3 and got["bn_in_measured_net"] == 3
    assert got["sigma"] == pytest.approx(want["sigma"], rel=1e-9)
    dist2 = sum(float(((p - q) ** 2).sum()) for p, q in
                zip(ref.parameters(), ref_init.parameters(), strict=True))
    assert got["distance_sq"] == pytest.approx(dist2, rel=1e-9)
    removed = MEASURES["pacbayes_bound"](model, (x, y), init_model=init, device="cpu", seed=5,
                                         **search)
    assert removed["bn_in_measured_net"] == 0
    assert rel(removed["sigma"], got["sigma"]) > 1e-2
    plain, _ = nets[False]
    a, b = (MEASURES["pacbayes_flatness"](plain, (x, y), device="cpu", seed=5, folded_bn=fb,
                                          **search) for fb in ("remove", "keep"))
    assert a["value"] == b["value"]
    with pytest.raises(OptionError, match="folded_bn must be one of"):  # refused before it runs
        MEASURES["pacbayes_flatness"](model, (x, y), device="cpu", folded_bn="kept", **search)


# ------------------------------------------------------------------ sharpness


def long_ascent(model: nn.Module, x, y, rho: float, adaptive: bool, steps: int = 400,
                starts: int = 1) -> float:
    """max over ||delta / c||_2 <= rho of L(w + delta) - L(w), c = |w| (adaptive) or 1, by a
    long projected normalised-gradient ascent with a step decaying geometrically from rho to
    rho/100 (not the measure's fixed step), from the SAM point (the gradient direction on the
    sphere) and, for ``starts`` > 1, from seeded random points on the sphere; the best loss
    over all iterates and starts.

    The problem is not concave: from random starts the ascent can find a higher local
    maximum than the one the SAM point leads to (on the net without BatchNorm here,
    ``sharpness_adaptive``'s 0.178 against 0.353 from five starts). Like the reference
    implementations, the measure ascends from the SAM point, so the test compares it with
    the long ascent from that point: it checks convergence, not global optimality."""
    m = copy.deepcopy(model).eval()
    params = list(m.parameters())
    w0 = [p.detach().clone() for p in params]
    c = [w.abs() if adaptive else torch.ones_like(w) for w in w0]

    def loss_grad(eps):
        with torch.no_grad():
            for p, w, ci, e in zip(params, w0, c, eps, strict=True):
                p.copy_(w + ci * e)
        loss = F.cross_entropy(m(x), y)
        gs = torch.autograd.grad(loss, params)
        return float(loss.detach()), [ci * g for ci, g in zip(c, gs, strict=True)]

    def project(eps):
        n = math.sqrt(sum(float((e**2).sum()) for e in eps))
        return [e * (rho / n) for e in eps] if n > rho else eps

    base, g0 = loss_grad([torch.zeros_like(w) for w in w0])
    gen = torch.Generator().manual_seed(0)
    best = base
    for s in range(starts):
        d = g0 if s == 0 else [torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in w0]
        n = math.sqrt(sum(float((t**2).sum()) for t in d))
        eps = [rho * t / n for t in d]
        for t in range(steps):
            loss, g = loss_grad(eps)
            best = max(best, loss)
            gn = math.sqrt(sum(float((gi**2).sum()) for gi in g))
            step = rho * 10 ** (-2 * t / steps)
            eps = project([e + step * gi / gn for e, gi in zip(eps, g, strict=True)])
        best = max(best, loss_grad(eps)[0])
    return best - base


@pytest.mark.parametrize("batchnorm", [True, False])
@pytest.mark.parametrize("name,adaptive", [("sharpness_worst", False),
                                           ("sharpness_adaptive", True)])
def test_sharpness_defaults_reach_the_long_ascent_maximum(nets, batchnorm, name, adaptive):
    model, _ = nets[batchnorm]
    x, y = digits(64)
    got = MEASURES[name](model, (x, y), device="cpu")
    assert got["status"] == "ok", got
    assert got["converged"] and got["steps"] < got["params"]["max_steps"]
    assert got["last_relative_change"] < got["params"]["tol"]
    want = long_ascent(model, x, y, got["params"]["rho"], adaptive)
    assert want > 0
    # within 1 % of the long ascent's maximum
    assert abs(got["value"] - want) / want < 1e-2, (got["value"], want, got["steps"])


def test_bench_spread_rows_are_the_statistics_of_separate_runs(nets):
    """`python -m convflat.bench measures --spread` reports, per measure, the mean, relative
    standard deviation and range over seeds and the distance from the long run: recomputed
    here from separate calls of the measure."""
    import statistics

    from convflat.bench.measures import spread

    model, init = nets[True]
    x, y = digits(48)
    (row,) = spread(model, init, (x, y), seeds=3, names=["sharpness_avg"])
    vals = [MEASURES["sharpness_avg"](model, (x, y), device="cpu", seed=s)["value"]
            for s in range(3)]
    long = MEASURES["sharpness_avg"](model, (x, y), device="cpu", seed=0, samples=400)["value"]
    mean = statistics.fmean(vals)
    assert row["mean"] == pytest.approx(mean, rel=1e-12)
    assert row["rel_std"] == pytest.approx(statistics.stdev(vals) / mean, rel=1e-9)
    assert row["rel_range"] == pytest.approx((max(vals) - min(vals)) / mean, rel=1e-9)
    assert row["long"] == pytest.approx(long, rel=1e-12)
    assert row["rel_distance"] == pytest.approx((mean - long) / long, rel=1e-9)
    assert row["rel_std"] > 0  # different seeds draw different noise
