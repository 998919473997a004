r"""Sharpness: how much the training loss rises under a bounded or random weight perturbation.

All these measures perturb every trainable parameter (weights, biases, BatchNorm affine
parameters; running statistics are buffers and stay fixed), evaluate the mean cross-entropy
:math:`L` over the whole training set (``max_samples`` subsamples it), and restore the exact
original weights afterwards, also when an exception interrupts them.

With a scale vector ``c`` (``c = 1`` plain, ``c = |w| + eta`` adaptive/elementwise):

* worst case (Foret et al. 2021, SAM's rho-sharpness; Kwon et al. 2021, ASAM; Andriushchenko
  et al. 2023, Section 3):

  .. math:: S_{\max}^\rho = \max_{\|\delta \oslash c\|_p \le \rho} L(w + \delta) - L(w);

* Keskar et al. 2017's sharpness (their Eq. (3), in the full parameter space, A = I): the box
  :math:`|\delta_i| \le \epsilon(|w_i| + 1)` (the worst case above with the max-norm and
  ``c = |w| + 1``), and the rise relative to the loss, in percent:

  .. math:: \phi_\epsilon = 100\,\frac{\max_{|\delta_i| \le \epsilon(|w_i|+1)} L(w+\delta)
            - L(w)}{1 + L(w)};

* average case (Andriushchenko et al. 2023, Section 3; Jiang et al. 2020 Section 6 discuss
  the same quantity as the PAC-Bayes perturbation):

  .. math:: S_{\mathrm{avg}}^\sigma = \mathbb E_{z \sim N(0, I)} L(w + \sigma\, c \odot z) - L(w).

With ``c = |w|`` and ``eta = 0`` both are invariant under any function-preserving diagonal
rescaling :math:`w \mapsto Dw` (ReLU filter rescaling included): the perturbation set (and the
seeded noise) scale with the weights, :math:`L(Dw + |Dw| \odot \varepsilon) = L(w + |w| \odot
\varepsilon)`. ASAM's ``eta > 0`` (used in training to move zero weights) breaks this slightly.

Sources: Keskar, Mudigere, Nocedal, Smelyanskiy, Tang, "On Large-Batch Training for Deep
Learning: Generalization Gap and Sharp Minima", ICLR 2017, Section 2.2.2;
Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization", ICLR 2021;
Kwon, Kim, Park, Choi, "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021;
Andriushchenko, Croce, Müller, Hein, Flammarion, "A Modern Look at the Relationship between
Sharpness and Generalization", ICML 2023. Andriushchenko et al. average the worst case over
random batches of m samples (m-sharpness); here m is the whole (sub)set, the setting of
Keskar et al. 2017 and Jiang et al. 2020.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from convflat.measures.base import Param, register
from convflat.measures.context import Context, perturbed

__all__ = ["average_sharpness", "keskar_sharpness", "worst_case_sharpness"]


def _scales(params, adaptive: bool, eta: float) -> list[torch.Tensor]:
    if adaptive:
        return [p.detach().abs() + eta for p in params]
    return [torch.ones_like(p) for p in params]


def _norm(ts: list[torch.Tensor], p: str) -> torch.Tensor:
    if p == "l2":
        return torch.sqrt(sum((t.double() ** 2).sum() for t in ts))
    return max(t.abs().max().double() for t in ts)


def worst_case_sharpness(
    ctx: Context,
    *,
    rho: float,
    max_steps: int,
    tol: float = 1e-3,
    window: int = 5,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    step_fraction: float = 0.5,
) -> dict[str, Any]:
    r"""Projected gradient ascent on :math:`L(w + c \odot \varepsilon)` over
    :math:`\|\varepsilon\|_p \le \rho` (``norm`` "l2" or "linf"), run until it converges.

    The ascent runs in the rescaled variable :math:`\varepsilon = \delta \oslash c`, where the
    gradient is :math:`\tilde g = c \odot \nabla L(w + c \odot \varepsilon)`. Step 1 goes
    straight to the boundary, :math:`\varepsilon = \rho\,\tilde g/\|\tilde g\|_2` (l2) or
    :math:`\rho\,\mathrm{sign}(\tilde g)` (linf): the one-step solution of SAM (plain) and
    ASAM (adaptive). Each further step moves by ``step_fraction * rho`` along the normalised
    (l2) or signed (linf) gradient and projects back onto the ball. The result is the largest
    loss increase over all iterates, including :math:`\varepsilon = 0`, so it is >= 0 and
    exactly 0 for ``rho = 0``.

    Stopping: after each evaluated iterate t the best increase so far, :math:`b_t`, is
    compared with :math:`b_{t-\mathrm{window}}`; the ascent stops once the relative change
    :math:`(b_t - b_{t-\mathrm{window}})/b_t` is below ``tol`` (``tol=0`` never stops early),
    or after ``max_steps`` ascent steps. A fixed number of steps is not enough: on four
    quick-study nets five steps fell 2-23 % short of the best of four 300-step ascents,
    depending on the net, while this rule stopped after 15-40 steps within 0.11 % of it
    (docs/measures.md, ``python -m convflat.bench measures --spread``). Each step costs one
    gradient evaluation over the data; the last iterate costs one more forward pass.

    The loss is not concave in the perturbation, so the value is the local maximum the ascent
    reaches from the SAM point (as in the reference implementations); ascents from random
    points of the sphere can find higher ones (docs/measures.md, "Sharpness").

    Returns ``value``, ``loss``, ``base_loss``, ``steps`` (ascent steps taken),
    ``last_relative_change`` (the stopping quantity at the end) and ``converged`` (whether it
    fell below ``tol`` before the cap).
    """
    _check_ascent(rho=rho, max_steps=max_steps, tol=tol, window=window, norm=norm)
    params = ctx.params()
    scale = _scales(params, adaptive, eta)
    eps = [torch.zeros_like(p) for p in params]
    base, best, best_loss = None, 0.0, None
    history: list[float] = []  # best increase after each evaluated iterate

    def delta() -> list[torch.Tensor]:
        return [c * e for c, e in zip(scale, eps, strict=True)]

    def record(loss: float) -> None:
        nonlocal best, best_loss
        if loss - base > best:
            best, best_loss = loss - base, loss
        history.append(best)

    # moved: whether eps changed since the last loss evaluation; taken: ascent steps
    moved, taken, converged = False, 0, False
    while True:
        with perturbed(params, delta()):
            loss, grads = ctx.loss_and_grad(params)
        if base is None:
            base, best_loss = loss, loss  # the same code path as every perturbed loss
        record(loss)
        moved = False
        if _relative_change(history, window) < tol:
            converged = True
            break
        g = [c * gr for c, gr in zip(scale, grads, strict=True)]
        alpha = rho if taken == 0 else step_fraction * rho
        if alpha == 0.0:
            converged = True
            break  # rho = 0: the ball is the point w
        eps = _ascent_step(eps, g, alpha, rho, norm)
        if eps is None:
            converged = True
            break  # a stationary point of the rescaled loss: no ascent direction
        moved = True
        taken += 1
        if taken == max_steps:
            break  # the last iterate needs only its loss, not its gradient
    if moved:  # the last ascent step has not been evaluated yet
        with perturbed(params, delta()):
            loss, _ = ctx.loss_accuracy()
        record(loss)
        converged = _relative_change(history, window) < tol
    last = _relative_change(history, window)
    return {"value": best, "loss": best_loss, "base_loss": base, "steps": taken,
            "last_relative_change": None if math.isinf(last) else last,
            "converged": converged}


def keskar_sharpness(
    ctx: Context, *, eps: float, max_steps: int, tol: float = 1e-3, window: int = 5,
    step_fraction: float = 0.5,
) -> dict[str, Any]:
    r"""Keskar et al. 2017's sharpness :math:`100\,(\max_{\delta \in C_\epsilon} L(w+\delta)
    - L(w)) / (1 + L(w))` over the box :math:`C_\epsilon = \{|\delta_i| \le
    \epsilon(|w_i|+1)\}` in the full parameter space.

    The maximum is :func:`worst_case_sharpness` with the max-norm, ``rho = eps`` and the
    elementwise scale ``c = |w| + 1`` (``eta = 1``): projected sign-gradient ascent in the box,
    run to convergence (Keskar et al. take 10 L-BFGS-B iterations). Returns ``value``, the
    unnormalised ``rise``, ``base_loss`` and the ascent's ``steps``, ``last_relative_change``
    and ``converged``.
    """
    r = worst_case_sharpness(ctx, rho=eps, max_steps=max_steps, tol=tol, window=window,
                             norm="linf", adaptive=True, eta=1.0, step_fraction=step_fraction)
    rise = r.pop("value")
    return {"value": 100.0 * rise / (1.0 + r["base_loss"]), "rise": rise, **r}


def _relative_change(history: list[float], window: int) -> float:
    """The ascent's stopping quantity: (b_t - b_{t-window}) / b_t of the best increases
    ``history`` (inf before ``window`` + 1 of them, 0 while the best is 0)."""
    if len(history) <= window:
        return math.inf
    now, then = history[-1], history[-1 - window]
    return (now - then) / now if now > 0 else 0.0


def _check_ascent(*, rho: float, max_steps: int, tol: float, window: int, norm: str) -> None:
    """:func:`worst_case_sharpness`'s ascent settings, each checked by name."""
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if rho < 0 or max_steps < 1 or window < 1 or tol < 0:
        raise ValueError(f"need rho >= 0, max_steps >= 1, window >= 1 and tol >= 0, got "
                         f"rho={rho}, max_steps={max_steps}, window={window}, tol={tol}")


def _ascent_step(eps: list[torch.Tensor], g: list[torch.Tensor], alpha: float, rho: float,
                 norm: str) -> list[torch.Tensor] | None:
    """One projected ascent step of size ``alpha`` from ``eps`` along the rescaled gradient
    ``g``: normalised and projected onto the l2 ball of radius ``rho``, or signed and
    clamped to the linf ball. None when the l2 gradient is zero (no ascent direction)."""
    if norm == "l2":
        gn = float(_norm(g, "l2"))
        if gn == 0.0:
            return None
        eps = [e + (alpha / gn) * gi for e, gi in zip(eps, g, strict=True)]
        en = float(_norm(eps, "l2"))
        if en > rho:
            eps = [e * (rho / en) for e in eps]
        return eps
    return [(e + alpha * gi.sign()).clamp(-rho, rho) for e, gi in zip(eps, g, strict=True)]


def average_sharpness(
    ctx: Context, *, sigma: float, samples: int, adaptive: bool = False, eta: float = 0.0,
) -> dict[str, Any]:
    r"""Monte Carlo :math:`\mathbb E_z L(w + \sigma\, c \odot z) - L(w)`, z standard normal.

    ``sigma`` is a standard deviation (relative to ``|w|`` when adaptive). ``samples`` draws
    from a CPU generator seeded with the measurement seed (common random numbers: the same
    seed gives the same z for every model of the same shape). Returns the mean and its standard
    error over the draws.
    """
    if samples < 1 or sigma < 0:
        raise ValueError(f"need samples >= 1 and sigma >= 0, got {samples}, {sigma}")
    params = ctx.params()
    scale = _scales(params, adaptive, eta)
    base, _ = ctx.loss_accuracy()
    gen = ctx.generator()
    rises = []
    for _ in range(samples):
        z = ctx.randn_like_params(params, gen)
        with perturbed(params, [sigma * c * zi for c, zi in zip(scale, z, strict=True)]):
            loss, _ = ctx.loss_accuracy()
        rises.append(loss - base)
    r = torch.tensor(rises, dtype=torch.float64)
    stderr = float(r.std() / math.sqrt(samples)) if samples > 1 else None
    return {"value": float(r.mean()), "stderr": stderr, "base_loss": base}


_ASCENT = {"max_steps": Param(100, minimum=1), "tol": Param(1e-3, minimum=0),
           "window": Param(5, minimum=1), "norm": Param("l2", choices=("l2", "linf")),
           "step_fraction": Param(0.5, above=0)}


@register(
    "sharpness_worst",
    defaults={"rho": Param(0.05, minimum=0), **_ASCENT},
    theory="changes",
    source="Foret et al. 2021 (rho-sharpness)",
)
def sharpness_worst(ctx: Context, *, rho: float, max_steps: int, tol: float, window: int,
                    norm: str, step_fraction: float) -> dict[str, Any]:
    r"""Worst-case rho-sharpness :math:`\max_{\|\delta\|_p\le\rho} L(w+\delta) - L(w)`
    (Foret et al.'s; Keskar et al.'s differently bounded and normalised sharpness is
    ``sharpness_keskar``), by
    projected gradient ascent until the best value changes by less than ``tol`` (relative)
    over ``window`` steps, at most ``max_steps`` steps (see :func:`worst_case_sharpness`);
    the entry records ``steps``, ``last_relative_change`` and ``converged``."""
    return worst_case_sharpness(ctx, rho=rho, max_steps=max_steps, tol=tol, window=window,
                                norm=norm, adaptive=False, step_fraction=step_fraction)


@register(
    "sharpness_keskar",
    defaults={"eps": 1e-3, **{k: v for k, v in _ASCENT.items() if k != "norm"}},
    theory="changes",
    source="Keskar et al. 2017, Eq. (3) (full space, A = I)",
)
def sharpness_keskar(ctx: Context, *, eps: float, max_steps: int, tol: float, window: int,
                     step_fraction: float) -> dict[str, Any]:
    r"""Keskar et al.'s sharpness: the largest loss rise in the box
    :math:`|\delta_i| \le \epsilon(|w_i|+1)`, divided by :math:`1 + L(w)`, times 100 (see
    :func:`keskar_sharpness`)."""
    return keskar_sharpness(ctx, eps=eps, max_steps=max_steps, tol=tol, window=window,
                            step_fraction=step_fraction)


@register(
    "sharpness_adaptive",
    defaults={"rho": Param(0.5, minimum=0), **_ASCENT, "eta": Param(0.0, minimum=0)},
    theory="invariant",
    source="Kwon et al. 2021 (ASAM); Andriushchenko et al. 2023, adaptive worst-case sharpness",
)
def sharpness_adaptive(ctx: Context, *, rho: float, max_steps: int, tol: float, window: int,
                       norm: str, eta: float, step_fraction: float) -> dict[str, Any]:
    r"""Elementwise-adaptive worst-case sharpness
    :math:`\max_{\|\delta \oslash (|w|+\eta)\|_p\le\rho} L(w+\delta) - L(w)`
    (ASAM's :math:`T_w = \mathrm{diag}(|w|)`), by projected gradient ascent to convergence
    as in ``sharpness_worst``."""
    return worst_case_sharpness(ctx, rho=rho, max_steps=max_steps, tol=tol, window=window,
                                norm=norm, adaptive=True, eta=eta, step_fraction=step_fraction)


@register(
    "sharpness_avg",
    defaults={"sigma": Param(0.01, minimum=0), "samples": Param(10, minimum=1)},
    theory="changes",
    source="Andriushchenko et al. 2023, average-case sharpness; Jiang et al. 2020",
)
def sharpness_avg(ctx: Context, *, sigma: float, samples: int) -> dict[str, Any]:
    r"""Average-case sharpness :math:`\mathbb E_{\delta\sim N(0,\sigma^2 I)} L(w+\delta) - L(w)`
    (see :func:`average_sharpness`)."""
    return average_sharpness(ctx, sigma=sigma, samples=samples, adaptive=False)


@register(
    "sharpness_avg_adaptive",
    defaults={"sigma": Param(0.1, minimum=0), "samples": Param(10, minimum=1),
              "eta": Param(0.0, minimum=0)},
    theory="invariant",
    source="Andriushchenko et al. 2023, adaptive average-case sharpness",
)
def sharpness_avg_adaptive(ctx: Context, *, sigma: float, samples: int,
                           eta: float) -> dict[str, Any]:
    r"""Adaptive average-case sharpness
    :math:`\mathbb E_{z} L(w + \sigma (|w|+\eta)\odot z) - L(w)`, z standard normal."""
    return average_sharpness(ctx, sigma=sigma, samples=samples, adaptive=True, eta=eta)
