r"""Stochastic Hessian measures through curvlinops, and the exact ones from the core.

``L(\theta) = (1/N) \sum_n CE(f_\theta(x_n), y_n)`` is the mean cross-entropy over the training
set; its Hessian ``H`` is applied matrix-free by ``curvlinops.HessianLinearOperator``
(one Hessian-vector product = one forward and one forward-over-reverse pass over the data;
curvlinops-for-pytorch 3.0.1). Measures:

* ``hutchinson_trace`` / ``hutchpp_trace``: trace of the whole-network Hessian;
* ``hutchinson_conv_trace`` / ``hutchpp_conv_trace``: trace of the diagonal block of the last
  conv's kernel (the layer that feeds GAP, :func:`convflat.curvature.find_head`), with the
  relative error against the exact value of :func:`convflat.curvature.exact_curvature`;
* ``hessian_top_eigenvalue``: largest eigenvalue of the whole-network Hessian (Lanczos);
* ``conv_trace``, ``conv_relative_flatness``, ``classifier_trace``,
  ``classifier_relative_flatness``: the exact closed form (docs/math.md Eqs. (7), (9), (12), (13)).

Estimators. Girard-Hutchinson with m Rademacher probes v (Hutchinson 1989):
:math:`\hat t = \frac1m \sum_i v_i^\top H v_i`, unbiased, variance
:math:`2(\|H\|_F^2 - \sum_i H_{ii}^2)/m`. Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021,
Algorithm 1): a third of the products sketch the top subspace Q, whose trace is taken exactly,
and Hutchinson runs on the deflated rest, variance O(1/m^2) for matrices with decaying spectra.
Both estimators are curvlinops' own (``hutchinson_trace``, ``hutchpp_trace``); probes come from
torch's generator seeded with the measurement seed.

Error bars. The ``probes`` matrix-vector products are split into ``groups`` independent runs of
the estimator with ``probes / groups`` products each; the value is the mean of the runs and
``stderr`` their standard deviation over sqrt(groups). For Hutchinson the mean of the runs *is*
the m-probe estimate, so the error bar is free; for Hutch++ more groups mean smaller sketches
(a worse estimator), so its default is one group and no error bar (``stderr`` = None).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from convflat.measures.base import Param, register
from convflat.measures.context import Context, seeded

__all__ = ["hessian_operator", "top_eigenvalue", "trace_estimate"]


def _reverse_over_reverse():
    r"""curvlinops' Hessian operator with a reverse-over-reverse batch product.

    curvlinops multiplies the mini-batch Hessian by forward-over-reverse autodiff
    (``jvp(jacrev(loss))`` under ``torch.no_grad``). Some ops have no forward-mode derivative of
    their backward there (``aten::silu_backward`` in torch 2.14), so for such models this
    subclass replaces only the per-batch product by two reverse passes,
    :math:`Hv = \nabla_\theta \langle \nabla_\theta L_B, v\rangle`; the data loop,
    the batch weighting and the estimators stay curvlinops'.
    """
    from curvlinops import HessianLinearOperator

    class ReverseHessianLinearOperator(HessianLinearOperator):
        def _matmat_batch(self, X, y, M):
            with torch.enable_grad():
                loss = self._loss_func(self._model_func(X), y)
                grads = torch.autograd.grad(loss, self._params, create_graph=True)
                K = M[0].shape[-1]
                out = [torch.empty_like(m) for m in M]
                for k in range(K):
                    hv = torch.autograd.grad(grads, self._params, [m[..., k] for m in M],
                                             retain_graph=k < K - 1)
                    for o, h in zip(out, hv, strict=True):
                        o[..., k] = h
            return out

    return ReverseHessianLinearOperator


def hessian_operator(ctx: Context, params: list[nn.Parameter]):
    """curvlinops' Hessian of the mean cross-entropy over ``ctx``'s data, in ``params``.

    The operator's ``hvp`` attribute says how products are taken: "forward-over-reverse"
    (curvlinops' own) or "reverse-over-reverse" (the fallback for models with ops that lack
    forward-mode autodiff, see :func:`_reverse_over_reverse`).
    """
    from curvlinops import HessianLinearOperator

    kw = {
        "progressbar": ctx.progress,
        # the data are a fixed list on the device and the model is in eval mode: the check
        # would cost two passes and two products for nothing
        "check_deterministic": False,
        "num_data": ctx.n_samples,
    }
    loss = nn.CrossEntropyLoss(reduction="mean")

    def mode() -> str:
        # probe curvlinops' product on two samples once per context
        op = HessianLinearOperator(ctx.model, loss, ctx.params(), ctx.batches, **kw)
        x, y = ctx.batches[0]
        try:
            op._matmat_batch(x[:2], y[:2], [torch.zeros(*p.shape, 1, dtype=p.dtype,
                                                         device=p.device) for p in ctx.params()])
            return "forward-over-reverse"
        except NotImplementedError:
            return "reverse-over-reverse"

    hvp = ctx.shared("hvp_mode", mode)
    cls = HessianLinearOperator if hvp == "forward-over-reverse" else _reverse_over_reverse()
    op = cls(ctx.model, loss, params, ctx.batches, **kw)
    op.hvp = hvp
    return op


def trace_estimate(op, *, method: str, probes: int, groups: int, distribution: str,
                   seed: int, device: torch.device) -> dict[str, Any]:
    """Hutchinson or Hutch++ trace of ``op`` with ``probes`` products in ``groups`` runs."""
    from curvlinops import hutchinson_trace, hutchpp_trace

    if method not in ("hutchinson", "hutchpp"):
        raise ValueError(f"method must be 'hutchinson' or 'hutchpp', got {method!r}")
    if groups < 1 or probes < groups or probes % groups:
        raise ValueError(f"probes ({probes}) must be a positive multiple of groups ({groups})")
    per = probes // groups
    if method == "hutchpp" and per % 3:
        raise ValueError(
            f"Hutch++ needs a multiple of 3 products per group, got probes/groups = {per}"
        )
    dim = op.shape[0]
    if per >= dim:
        raise ValueError(
            f"{per} products per group for a {dim} x {dim} Hessian: use fewer probes (the "
            "exact trace costs as much)"
        )
    fn = hutchinson_trace if method == "hutchinson" else hutchpp_trace
    with seeded(seed, device):
        runs = [float(fn(op, per, distribution=distribution)) for _ in range(groups)]
    value = float(np.mean(runs))
    stderr = float(np.std(runs, ddof=1) / math.sqrt(groups)) if groups > 1 else None
    return {"value": value, "stderr": stderr, "runs": runs, "dim": dim,
            "hvp": getattr(op, "hvp", None)}


def _network_trace(ctx: Context, method: str, probes: int, groups: int,
                   distribution: str) -> dict[str, Any]:
    op = hessian_operator(ctx, ctx.params())
    return trace_estimate(op, method=method, probes=probes, groups=groups,
                          distribution=distribution, seed=ctx.seed, device=ctx.device)


def _conv_trace(ctx: Context, method: str, probes: int, groups: int,
                distribution: str) -> dict[str, Any]:
    head = ctx.head()
    op = hessian_operator(ctx, [head.conv.weight])
    out = trace_estimate(op, method=method, probes=probes, groups=groups,
                         distribution=distribution, seed=ctx.seed, device=ctx.device)
    exact = ctx.exact().trace
    out["exact"] = exact
    out["relative_error"] = (out["value"] - exact) / abs(exact) if exact != 0 else None
    out["layer"] = head.conv_name
    return out


# quick-study defaults (a few seconds per small model); the full study uses more, see
# docs/measures.md. Hutchinson: 6 products in 3 runs of 2 (free error bar); Hutch++: 9
# products (3 sketch, 3 exact subspace, 3 Hutchinson) in one run.
_PROBES = ("rademacher", "normal")
_HUTCH = {"probes": Param(6, minimum=1), "groups": Param(3, minimum=1),
          "distribution": Param("rademacher", choices=_PROBES)}
_HUTCHPP = {**_HUTCH, "probes": Param(9, minimum=1), "groups": Param(1, minimum=1)}


@register("hutchinson_trace", defaults=_HUTCH, source="Hutchinson 1989; curvlinops")
def hutchinson_trace_measure(ctx: Context, *, probes: int, groups: int,
                             distribution: str) -> dict[str, Any]:
    r"""Hutchinson estimate of :math:`\mathrm{Tr}\,\nabla^2_\theta L` over all parameters:
    :math:`\frac1m\sum_i v_i^\top H v_i`, v Rademacher (Hutchinson 1989), through curvlinops."""
    return _network_trace(ctx, "hutchinson", probes, groups, distribution)


@register("hutchpp_trace", defaults=_HUTCHPP, source="Meyer et al. 2021 (Hutch++), Alg. 1")
def hutchpp_trace_measure(ctx: Context, *, probes: int, groups: int,
                          distribution: str) -> dict[str, Any]:
    r"""Hutch++ estimate of :math:`\mathrm{Tr}\,\nabla^2_\theta L` over all parameters
    (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1), through curvlinops."""
    return _network_trace(ctx, "hutchpp", probes, groups, distribution)


@register("hutchinson_conv_trace", defaults=_HUTCH, source="Hutchinson 1989; curvlinops")
def hutchinson_conv_trace(ctx: Context, *, probes: int, groups: int,
                          distribution: str) -> dict[str, Any]:
    r"""Hutchinson estimate of :math:`\mathrm{Tr}\,\nabla^2_W L` for the kernel W of the conv
    that feeds GAP; ``relative_error`` = (estimate - exact) / |exact| with the exact trace of
    :func:`convflat.curvature.exact_curvature` (docs/math.md Eq. (7))."""
    return _conv_trace(ctx, "hutchinson", probes, groups, distribution)


@register("hutchpp_conv_trace", defaults=_HUTCHPP, source="Meyer et al. 2021 (Hutch++), Alg. 1")
def hutchpp_conv_trace(ctx: Context, *, probes: int, groups: int,
                       distribution: str) -> dict[str, Any]:
    r"""Hutch++ estimate of :math:`\mathrm{Tr}\,\nabla^2_W L` for the last conv's kernel, with
    its ``relative_error`` against the exact trace."""
    return _conv_trace(ctx, "hutchpp", probes, groups, distribution)


def top_eigenvalue(op, *, method: str, iterations: int, tol: float, seed: int,
                   device: torch.device) -> dict[str, Any]:
    """Largest (algebraic) eigenvalue of a symmetric curvlinops operator.

    ``"lanczos"``: ``iterations`` steps of Lanczos without reorthogonalisation (curvlinops'
    ``fast_lanczos``, Papyan 2020, Algorithm 2) from a seeded random start; the largest Ritz
    value, a lower bound that converges to lambda_max from below (the extreme Ritz values
    converge first, and the loss of orthogonality only duplicates converged values).
    ``"eigsh"``: ARPACK's implicitly restarted Lanczos (scipy ``eigsh``, ``which="LA"``) to
    relative tolerance ``tol``, at most ``iterations`` restarts; slower, certified.
    """
    from curvlinops.papyan2020traces.spectrum import fast_lanczos

    dim = op.shape[0]
    if method == "lanczos":
        steps = min(int(iterations), dim)
        with seeded(seed, device):
            evals, _ = fast_lanczos(op, ncv=steps)
        return {"value": float(evals.max()), "matvecs": steps, "hvp": getattr(op, "hvp", None)}
    if method == "eigsh":
        from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

        A = op.to_scipy(dtype=np.float64)
        matvecs = 0

        def matvec(v: np.ndarray) -> np.ndarray:
            nonlocal matvecs
            matvecs += 1
            return A.matvec(v)

        counted = LinearOperator(A.shape, matvec=matvec, dtype=np.float64)
        v0 = np.random.default_rng(seed).standard_normal(dim)
        try:
            (lam,) = eigsh(counted, k=1, which="LA", tol=tol, v0=v0, maxiter=iterations,
                           ncv=min(dim - 1, 20), return_eigenvectors=False)
            converged = True
        except ArpackNoConvergence as exc:
            if len(exc.eigenvalues) == 0:
                raise
            lam, converged = float(np.max(exc.eigenvalues)), False
        return {"value": float(lam), "matvecs": matvecs, "converged": converged,
                "hvp": getattr(op, "hvp", None)}
    raise ValueError(f"method must be 'lanczos' or 'eigsh', got {method!r}")


@register(
    "hessian_top_eigenvalue",
    defaults={"method": Param("lanczos", choices=("lanczos", "eigsh")),
              "iterations": Param(8, minimum=1), "tol": Param(1e-3, above=0)},
    source="Keskar et al. 2017; Jiang et al. 2020 (sharpness via lambda_max)",
)
def hessian_top_eigenvalue(ctx: Context, *, method: str, iterations: int,
                           tol: float) -> dict[str, Any]:
    r""":math:`\lambda_{\max}(\nabla^2_\theta L)` of the whole network, by Lanczos on curvlinops'
    Hessian operator (see :func:`top_eigenvalue`; ``method="eigsh"`` for a certified value).
    ``iterations`` counts Hessian-vector products (lanczos) or ARPACK restarts (eigsh)."""
    op = hessian_operator(ctx, ctx.params())
    return top_eigenvalue(op, method=method, iterations=iterations, tol=tol, seed=ctx.seed,
                          device=ctx.device)


# ------------------------------------------------------------------ ours: the closed form


def _exact_extras(ctx: Context) -> dict[str, Any]:
    res = ctx.exact()
    return {"layer": res.layer, "classifier": res.classifier, "route": res.route}


@register("conv_trace", defaults={}, source="arXiv 2603.09016; docs/math.md Eq. (7)")
def conv_trace(ctx: Context) -> dict[str, Any]:
    r"""Exact :math:`\mathrm{Tr}\,\nabla^2_W L` of the conv that feeds GAP:
    :math:`\sum_c \frac1N\sum_n [M_n[c,c]\|J_{n,c}\|^2 + q_n[c]\sum_p T_n[c,p]\|u_{n,p}\|^2]`
    (docs/math.md Eq. (7); :func:`convflat.curvature.exact_curvature`)."""
    return {"value": ctx.exact().trace, **_exact_extras(ctx)}


@register("conv_relative_flatness", defaults={}, theory="invariant",
          source="Petzka et al. 2021; arXiv 2603.09016; docs/math.md Eq. (9)")
def conv_relative_flatness(ctx: Context) -> dict[str, Any]:
    r"""Exact conv relative flatness :math:`\kappa = \sum_{c,c'} \langle w_c, w_{c'}\rangle
    \mathrm{Tr}\,H_{c,c'}` (Petzka et al. 2021 with neurons -> filters; docs/math.md Eq. (9))."""
    return {"value": ctx.exact().relative_flatness, **_exact_extras(ctx)}


@register("classifier_trace", defaults={},
          source="Petzka et al. 2021; docs/math.md Eq. (12)")
def classifier_trace(ctx: Context) -> dict[str, Any]:
    r"""Exact trace of the Hessian in the classifier weight V (bias excluded):
    :math:`\frac1N\sum_n \|g_n\|^2\,\mathrm{tr}(A_n)` (docs/math.md Eq. (12))."""
    return {"value": ctx.exact().classifier_trace, **_exact_extras(ctx)}


@register("classifier_relative_flatness", defaults={"standardize": False}, theory="changes",
          source="Petzka et al. 2021; docs/math.md Eq. (13)")
def classifier_relative_flatness(ctx: Context, *, standardize: bool) -> dict[str, Any]:
    r"""Exact relative flatness of the classifier layer (Petzka et al. 2021):
    :math:`\kappa_V = \frac1N\sum_n \|g_n\|^2 (\sum_k G_V[k,k] p_{nk} - p_n^\top G_V p_n)`,
    :math:`G_V = VV^\top`.

    ``standardize=False`` (default): on the raw pooled features g, as docs/math.md Eq. (13)
    defines it; not invariant under conv filter rescaling (its features g move).
    ``standardize=True``: Petzka et al.'s script's convention, the same formula on the features
    rescaled to unit standard deviation over the measured samples, :math:`g'_{nc} = g_{nc}/s_c`,
    with the classifier rescaled to keep the logits, :math:`V'_{kc} = V_{kc} s_c`
    (:math:`s_c` the population standard deviation, divisor N). Then any positive rescaling of
    a feature (a filter of a ReLU conv feeding GAP with the classifier column divided by the
    same factor) leaves the value unchanged. A feature constant over the samples
    (:math:`s_c = 0`, a dead filter) is left out; the entry counts them in
    ``constant_features``.
    """
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be true or false, got {standardize!r}")
    if not standardize:
        return {"value": ctx.exact().classifier_relative_flatness, **_exact_extras(ctx)}
    head = ctx.head()
    return {**_standardized_kappa_v(ctx), "layer": head.conv_name,
            "classifier": head.linear_name}


def _standardized_kappa_v(ctx: Context) -> dict[str, Any]:
    """kappa_V on features rescaled to unit standard deviation (see
    :func:`classifier_relative_flatness`), in float64 from the classifier's inputs and outputs."""
    from convflat.curvature.driver import classifier_curvature

    head = ctx.head()
    linear = ctx.model.get_submodule(head.linear_name)
    feats, logits = [], []

    def hook(_m, inp, out):
        feats.append(inp[0].detach().double())
        logits.append(out.detach().double())

    handle = linear.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x, _ in ctx.batches:
                ctx.model(x)
    finally:
        handle.remove()
    g = torch.cat(feats).flatten(1)
    p = torch.softmax(torch.cat(logits), dim=1)
    std = g.std(0, unbiased=False)
    live = std > 0
    scale = torch.where(live, std, torch.ones_like(std))
    g_std = torch.where(live, g / scale, torch.zeros_like(g))
    V = linear.weight.detach().double() * torch.where(live, std, torch.zeros_like(std))
    _, kap = classifier_curvature(g_std, p, V)
    return {"value": float(kap) / g.shape[0], "constant_features": int((~live).sum())}
