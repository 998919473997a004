r"""PAC-Bayes flatness and bound (Jiang et al. 2020, "Fantastic Generalization Measures").

The posterior is :math:`N(w, \sigma'^2 I)` around the trained weights. Jiang et al. (Section 6
and appendix C) pick :math:`\sigma'` as the largest standard deviation whose perturbation raises
the training 0-1 loss (lowers the training accuracy) by at most ``target`` (0.1):

.. math:: \sigma' = \max\{\sigma : |\mathbb E_{u\sim N(0,\sigma^2 I)}
          \mathrm{acc}(w+u) - \mathrm{acc}(w)| \le 0.1\},

found by bisection with ``mc_samples`` Monte Carlo draws per trial and stopped when the
deviation is within ``tol`` of the target. Then (equation numbers of arXiv:1912.02178, App. C)

* ``pacbayes_flatness`` :math:`= 1/\sigma'^2` (eq. (53));
* ``pacbayes_bound`` :math:`= \frac{\|w - w_0\|_2^2}{4\sigma'^2} + \log\frac{m}{\sigma'} + 10`
  (eq. (48), "pacbayes.init", m training samples, :math:`w_0` the initialisation);
* ``pacbayes_mag_flatness`` :math:`= 1/\alpha'^2` (eq. (61)), the magnitude-aware variant with
  :math:`u_i \sim N(0, \alpha'^2 w_i^2 + \epsilon^2)`, :math:`\epsilon = 10^{-3}`.

**Convention: sigma is a standard deviation**, :math:`u = \sigma z` with z standard normal
(some public implementations pass :math:`\sigma^2` where torch expects a standard deviation).

Implementation choices, both deterministic for a fixed seed:

* bisection is geometric (midpoint :math:`\sqrt{lo \cdot hi}`) on ``[lower, upper]``, because
  :math:`\sigma'` ranges over orders of magnitude across models; an arithmetic bisection of
  ``[0, 2]`` with 10 steps cannot resolve :math:`\sigma' \approx 10^{-2}` to better than 20%.
  The reported :math:`\sigma'` is the last midpoint tried, as in Jiang et al.'s Algorithm;
* common random numbers: every trial sigma reuses the same seeded draws z, so the deviation is
  a deterministic, (nearly) monotone function of sigma and the bisection does not chase noise.

**BatchNorm is folded first** (``fold_bn=True``, default): the perturbed network is the one with
every eval-mode BatchNorm folded into the conv before it
(:func:`convflat.measures.fold.fold_batchnorm`), and the bound's initial network is folded the
same way. Isotropic noise on a raw kernel followed by BatchNorm is noise of a size set by the
kernel's arbitrary scale (the running statistics absorb it); on the folded kernel it is noise on
the weights the function actually uses. ``fold_bn=False`` perturbs the raw parameters. The
entries record ``bn_folded``, the number of BatchNorm layers folded.

**What happens to the emptied BatchNorm** (``folded_bn``) is where convflat and the reference
code differ, and the two give different numbers on BatchNorm nets:

* ``"remove"`` (default): the BN becomes an identity; the perturbed parameters are those of the
  plain conv net that computes exactly the original function.
* ``"keep"``: the reference code of Jiang et al.'s measures (and its re-implementation for
  Dziugaite et al. 2020) keeps each emptied BN with :math:`\gamma = 1`, :math:`\beta = 0`,
  running mean 0 and variance 1 (it then scales its channel by :math:`1/\sqrt{1+\epsilon}`),
  and its :math:`\gamma, \beta` are perturbed with the rest: every BN adds a per-channel
  multiplicative factor :math:`1 + \sigma z` and offset :math:`\sigma z'` to the noise. Use
  it to compare with published values. On three BN gapcnns it lowered sigma' by 6-18 %
  (docs/measures.md, "PAC-Bayes").

The default is ``"remove"`` because then the measure depends on the function and its plain-conv
parameterisation only: a BN net and the plain net it folds to get the same sigma', whereas with
``"keep"`` the extra noise on the unit BN parameters makes sigma' depend on whether (and where)
the architecture had BatchNorm. Without BatchNorm the two are the same.

All trainable parameters of the measured network are perturbed (weights, biases, and the
affine parameters of any BatchNorm left unfolded), and the bound's norm runs over the same set,
so that it is the KL of the perturbed posterior to the prior :math:`N(w_0, \sigma'^2 I)`.

Defaults: ``mc_samples=256`` draws per trial, ``tol=0.005``, ``depth=14``. On three quick-study
nets (BatchNorm gapcnns trained on digits, 256 training images, seeds 0-9) the sigma found
varies across seeds by a relative range (max - min)/mean of 2.4-4.8 % with the default
``folded_bn="remove"`` and 4.8 % on the net where ``"keep"`` varies most; 128 draws gave
2.4-4.8 % and up to 9.5 % (``"keep"``), 64 draws up to 9.3 %, Jiang et al.'s 5 draws with
tolerance 0.01 about 19 %. The range is quantised: the reported sigma is a point of the
geometric bisection grid, about 2.4 % apart at the depth these searches stop, so 4.8 % is two
grid steps and the next possible value is 7.2 %. The mean over seeds is within 1.4 % of a
512-draw search with tolerance 0.001. The price: up to 256 x 14 forward passes over the data
per search (it stops at the first trial within ``tol``; about twice the 128-draw search),
against Jiang et al.'s 5 x 10.
Command and tables: docs/measures.md and docs/benchmarks.md (``python -m convflat.bench measures
--spread``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convflat.measures.base import Param, register
from convflat.measures.context import Context, perturbed

__all__ = ["FOLDED_BN", "sigma_search"]


def sigma_search(
    ctx: Context,
    *,
    magnitude: bool = False,
    magnitude_eps: float = 1e-3,
    target: float = 0.1,
    tol: float = 0.005,
    mc_samples: int = 256,
    depth: int = 14,
    lower: float = 1e-5,
    upper: float = 2.0,
) -> dict[str, Any]:
    """Largest sigma (std) whose Gaussian perturbation moves the accuracy by ``target``.

    ``magnitude=True`` searches alpha' with per-weight std ``sqrt(alpha'^2 w^2 + eps^2)``.
    Returns ``sigma``, the achieved ``deviation``, ``iterations`` and ``base_accuracy``.
    """
    if not 0 < lower < upper:
        raise ValueError(f"need 0 < lower < upper, got lower={lower}, upper={upper}")
    if mc_samples < 1 or depth < 1:
        raise ValueError(f"need mc_samples >= 1 and depth >= 1, got {mc_samples}, {depth}")
    params = ctx.params()
    w2 = [p.detach() ** 2 for p in params]
    base = ctx.accuracy()

    def deviation(sigma: float) -> float:
        gen = ctx.generator()  # common random numbers across trial sigmas
        accs = []
        for _ in range(mc_samples):
            z = ctx.randn_like_params(params, gen)
            if magnitude:
                u = [torch.sqrt(sigma**2 * w + magnitude_eps**2) * zi
                     for w, zi in zip(w2, z, strict=True)]
            else:
                u = [sigma * zi for zi in z]
            with perturbed(params, u):
                accs.append(ctx.accuracy())
        return abs(sum(accs) / len(accs) - base)

    lo, hi = float(lower), float(upper)
    trials = []
    for _ in range(depth):
        sigma = math.sqrt(lo * hi)
        dev = deviation(sigma)
        trials.append([sigma, dev])
        if abs(dev - target) < tol:
            break
        if dev > target:
            hi = sigma  # too much perturbation
        else:
            lo = sigma  # not enough to reach the target deviation
    return {
        "sigma": sigma, "deviation": dev, "iterations": len(trials), "base_accuracy": base,
        "trials": trials,
    }


FOLDED_BN = ("remove", "keep")

_SEARCH = {"target": Param(0.1, above=0, maximum=1), "tol": Param(0.005, above=0),
           "mc_samples": Param(256, minimum=1), "depth": Param(14, minimum=1),
           "lower": Param(1e-5, above=0), "upper": Param(2.0, above=0), "fold_bn": True,
           "folded_bn": Param("remove", choices=FOLDED_BN)}


def _unit_batchnorm(model: nn.Module, original: nn.Module, pairs: list[tuple[str, str]]
                    ) -> nn.Module:
    """A copy of the folded ``model`` with each folded BatchNorm put back empty: the class,
    ``eps`` and ``affine`` of ``original``'s, with weight 1, bias 0, running mean 0 and running
    variance 1 (the reference code's reparameterisation)."""
    out = copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        src = original.get_submodule(bn_name)
        conv = out.get_submodule(conv_name)
        bn = type(src)(src.num_features, eps=src.eps, momentum=src.momentum,
                       affine=src.affine, track_running_stats=True)
        bn = bn.to(device=conv.weight.device, dtype=conv.weight.dtype).eval()
        for p in bn.parameters():
            p.requires_grad_(conv.weight.requires_grad)
        parent, _, attr = bn_name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, attr, bn)
    return out.eval()


