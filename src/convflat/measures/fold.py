r"""Fold eval-mode BatchNorm into the convolution before it: the same function, fewer layers.

In eval mode a BatchNorm after a convolution is a per-channel affine map of the conv's output,

.. math:: \mathrm{BN}(a)_c = \gamma_c \frac{a_c - \mu_c}{\sqrt{v_c + \epsilon}} + \beta_c ,

with the running mean :math:`\mu` and variance :math:`v` (buffers) and the affine parameters
:math:`\gamma, \beta`. With :math:`s_c = \gamma_c / \sqrt{v_c + \epsilon}` the pair conv -> BN
is the single conv with kernel and bias

.. math:: W'_c = s_c\, W_c, \qquad b'_c = s_c\,(b_c - \mu_c) + \beta_c

(:math:`b_c = 0` for a conv without bias). :func:`fold_batchnorm` returns a deep copy of the
network with every such pair replaced by the folded conv followed by ``nn.Identity``.

Why the norm measures fold: a network with BatchNorm has a family of parameterisations of one
function that a raw-parameter norm cannot tell apart. Multiplying filter c of a conv by
:math:`a_c > 0` and its BN's running mean by :math:`a_c` and running variance to
:math:`a_c^2 (v_c + \epsilon) - \epsilon` leaves the function unchanged (docs/math.md Eq. (11))
but multiplies the raw kernel by :math:`a_c`; the folded kernel :math:`W'` does not move. The
reference implementations of Jiang et al. 2020's measures (Neyshabur's generalization-bounds,
and its re-implementation for Dziugaite et al. 2020, "In search of robust measures of
generalization") fold BN the same way before every norm and before the PAC-Bayes
perturbation. They keep the BN layer with unit statistics, which scales each channel by
:math:`1/\sqrt{1+\epsilon}` (a relative change of about :math:`5\cdot 10^{-6}` per layer);
here the BN is removed, so the folded network computes exactly the original function.

Which pairs are folded: the BN's only input is the conv's output, the conv's output feeds
nothing else, each module is called once in the forward, the conv is an ordinary (not
transposed) ``nn.Conv1d/2d/3d`` whose output channels the BN normalises, and the BN tracks
running statistics (a BN without them normalises by batch statistics even in eval mode, which
no conv can absorb). The data flow comes from a ``torch.fx`` trace; when a model cannot be
traced, the pairs are the consecutive (conv, BN) children of ``nn.Sequential`` containers (the
layout of torchvision's ``Conv2dNormActivation`` and of convflat's ``ConvBNAct``). Any other
BatchNorm (one after a residual add, as in pre-activation ResNets) stays as it is.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

__all__ = ["FoldResult", "conv_bn_pairs", "fold_batchnorm"]


@dataclass
class FoldResult:
    """What :func:`fold_batchnorm` did.

    Attributes:
        model: the folded copy (eval mode; the input model is never modified).
        pairs: ``(conv name, BN name)`` of every folded pair, in forward order.
        kept: names of the BatchNorm modules left as they are.
        method: how the pairs were found: "fx" (a torch.fx trace) or "sequential".
    """

    model: nn.Module
    pairs: list[tuple[str, str]] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    method: str = "fx"


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        isinstance(conv, _ConvNd) and not conv.transposed
        and isinstance(bn, _BatchNorm) and bn.running_mean is not None
        and bn.running_var is not None and bn.num_features == conv.out_channels
    )


def _pairs_fx(model: nn.Module) -> list[tuple[str, str]]:
    gm = fx.symbolic_trace(model)
    mods = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], _BatchNorm):
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue
        if _foldable(mods[src.target], mods[node.target]):
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Sequential) or type(mod).forward is not nn.Sequential.forward:
            continue
        children = list(mod.named_children())
        for (n1, m1), (n2, m2) in itertools.pairwise(children):
            if _foldable(m1, m2):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + n1, prefix + n2))
    return pairs


def conv_bn_pairs(model: nn.Module) -> tuple[list[tuple[str, str]], str]:
    """``(conv name, BN name)`` pairs that :func:`fold_batchnorm` folds, and the method used
    to find them ("fx", or "sequential" when ``model`` cannot be traced); see the module
    docstring for the conditions."""
    try:
        return _pairs_fx(model), "fx"
    except Exception:  # fx raises many types; all mean "fall back to module order"
        return _pairs_sequential(model), "sequential"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


@torch.no_grad()
def fold_batchnorm(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    *,
    rtol: float | None = None,
) -> FoldResult:
    r"""A deep copy of ``model`` (eval mode) with every eval BatchNorm folded into its conv.

    Each folded conv gets :math:`W'_c = s_c W_c` and :math:`b'_c = s_c (b_c - \mu_c) +
    \beta_c` with :math:`s_c = \gamma_c/\sqrt{v_c+\epsilon}` (computed in float64, stored in
    the conv's dtype; a conv without bias gets one), and its BN becomes ``nn.Identity``. The
    folded parameters require grad as the originals did.

    With ``example_input`` the logits of the copy are compared with the original's and a
    ValueError is raised when they differ by more than ``rtol`` relative to the largest logit
    (default 1e-10 in float64, 1e-4 otherwise).
    """
    out = copy.deepcopy(model).eval()
    pairs, method = conv_bn_pairs(out)
    for conv_name, bn_name in pairs:
        conv, bn = out.get_submodule(conv_name), out.get_submodule(bn_name)
        w = conv.weight
        dt = torch.float64
        inv_std = torch.rsqrt(bn.running_var.to(dt) + bn.eps)
        gamma = bn.weight.to(dt) if bn.weight is not None else torch.ones_like(inv_std)
        beta = bn.bias.to(dt) if bn.bias is not None else torch.zeros_like(inv_std)
        s = gamma * inv_std
        b = conv.bias.to(dt) if conv.bias is not None else torch.zeros_like(inv_std)
        new_w = w.to(dt) * s.view(-1, *([1] * (w.ndim - 1)))
        new_b = (b - bn.running_mean.to(dt)) * s + beta
        grad = w.requires_grad
        conv.weight = nn.Parameter(new_w.to(w.dtype), requires_grad=grad)
        conv.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=grad)
        _set_submodule(out, bn_name, nn.Identity())
    kept = [n for n, m in out.named_modules() if isinstance(m, _BatchNorm)]
    if example_input is not None and pairs:
        src = copy.deepcopy(model).eval() if model.training else model
        ref = src(example_input)
        new = out(example_input)
        tol = rtol if rtol is not None else (1e-10 if ref.dtype == torch.float64 else 1e-4)
        err = float((new - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if err > tol:
            raise ValueError(
                f"folding BatchNorm into the convs ({', '.join(b for _, b in pairs)}) changed "
                f"the logits (relative error {err:.2e} > {tol:.0e})")
    return FoldResult(out, pairs, kept, method)
