"""The baseline conventions of the field's reference code, each against a computation of the
reference's rule written here: Petzka et al.'s classifier relative flatness on features
rescaled to unit standard deviation (autograd Hessian in float64), and Keskar et al.'s
sharpness (brute force over the corners of the box, where a convex loss takes its maximum).
The PAC-Bayes BatchNorm convention is checked in tests/test_measures_fold.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convflat.measures import MEASURES

pytestmark = pytest.mark.usefixtures("one_thread")


def small_gapcnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(),
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).double().eval()


def data(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def petzka_kappa(features: torch.Tensor, V: torch.Tensor, b: torch.Tensor, y: torch.Tensor
                 ) -> float:
    """Relative flatness of the linear layer by its definition: sum over neuron pairs (k, k')
    of <v_k, v_k'> Tr H_{k,k'}, H the autograd Hessian of the mean cross-entropy in V."""
    H = torch.autograd.functional.hessian(
        lambda W: F.cross_entropy(features @ W.T + b, y), V)  # (K, C, K, C)
    K = V.shape[0]
    return float(sum((V[k] @ V[j]) * torch.diagonal(H[k, :, j, :]).sum()
                     for k in range(K) for j in range(K)))


def features_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model[:6](x)  # conv, ReLU, conv, ReLU, pool, flatten


def test_standardized_classifier_relative_flatness_is_petzkas_rule():
    model, (x, y) = small_gapcnn(), data()
    lin = model[6]
    V, b = lin.weight.detach(), lin.bias.detach()
    g = features_of(model, x)
    s = g.std(0, unbiased=False)
    assert bool((s > 0).all())
    want_std = petzka_kappa(g / s, V * s, b, y)  # same logits, unit-std features
    want_raw = petzka_kappa(g, V, b, y)
    got_std = MEASURES["classifier_relative_flatness"](model, (x, y), device="cpu",
                                                       standardize=True)
    got_raw = MEASURES["classifier_relative_flatness"](model, (x, y), device="cpu")
    assert got_std["status"] == "ok", got_std["error"]
    assert got_std["params"]["standardize"] is True and got_raw["params"]["standardize"] is False
    assert got_std["value"] == pytest.approx(want_std, rel=1e-10)
    assert got_raw["value"] == pytest.approx(want_raw, rel=1e-10)
    assert abs(want_std / want_raw - 1) > 1e-2  # the two conventions are different numbers


def test_standardized_classifier_relative_flatness_ignores_feature_rescaling():
    """Filter c of the last conv (and its bias) times a_c, classifier column c divided by a_c:
    the same function; the standardized value does not move, the raw one does."""
    model, (x, y) = small_gapcnn(), data()
    scaled = small_gapcnn()
    a = torch.tensor([0.2, 3.0, 1.0, 7.0], dtype=torch.float64)
    with torch.no_grad():
        scaled[2].weight.mul_(a[:, None, None, None])
        scaled[2].bias.mul_(a)
        scaled[6].weight.div_(a)
        assert torch.allclose(scaled(x), model(x), rtol=1e-12, atol=1e-12)
    m = MEASURES["classifier_relative_flatness"]
    before, after = (m(net, (x, y), device="cpu", standardize=True)["value"]
                     for net in (model, scaled))
    assert after == pytest.approx(before, rel=1e-10)
    raw_before, raw_after = (m(net, (x, y), device="cpu")["value"] for net in (model, scaled))
    assert abs(raw_after / raw_before - 1) > 1e-2


def test_standardized_classifier_relative_flatness_leaves_out_constant_features():
    """A dead filter (constant feature 0) has no standard deviation: it is left out, which is
    the value on the other features (the classifier column of a zero feature changes nothing)."""
    model, (x, y) = small_gapcnn(), data()
    with torch.no_grad():
        model[2].weight[1].zero_()
        model[2].bias[1] = -1.0  # ReLU(-1) = 0 everywhere
    g = features_of(model, x)
    live = [0, 2, 3]
    s = g[:, live].std(0, unbiased=False)
    lin = model[6]
    want = petzka_kappa(g[:, live] / s, lin.weight.detach()[:, live] * s, lin.bias.detach(), y)
    got = MEASURES["classifier_relative_flatness"](model, (x, y), device="cpu",
                                                   standardize=True)
    assert got["constant_features"] == 1
    assert got["value"] == pytest.approx(want, rel=1e-10)


def test_keskar_sharpness_is_the_box_maximum_normalised_by_one_plus_loss():
    """On a linear classifier the cross-entropy is convex in the parameters, so its maximum
    over the box |delta_i| <= eps (|w_i| + 1) is at one of its 2^8 corners: brute force."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 2)).double().eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * torch.randn(30, generator=g, dtype=torch.float64) > 0).long()
    eps = 0.05
    params = [p.detach().clone() for p in model.parameters()]
    w = torch.cat([p.reshape(-1) for p in params])
    half = eps * (w.abs() + 1)

    def loss(flat: torch.Tensor) -> float:
        W, b = flat[:6].reshape(2, 3), flat[6:]
        return float(F.cross_entropy(x @ W.T + b, y))

    base = loss(w)
    top = max(loss(w + torch.tensor(signs, dtype=torch.float64) * half)
              for signs in itertools.product((-1.0, 1.0), repeat=w.numel()))
    want = 100 * (top - base) / (1 + base)
    got = MEASURES["sharpness_keskar"](model, (x, y), device="cpu", eps=eps)
    assert got["status"] == "ok", got["error"]
    assert got["value"] == pytest.approx(want, rel=1e-9)
    assert got["rise"] == pytest.approx(top - base, rel=1e-9)
    assert got["base_loss"] == pytest.approx(base, rel=1e-12)
    # not Foret's l2 ball of the same radius, nor the box without the +1
    foret = MEASURES["sharpness_worst"](model, (x, y), device="cpu", rho=eps)["value"]
    assert not math.isclose(foret, top - base, rel_tol=1e-2)
    assert MEASURES["sharpness_keskar"].defaults["eps"] == 1e-3  # Keskar et al.'s choice