def _kept_bn_context(ctx: Context, c: Context) -> Context:
    """A child of the folded context ``c`` whose model (and initial model) keep the emptied
    BatchNorm layers of ``ctx``'s model (``folded_bn="keep"``); ``c`` when nothing was folded."""
    if c.fold is None or not c.fold.pairs:
        return c

    def make() -> Context:
        child = Context.__new__(Context)
        child.__dict__.update(c.__dict__)
        child.model = _unit_batchnorm(c.model, ctx.model, c.fold.pairs)
        if c.init_model is not None:
            child.init_model = _unit_batchnorm(c.init_model, ctx.init_model, c.fold.pairs)
        child._cache, child._seconds, child._subsets = {}, {}, {}
        child._used, child._computed = None, set()
        child._parent = c
        return child

    return c.shared("folded_bn_kept", make)


def _searched(ctx: Context, fold_bn: bool, folded_bn: str) -> Context:
    """The context whose parameters the search perturbs (see the module docstring)."""
    if folded_bn not in FOLDED_BN:
        raise ValueError(f"folded_bn must be one of {', '.join(map(repr, FOLDED_BN))}, "
                         f"got {folded_bn!r}")
    if not fold_bn:
        return ctx
    c = ctx.folded()
    return _kept_bn_context(ctx, c) if folded_bn == "keep" else c


