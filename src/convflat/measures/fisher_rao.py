r"""Fisher-Rao norm (Liang, Poggio, Rakhlin, Stokes, AISTATS 2019, arXiv:1711.01530).

Definition (Liang et al., Section 2): with the Fisher information
:math:`I(\theta) = \mathbb E[\nabla_\theta \ell(f_\theta(x), y)\,
\nabla_\theta \ell(f_\theta(x), y)^\top]`,

.. math:: \|\theta\|_{fr}^2 = \langle \theta, I(\theta)\, \theta \rangle
          = \mathbb E\big[\langle \theta, \nabla_\theta \ell(f_\theta(x), y)\rangle^2\big].

General form used here. For the cross-entropy :math:`\nabla_\theta \ell = J_\theta^\top (p - e_y)`
with :math:`J_\theta = \partial f/\partial\theta` (logits) and :math:`p = \mathrm{softmax}(f)`, so

.. math:: \langle \theta, \nabla_\theta \ell \rangle = (p - e_y)^\top u,\qquad
          u = J_\theta\, \theta,

where ``u`` is the directional derivative of the logits along :math:`\theta` itself: one
forward-mode (jvp) pass per batch, for any architecture (biases, BatchNorm in eval mode,
residual adds, smooth activations). Two choices of the label distribution:

* **model** (the default, the Fisher information of the model's own predictive distribution,
  as in Liang et al.'s definition): :math:`y \sim p`, and the expectation over y is exact,
  :math:`\mathbb E_{y\sim p}[((p-e_y)^\top u)^2] = u^\top (\mathrm{diag}(p) - p p^\top) u
  = \mathrm{Var}_{y\sim p}(u_y)`; so :math:`\|\theta\|_{fr}^2 = \theta^\top F \theta` with
  :math:`F = \frac1N\sum_n J_n^\top A_n J_n` the (generalised Gauss-Newton =) Fisher matrix;
* **empirical** (returned as ``empirical``): y is the training label,
  :math:`\frac1N\sum_n ((p_n - e_{y_n})^\top u_n)^2`, the form Jiang et al. 2020 evaluate.

Structural lemma (Liang et al., Lemma 2.1): for a network without biases whose activations are
positively homogeneous (ReLU, leaky ReLU) with L+1 weight layers, Euler's theorem gives
:math:`u = J_\theta \theta = (L+1) f`, hence :math:`\|\theta\|_{fr}^2 =
(L+1)^2\,\mathbb E[\langle \partial\ell/\partial f, f\rangle^2]`. The jvp computes the general
form without assuming this (the tests check the lemma as a special case).

Invariance: for any function-preserving diagonal rescaling :math:`\theta' = D\theta`
(:math:`f_{D\theta} = f_\theta` for all :math:`\theta`), :math:`J_{\theta'} = J_\theta D^{-1}`,
so :math:`u' = J_\theta D^{-1} D \theta = u`: the norm is exactly invariant.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.func import functional_call, jvp

from convflat.measures.base import Param, register
from convflat.measures.context import Context

__all__ = ["fisher_rao_terms"]


def fisher_rao_terms(ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``u^T A u`` (model labels) and ``((p - e_y)^T u)^2`` (empirical labels)."""
    named = dict(ctx.named_params())
    buffers = dict(ctx.model.named_buffers())
    primals = {n: p.detach() for n, p in named.items()}
    model_terms, emp_terms = [], []
    for x, y in ctx.batches:
        def f(params: dict[str, torch.Tensor], x=x) -> torch.Tensor:
            return functional_call(ctx.model, {**params, **buffers}, (x,))

        with torch.no_grad():
            z, u = jvp(f, (primals,), (primals,))  # u = J_theta theta, (B, K)
        z, u = z.double(), u.double()
        p = torch.softmax(z, dim=1)
        pu = (p * u).sum(1)
        model_terms.append(((p * u * u).sum(1) - pu * pu).cpu())
        emp_terms.append((pu - u.gather(1, y.view(-1, 1)).squeeze(1)).pow(2).cpu())
    return torch.cat(model_terms), torch.cat(emp_terms)


@register(
    "fisher_rao_norm",
    defaults={"labels": Param("model", choices=("model", "empirical"))},
    theory="invariant",
    source="Liang et al. 2019 (AISTATS), Section 2, Fisher-Rao norm; Lemma 2.1",
)
def fisher_rao_norm(ctx: Context, *, labels: str) -> dict[str, Any]:
    r"""Squared Fisher-Rao norm :math:`\|\theta\|_{fr}^2 = \theta^\top I(\theta)\,\theta`.

    ``labels="model"``: :math:`\frac1N\sum_n u_n^\top (\mathrm{diag}(p_n) - p_n p_n^\top) u_n`
    with :math:`u_n = J_n\theta` (exact expectation over :math:`y \sim p_n`);
    ``labels="empirical"``: :math:`\frac1N\sum_n ((p_n - e_{y_n})^\top u_n)^2`. Both are
    returned (``value`` follows ``labels``; ``model`` and ``empirical`` carry both). Liang,
    Poggio, Rakhlin, Stokes 2019, Section 2 and Lemma 2.1; see the module docstring for the
    derivation and the invariance.
    """
    if labels not in ("model", "empirical"):
        raise ValueError(f"labels must be 'model' or 'empirical', got {labels!r}")
    model_terms, emp_terms = fisher_rao_terms(ctx)
    model_value, emp_value = float(model_terms.mean()), float(emp_terms.mean())
    return {
        "value": model_value if labels == "model" else emp_value,
        "model": model_value,
        "empirical": emp_value,
    }
