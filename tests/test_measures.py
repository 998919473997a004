"""Baseline measures against dense float64 references on tiny networks.

Every reference here is computed independently of the code under test: the full autograd
Hessian (torch.autograd.functional.hessian over a flat parameter vector), explicit per-sample
Jacobians for the Fisher matrix, and explicit convolution matrices built by applying the
convolution to the identity basis.
"""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from convflat.curvature import exact_curvature
from convflat.measures import (
    DEFAULT_MEASURES,
    MEASURES,
    Context,
    compute_measures,
    write_measures_json,
)
from convflat.measures.context import perturbed
from convflat.measures.hessian import hessian_operator, trace_estimate
from convflat.measures.norms import conv_spectral_norm, layer_spectral_norms
from convflat.measures.pacbayes import sigma_search
from convflat.measures.sharpness import average_sharpness, worst_case_sharpness

# --------------------------------------------------------------------------- tiny networks


def tiny_net(act: str = "relu", bias: bool = True, seed: int = 0) -> nn.Module:
    """conv(2->3) -> act -> conv(3->4) -> act -> GAP -> linear(4->3), float64."""
    torch.manual_seed(seed)
    Act = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, bias=bias), Act(),
        nn.Conv2d(3, 4, 3, padding=1, bias=bias), Act(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3, bias=bias),
    ).double().eval()