def _shared_sigma(ctx: Context, magnitude: bool, fold_bn: bool, folded_bn: str, **search: Any
                  ) -> tuple[Context, dict[str, Any]]:
    """The context searched (BatchNorm-folded unless ``fold_bn`` is false, the emptied
    BatchNorms removed or kept as ``folded_bn`` says) and its search."""
    c = _searched(ctx, fold_bn, folded_bn)
    key = ("pacbayes_sigma", magnitude, tuple(sorted(search.items())))
    return c, c.shared(key, lambda: sigma_search(c, magnitude=magnitude, **search))


def _fold_info(c: Context) -> dict[str, int]:
    kept = sum(isinstance(m, _BatchNorm) for m in c.model.modules())
    return {"bn_folded": len(c.fold.pairs) if c.fold is not None else 0,
            "bn_in_measured_net": kept}


@register(
    "pacbayes_flatness",
    defaults=dict(_SEARCH),
    theory="changes",
    source="Jiang et al. 2020, eq. (53) (pacbayes.flatness)",
)
def pacbayes_flatness(ctx: Context, **search: Any) -> dict[str, Any]:
    r""":math:`1/\sigma'^2`, sigma' the largest std of isotropic Gaussian weight noise that moves
    the training accuracy by ``target`` (Jiang et al. 2020, eq. (53); see module docstring)."""
    c, s = _shared_sigma(ctx, False, **search)
    return {"value": 1.0 / s["sigma"] ** 2, "sigma": s["sigma"], "deviation": s["deviation"],
            "iterations": s["iterations"], **_fold_info(c)}


@register(
    "pacbayes_bound",
    defaults=dict(_SEARCH),
    theory="changes",
    needs_init=True,
    source="Jiang et al. 2020, eq. (48) (pacbayes.init)",
)
def pacbayes_bound(ctx: Context, **search: Any) -> dict[str, Any]:
    r""":math:`\|w - w_0\|^2/(4\sigma'^2) + \log(m/\sigma') + 10` (Jiang et al. 2020, eq. (48)),
    with the same sigma' as ``pacbayes_flatness`` and m the number of training samples."""
    c, s = _shared_sigma(ctx, False, **search)
    init = dict(c.named_params(c.init_model))
    dist2 = sum(float((p.detach() - init[n].detach()).double().pow(2).sum())
                for n, p in c.named_params())
    sigma = s["sigma"]
    value = dist2 / (4 * sigma**2) + math.log(c.n_samples / sigma) + 10
    return {"value": value, "sigma": sigma, "distance_sq": dist2, **_fold_info(c)}


@register(
    "pacbayes_mag_flatness",
    defaults={**_SEARCH, "magnitude_eps": Param(1e-3, minimum=0)},
    theory="nearly invariant",
    source="Jiang et al. 2020, eq. (61) (pacbayes.mag.flatness)",
)
def pacbayes_mag_flatness(ctx: Context, **search: Any) -> dict[str, Any]:
    r""":math:`1/\alpha'^2` for the magnitude-aware posterior
    :math:`u_i \sim N(0, \alpha'^2 w_i^2 + \epsilon^2)` (Jiang et al. 2020, eq. (61)). Invariant
    under function-preserving rescaling up to the ``epsilon`` floor."""
    c, s = _shared_sigma(ctx, True, **search)
    return {"value": 1.0 / s["sigma"] ** 2, "sigma": s["sigma"], "deviation": s["deviation"],
            "iterations": s["iterations"], **_fold_info(c)}