def tiny_data(n: int = 12, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


CONV = "2"  # the last conv of tiny_net


def flat_loss(model: nn.Module, x, y, names: list[str]):
    """theta (flat, over `names`) -> mean cross-entropy, for the dense reference Hessian."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def loss(theta: torch.Tensor) -> torch.Tensor:
        chunks = theta.split(sizes)
        p = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return loss, theta0


def dense_hessian(model: nn.Module, x, y, names: list[str] | None = None) -> torch.Tensor:
    names = names or [n for n, _ in model.named_parameters()]
    loss, theta0 = flat_loss(model, x, y, names)
    return torch.autograd.functional.hessian(loss, theta0)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def relu_case():
    model, (x, y) = tiny_net("relu"), tiny_data()
    return model, x, y, dense_hessian(model, x, y), dense_hessian(model, x, y, [f"{CONV}.weight"])


@pytest.fixture(scope="module")
def silu_case():
    model, (x, y) = tiny_net("silu", seed=3), tiny_data(seed=4)
    return model, x, y, dense_hessian(model, x, y), dense_hessian(model, x, y, [f"{CONV}.weight"])


# --------------------------------------------------------------------------- Hutchinson


@pytest.mark.parametrize("scope", ["network", "conv"])
@pytest.mark.parametrize("method", ["hutchinson", "hutchpp"])
def test_trace_estimators_converge_within_statistical_error(relu_case, scope, method):
    model, x, y, H, Hc = relu_case
    ref = H if scope == "network" else Hc
    exact = float(ref.trace())
    ctx = Context(model, (x, y), device="cpu", batch_size=5)
    params = ctx.params() if scope == "network" else [ctx.model[2].weight]
    op = hessian_operator(ctx, params)
    R = 20

    def runs(m: int) -> torch.Tensor:
        return torch.tensor([
            trace_estimate(op, method=method, probes=m, groups=1, distribution="rademacher",
                           seed=s, device=ctx.device)["value"] for s in range(R)
        ], dtype=torch.float64)

    small, large = runs(6), runs(30)
    # unbiased: the mean of R independent estimates lies within 4 standard errors of Tr H
    sd = large.std()
    if method == "hutchinson":
        # Hutchinson's variance is known exactly for Rademacher probes (docs/math.md Eq. (16))
        var1 = 2 * (float((ref**2).sum()) - float((ref.diagonal() ** 2).sum()))
        sd_theory = math.sqrt(var1 / 30)
        assert 0.5 * sd_theory < sd < 2.0 * sd_theory
        sd = torch.tensor(sd_theory)
    assert abs(float(large.mean()) - exact) <= 4 * float(sd) / math.sqrt(R) + 1e-12
    # and the error shrinks with the number of products
    def rmse(r: torch.Tensor) -> float:
        return float(((r - exact) ** 2).mean().sqrt())

    assert rmse(large) < rmse(small)


def test_hutchinson_conv_measure_reports_error_against_exact(relu_case):
    model, x, y, _, Hc = relu_case
    exact = float(Hc.trace())
    out = MEASURES["hutchinson_conv_trace"](model, (x, y), device="cpu", probes=48, groups=48)
    assert out["status"] == "ok", out["error"]
    assert rel(out["exact"], exact) < 1e-9
    assert out["relative_error"] == pytest.approx((out["value"] - exact) / exact, rel=1e-9)
    assert abs(out["value"] - exact) <= 4 * out["stderr"]
    var1 = 2 * (float((Hc**2).sum()) - float((Hc.diagonal() ** 2).sum()))
    assert 0.5 < out["stderr"] / math.sqrt(var1 / 48) < 2.0
    # Hutch++ with all but a few dimensions sketched is nearly exact
    pp = MEASURES["hutchpp_conv_trace"](model, (x, y), device="cpu", probes=99, groups=1)
    assert abs(pp["relative_error"]) < abs(out["relative_error"]) + 1e-3


def test_hutchinson_is_seeded(relu_case):
    model, x, y, _, _ = relu_case
    a = MEASURES["hutchinson_trace"](model, (x, y), device="cpu", seed=5)
    b = MEASURES["hutchinson_trace"](model, (x, y), device="cpu", seed=5)
    c = MEASURES["hutchinson_trace"](model, (x, y), device="cpu", seed=6)
    assert a["value"] == b["value"] and a["value"] != c["value"]


# --------------------------------------------------------------------------- spectra


@pytest.mark.parametrize("method,iterations,tol", [("eigsh", 1000, 1e-8), ("lanczos", 80, 1e-6)])
def test_network_top_eigenvalue_matches_dense(relu_case, method, iterations, tol):
    model, x, y, H, _ = relu_case
    ref = float(torch.linalg.eigvalsh(H)[-1])
    out = MEASURES["hessian_top_eigenvalue"](model, (x, y), device="cpu", method=method,
                                             iterations=iterations, tol=1e-12)
    assert out["status"] == "ok", out["error"]
    assert rel(out["value"], ref) < tol


@pytest.mark.parametrize("case,methods", [
    ("relu_case", ["auto", "lanczos", "dense", "gram", "hvp"]),
    ("silu_case", ["auto", "lanczos", "dense", "hvp"]),
])
def test_conv_top_eigenvalue_and_frobenius_match_dense(request, case, methods):
    model, x, y, _, Hc = request.getfixturevalue(case)
    top = float(torch.linalg.eigvalsh(Hc)[-1])
    fro = float(torch.linalg.matrix_norm(Hc))
    ctx = Context(model, (x, y), device="cpu", batch_size=5)
    for method in methods:
        out = MEASURES["conv_top_eigenvalue"].run(ctx, {"method": method})
        assert out["status"] == "ok", (method, out["error"])
        assert rel(out["value"], top) < 1e-8, method
        assert out["params"]["method"] == ("lanczos" if method == "auto" else method)
    fro_methods = ["auto", "dense", "hvp"] + (["gram", "gram_trace"] if case == "relu_case" else [])
    for method in fro_methods:
        out = MEASURES["conv_hessian_frobenius"].run(ctx, {"method": method})
        assert out["status"] == "ok", (method, out["error"])
        assert rel(out["value"], fro) < 1e-9, method
    if case == "silu_case":
        # the sigma'' term makes the NK Gram route wrong, so it must refuse
        out = MEASURES["conv_hessian_frobenius"].run(ctx, {"method": "gram"})
        assert out["status"] == "failed" and "piecewise-linear" in out["error"]


def test_ours_match_exact_curvature(relu_case):
    model, x, y, _, Hc = relu_case
    res = exact_curvature(model, (x, y), device="cpu")
    out = compute_measures(model, (x, y), device="cpu", names=[
        "conv_trace", "conv_relative_flatness", "classifier_trace",
        "classifier_relative_flatness"])
    assert out["conv_trace"]["value"] == res.trace
    assert rel(out["conv_trace"]["value"], float(Hc.trace())) < 1e-9
    assert out["conv_relative_flatness"]["value"] == res.relative_flatness
    assert out["classifier_trace"]["value"] == res.classifier_trace
    assert out["classifier_relative_flatness"]["value"] == res.classifier_relative_flatness


# --------------------------------------------------------------------------- Fisher-Rao


def _per_sample_jacobians(model, x):
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes, shapes = [params[n].numel() for n in names], [params[n].shape for n in names]

    def f(th, xi):
        p = {n: c.view(s) for n, c, s in zip(names, th.split(sizes), shapes, strict=True)}
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    J = torch.stack([jacrev(f)(theta, xi) for xi in x])  # (N, K, P)
    return theta, J


@pytest.mark.parametrize("act,bias", [("relu", True), ("silu", True), ("relu", False)])
def test_fisher_rao_matches_explicit_fisher(act, bias):
    model, (x, y) = tiny_net(act, bias=bias, seed=2), tiny_data(seed=2)
    theta, J = _per_sample_jacobians(model, x)
    with torch.no_grad():
        z = model(x)
    p = torch.softmax(z, 1)
    A = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    F_model = torch.einsum("nkp,nkl,nlq->pq", J, A, J) / x.shape[0]
    g = torch.einsum("nkp,nk->np", J, p - F.one_hot(y, 3).double())  # per-sample gradients
    F_emp = g.T @ g / x.shape[0]
    out = MEASURES["fisher_rao_norm"](model, (x, y), device="cpu")
    assert out["status"] == "ok", out["error"]
    assert rel(out["value"], float(theta @ F_model @ theta)) < 1e-10
    assert rel(out["empirical"], float(theta @ F_emp @ theta)) < 1e-10
    emp = MEASURES["fisher_rao_norm"](model, (x, y), device="cpu", labels="empirical")
    assert emp["value"] == out["empirical"]
    if act == "relu" and not bias:
        # Liang et al., Lemma 2.1: J theta = (L+1) f with L+1 = 3 weight layers
        lemma = 9 * float(torch.einsum("nk,nkl,nl->n", z, A, z).mean())
        assert rel(out["value"], lemma) < 1e-10


# --------------------------------------------------------------------------- sharpness


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_worst_case_sharpness_zero_at_rho0_grows_and_restores(adaptive, norm):
    model, (x, y) = tiny_net(), tiny_data(n=20, seed=5)
    ctx = Context(model, (x, y), device="cpu", batch_size=8)
    before = _state(ctx.model)
    rhos = [0.0, 0.005, 0.02, 0.08] if norm == "l2" else [0.0, 0.001, 0.004, 0.016]
    vals = [worst_case_sharpness(ctx, rho=r, max_steps=4, tol=0.0, norm=norm,
                                 adaptive=adaptive)["value"] for r in rhos]
    assert vals[0] == 0.0
    assert all(b > a for a, b in itertools.pairwise(vals)), vals
    assert _same(before, _state(ctx.model))


def test_average_sharpness_zero_at_sigma0_and_restores():
    model, (x, y) = tiny_net(), tiny_data(n=20, seed=5)
    ctx = Context(model, (x, y), device="cpu")
    before = _state(ctx.model)
    assert average_sharpness(ctx, sigma=0.0, samples=3)["value"] == 0.0
    a = average_sharpness(ctx, sigma=0.05, samples=8, adaptive=True)
    assert a["value"] > 0 and a["stderr"] > 0
    assert _same(before, _state(ctx.model))


def test_measures_never_touch_the_callers_model_and_restore_on_error():
    model, (x, y) = tiny_net(), tiny_data()
    before = _state(model)
    compute_measures(model, (x, y), device="cpu", names=[
        "sharpness_worst", "sharpness_adaptive", "sharpness_avg", "pacbayes_flatness"],
        params={"pacbayes_flatness": {"depth": 3, "mc_samples": 2}})
    assert _same(before, _state(model))
    ctx = Context(model, (x, y), device="cpu")
    params = ctx.params()
    saved = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError), perturbed(params, [torch.ones_like(p) for p in params]):
        raise RuntimeError("boom")
    assert all(torch.equal(p, s) for p, s in zip(params, saved, strict=True))


# --------------------------------------------------------------------------- PAC-Bayes


def test_pacbayes_is_deterministic_for_a_seed():
    model, (x, y) = tiny_net(seed=4), tiny_data(n=40, seed=6)
    kw = {"device": "cpu", "names": ["pacbayes_flatness", "pacbayes_mag_flatness"],
          "params": {"pacbayes_flatness": {"depth": 6, "mc_samples": 3},
                     "pacbayes_mag_flatness": {"depth": 6, "mc_samples": 3}}}
    a = compute_measures(model, (x, y), seed=3, **kw)
    b = compute_measures(model, (x, y), seed=3, **kw)
    for name in a:
        assert a[name]["status"] == "ok", a[name]["error"]
        assert a[name]["value"] == b[name]["value"] and a[name]["sigma"] == b[name]["sigma"]
        assert a[name]["value"] == pytest.approx(1 / a[name]["sigma"] ** 2)


def test_sigma_search_brackets_the_target():
    model, (x, y) = tiny_net(seed=4), tiny_data(n=60, seed=6)
    ctx = Context(model, (x, y), device="cpu")
    s = sigma_search(ctx, target=0.1, tol=0.02, mc_samples=4, depth=14)
    assert abs(s["deviation"] - 0.1) < 0.02 or s["iterations"] == 14
    # sigma is a standard deviation: 10 x sigma moves the accuracy further
    tri = {round(t[0], 12): t[1] for t in s["trials"]}
    assert max(tri.values()) >= s["deviation"]


def test_pacbayes_bound_formula():
    model, (x, y) = tiny_net(seed=4), tiny_data(n=40, seed=6)
    init = tiny_net(seed=9)
    out = compute_measures(model, (x, y), init_model=init, device="cpu", names=[
        "pacbayes_flatness", "pacbayes_bound"], params={
        "pacbayes_flatness": {"depth": 5}, "pacbayes_bound": {"depth": 5}})
    sigma = out["pacbayes_flatness"]["sigma"]
    d2 = sum(float((p - q).detach().pow(2).sum())
             for p, q in zip(model.parameters(), init.parameters(), strict=True))
    ref = d2 / (4 * sigma**2) + math.log(40 / sigma) + 10
    assert out["pacbayes_bound"]["value"] == pytest.approx(ref, rel=1e-12)
    # the sigma search is shared: the bound is charged its cost but does not redo it
    assert "pacbayes_sigma" in " ".join(out["pacbayes_bound"]["shared"])


# --------------------------------------------------------------------------- norms


def _explicit_conv_matrix(fn, in_shape):
    n = math.prod(in_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        return fn(basis).reshape(n, -1).T


@pytest.mark.parametrize("kw,hw", [
    ({"stride": 1, "padding": 1}, (5, 5)),
    ({"stride": 2, "padding": 1}, (5, 4)),
    ({"stride": 1, "padding": 2, "dilation": 2, "groups": 2}, (6, 5)),
    ({"stride": 1, "padding": 0}, (4, 4)),
])
def test_conv_spectral_norm_matches_explicit_matrix(kw, hw):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3, bias=True, **kw).double()
    A = _explicit_conv_matrix(
        lambda b: F.conv2d(b, conv.weight, None, conv.stride, conv.padding, conv.dilation,
                           conv.groups), (2, *hw))
    ref = float(torch.linalg.svdvals(A)[0])
    for method in ("dense", "lanczos"):
        sigma, used = conv_spectral_norm(conv, hw, method=method, tol=1e-12)
        assert used == method and rel(sigma, ref) < 1e-9, method


def test_conv_spectral_norm_fft_is_exact_for_circular_padding():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular", bias=False).double()
    A = _explicit_conv_matrix(conv, (3, 6, 7))
    ref = float(torch.linalg.svdvals(A)[0])
    sigma, used = conv_spectral_norm(conv, (6, 7), method="fft")
    assert used == "fft" and rel(sigma, ref) < 1e-10
    sigma, _ = conv_spectral_norm(conv, (6, 7), method="lanczos", tol=1e-12)
    assert rel(sigma, ref) < 1e-9


def test_spectral_norm_measures_use_each_layers_input_size(relu_case):
    model, x, y, _, _ = relu_case
    layers = layer_spectral_norms(model, x[:1])
    assert [r["layer"] for r in layers] == ["0", "2", "6"]
    assert layers[1]["input"] == [3, 5, 5]
    ref2 = float(torch.linalg.svdvals(_explicit_conv_matrix(
        lambda b: F.conv2d(b, model[2].weight, None, padding=1), (3, 5, 5)))[0])
    assert rel(layers[1]["sigma"], ref2) < 1e-9
    out = compute_measures(model, (x, y), device="cpu",
                           names=["spectral_norm_sum", "spectral_norm_product"])
    sig = [r["sigma"] for r in layers]
    assert rel(out["spectral_norm_sum"]["value"], sum(sig)) < 1e-9
    assert rel(out["spectral_norm_product"]["value"], math.prod(sig)) < 1e-9


def test_path_norm_of_a_bias_free_relu_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5, bias=False), nn.ReLU(),
                          nn.Linear(5, 3, bias=False)).double()
    x, y = torch.randn(6, 1, 2, 2, dtype=torch.float64), torch.randint(0, 3, (6,))
    W1, W2 = model[1].weight.detach(), model[3].weight.detach()
    ref = float((W2**2 @ (W1**2 @ torch.ones(4, dtype=torch.float64))).sum())
    out = MEASURES["path_norm"](model, (x, y), device="cpu")
    assert rel(out["value"], ref) < 1e-12


def test_norms_margin_and_distance(relu_case):
    model, x, y, _, _ = relu_case
    init = tiny_net(seed=7)
    out = compute_measures(model, (x, y), init_model=init, device="cpu", names=[
        "frobenius_norm", "distance_from_init", "inverse_margin"])
    ws = [p.detach() for p in model.parameters() if p.ndim >= 2]
    w0 = [p.detach() for p in init.parameters() if p.ndim >= 2]
    assert rel(out["frobenius_norm"]["value"],
               math.sqrt(sum(float((w**2).sum()) for w in ws))) < 1e-12
    dist = math.sqrt(sum(float(((w - v) ** 2).sum()) for w, v in zip(ws, w0, strict=True)))
    assert rel(out["distance_from_init"]["value"], dist) < 1e-12
    with torch.no_grad():
        z = model(x)
    true = z[torch.arange(12), y]
    other = z.masked_fill(F.one_hot(y, 3).bool(), -math.inf).max(1).values
    gamma = float((true - other).sort().values[max(1, int(12 * 0.1)) - 1])
    m = out["inverse_margin"]
    assert m["margin"] == pytest.approx(gamma, rel=1e-12)
    assert m["value"] == (1 / gamma**2 if gamma > 0 else math.inf)


# --------------------------------------------------------------------------- entry point


def test_compute_measures_records_failures_and_keeps_going(tmp_path):
    model, (x, y) = tiny_net(), tiny_data()
    out = compute_measures(
        model, (x, y), device="cpu",
        names=["hutchinson_conv_trace", "path_norm", "distance_from_init", "frobenius_norm"],
        params={"hutchinson_conv_trace": {"probes": 500, "groups": 1}},
    )
    assert out["hutchinson_conv_trace"]["status"] == "failed"
    assert "500" in out["hutchinson_conv_trace"]["error"]
    assert out["path_norm"]["status"] == "ok" and out["frobenius_norm"]["status"] == "ok"
    assert out["distance_from_init"]["status"] == "skipped"
    for entry in out.values():
        assert {"value", "seconds", "params", "status", "error"} <= set(entry)
    path = write_measures_json(tmp_path / "m.json", out, device="cpu", seed=0, seconds=1.0,
                               checkpoint="x.pt")
    doc = json.loads(path.read_text())
    assert doc["status"] == "ok" and doc["failed"] == ["hutchinson_conv_trace"]
    assert doc["skipped"] == ["distance_from_init"]
    assert doc["values"]["hutchinson_conv_trace"] is None
    assert doc["values"]["path_norm"] == out["path_norm"]["value"]
    assert doc["checkpoint"] == "x.pt" and doc["torch_version"] == torch.__version__
    assert doc["convflat_version"] and doc["device"] == "cpu"


def test_bad_input_fails_early_with_the_offending_name():
    model, (x, y) = tiny_net(), tiny_data()
    with pytest.raises(ValueError, match="nonsense"):
        compute_measures(model, (x, y), names=["path_norm", "nonsense"])
    with pytest.raises(ValueError, match="'probez'"):
        compute_measures(model, (x, y), names=["hutchinson_trace"],
                         params={"hutchinson_trace": {"probez": 3}})
    with pytest.raises(ValueError, match="not requested"):
        compute_measures(model, (x, y), names=["path_norm"], params={"hutchinson_trace": {}})
    with pytest.raises(ValueError, match="init model"):
        compute_measures(model, (x, y), init_model=tiny_net(bias=False).float(),
                         names=["path_norm"])


def test_registry_is_complete_and_documented():
    assert set(DEFAULT_MEASURES) <= set(MEASURES)
    for name, m in MEASURES.items():
        assert m.func.__doc__ and len(m.func.__doc__) > 40, name
        assert m.source, name
        assert m.theory in ("invariant", "changes", "nearly invariant")


def test_max_samples_runs_on_a_subset_with_its_own_exact_reference():
    model, (x, y) = tiny_net(), tiny_data(n=30, seed=3)
    out = compute_measures(model, (x, y), device="cpu", names=["hutchinson_conv_trace"],
                           params={"hutchinson_conv_trace": {"max_samples": 10}})
    r = out["hutchinson_conv_trace"]
    assert r["n_samples"] == 10 and r["status"] == "ok"
    ctx = Context(model, (x, y), device="cpu").subset(10)
    X = torch.cat([b[0] for b in ctx.batches])
    Y = torch.cat([b[1] for b in ctx.batches])
    assert rel(r["exact"], exact_curvature(model, (X, Y), device="cpu").trace) < 1e-12


def test_seconds_include_shared_work():
    model, (x, y) = tiny_net(), tiny_data()
    out = compute_measures(model, (x, y), device="cpu",
                           names=["conv_trace", "conv_relative_flatness"])
    a, b = out["conv_trace"], out["conv_relative_flatness"]
    shared = a["shared"]["exact_curvature"]
    assert b["shared"]["exact_curvature"] == shared
    assert b["seconds"] >= shared  # charged although conv_trace computed it
    assert copy.deepcopy(out)  # plain data


def test_models_without_forward_mode_autodiff_fall_back_to_reverse_products(silu_case):
    # curvlinops' forward-over-reverse product fails on aten::silu_backward (torch 2.14)
    model, x, y, H, _ = silu_case
    out = MEASURES["hessian_top_eigenvalue"](model, (x, y), device="cpu", method="eigsh",
                                             iterations=1000, tol=1e-12)
    assert out["status"] == "ok", out["error"]
    assert out["hvp"] == "reverse-over-reverse"
    assert rel(out["value"], float(torch.linalg.eigvalsh(H)[-1])) < 1e-8
    relu = MEASURES["hutchinson_trace"](tiny_net(), tiny_data(), device="cpu")
    assert relu["hvp"] == "forward-over-reverse"


@pytest.mark.parametrize("act", ["relu", "silu"])
def test_conv_block_patch_form_with_groups_and_stride(act):
    # last conv: 16 filters in 2 groups, stride 2 on 4x4 -> P = 4 positions; the per-sample
    # patches (G P d + C P = 208) are smaller than the Jacobians (C d = 288)
    torch.manual_seed(5)
    Act = {"relu": nn.ReLU, "silu": nn.SiLU}[act]
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), Act(),
        nn.Conv2d(4, 16, 3, stride=2, padding=1, groups=2), Act(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    ).double().eval()
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    Hc = dense_hessian(model, x, y, ["2.weight"])
    ctx = Context(model, (x, y), device="cpu", batch_size=4)
    from convflat.measures.convblock import conv_factors

    assert conv_factors(ctx, 5e7).form == "patches"
    top = MEASURES["conv_top_eigenvalue"].run(ctx, {"method": "lanczos"})
    assert rel(top["value"], float(torch.linalg.eigvalsh(Hc)[-1])) < 1e-8
    methods = ["dense"] + (["gram_trace", "gram"] if act == "relu" else [])
    for method in methods:
        fro = MEASURES["conv_hessian_frobenius"].run(ctx, {"method": method})
        assert fro["status"] == "ok", fro["error"]
        assert rel(fro["value"], float(torch.linalg.matrix_norm(Hc))) < 1e-9, method


def test_validation_helpers_on_a_tiny_net(relu_case):
    from convflat.measures import cost_table, hutchinson_convergence

    model, x, y, _, Hc = relu_case
    conv = hutchinson_convergence(model, (x, y), probes=(3, 48), repeats=4, device="cpu")
    assert list(conv.columns) == ["method", "probes", "estimate", "stderr", "mean", "exact",
                                  "relative_error"]
    assert set(conv["method"]) == {"hutchinson", "hutchpp"}
    assert conv["exact"].sub(float(Hc.trace())).abs().max() < 1e-9
    for _, g in conv.groupby("method"):
        assert g["stderr"].iloc[-1] < g["stderr"].iloc[0]  # more probes, smaller spread
    costs = cost_table(model, (x, y), ["path_norm", "conv_trace"], repeats=1, device="cpu")
    assert list(costs["measure"]) == ["(forward pass)", "(exact_curvature)", "path_norm",
                                      "conv_trace"]
    assert (costs["seconds"] >= 0).all() and (costs["status"] == "ok").all()
    with pytest.raises(ValueError, match="max_samples"):
        compute_measures(model, (x, y), names=["conv_trace"],
                         params={"conv_trace": {"max_samples": 0}})
