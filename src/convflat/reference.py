"""Independent references for the closed form: the dense autograd Hessian of the kernel.

These are the slow, obviously-correct computations that the tests and the workflow's
exactness table compare :func:`convflat.curvature.exact_curvature` against. They form the
full ``(C d) x (C d)`` Hessian of the mean cross-entropy in the conv kernel with
``torch.autograd.functional.hessian`` and read off its trace, block traces and the relative
flatness. Use them on tiny networks only: the Hessian has ``(C d)^2`` entries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = [
    "SmallGapNet",
    "architecture_suite",
    "autograd_kernel_hessian",
    "dense_measures",
    "exactness_table",
]


def autograd_kernel_hessian(
    model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Hessian of ``mean_n CE(model(x_n), y_n)`` in the kernel of ``layer``, as (C d, C d).

    The model is evaluated in eval mode (restored afterwards) and in its own dtype: pass a
    float64 model and inputs for a float64 reference.
    """
    module = dict(model.named_modules())[layer]
    W0 = module.weight.detach().clone()
    key = f"{layer}.weight"
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        def loss(W: torch.Tensor) -> torch.Tensor:
            out = functional_call(model, {key: W}, (x,))
            return F.cross_entropy(out, y)

        H = torch.autograd.functional.hessian(loss, W0)
    finally:
        for m, f in flags:
            m.training = f
    n = W0.numel()
    return H.reshape(n, n)


def dense_measures(H: torch.Tensor, W: torch.Tensor) -> dict[str, Any]:
    """Trace, C x C block traces and relative flatness read off a dense kernel Hessian.

    ``W`` is the kernel (C x ...); block (c, c') of ``H`` is the d x d sub-matrix between the
    flattened filters c and c'; ``kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'}``.
    """
    C = W.shape[0]
    d = W[0].numel()
    Hb = H.reshape(C, d, C, d)
    blocks = torch.einsum("aibi->ab", Hb)
    Wf = W.reshape(C, d).to(H.dtype)
    return {
        "trace": float(H.diagonal().sum()),
        "block_traces": blocks,
        "relative_flatness": float(((Wf @ Wf.T) * blocks).sum()),
    }


class SmallGapNet(nn.Module):
    """A tiny CNN in the class: stem conv -> act -> [pool] -> last conv -> [BN] [+ residual]
    -> act -> GAP -> Linear. The residual is a second conv of the stem features with the last
    conv's geometry, computed before it (so it does not depend on the measured kernel)."""

    def __init__(
        self, *, in_ch: int = 2, width: int = 3, filters: int = 4, classes: int = 3,
        act: str = "relu", bn: bool = False, residual: bool = False, bias: bool = True,
        kernel=(3, 3), stride=1, padding=1, dilation=1, padding_mode: str = "zeros",
        groups: int = 1,
    ):
        super().__init__()
        acts = {
            "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "gelu": nn.GELU,
            "silu": nn.SiLU, "identity": nn.Identity, "tanh": nn.Tanh, "relu6": nn.ReLU6,
        }
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        self.act0 = nn.Tanh()  # smooth and sign-changing, so the trunk is generic
        self.residual = (
            nn.Conv2d(width, filters, kernel, stride=stride, padding=padding,
                      dilation=dilation, padding_mode=padding_mode, bias=False)
            if residual else None
        )
        self.last = nn.Conv2d(width, filters, kernel, stride=stride, padding=padding,
                              dilation=dilation, bias=bias, padding_mode=padding_mode,
                              groups=groups)
        self.bn = nn.BatchNorm2d(filters) if bn else nn.Identity()
        self.act = acts[act]()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(filters, classes)

    def forward(self, x):
        """Logits of the batch ``x``."""
        h = self.act0(self.stem(x))
        if self.residual is not None:
            r = self.residual(h)
            return self.fc(self.flat(self.pool(self.act(self.bn(self.last(h)) + r))))
        return self.fc(self.flat(self.pool(self.act(self.bn(self.last(h))))))


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict
    n: int = 7
    hw: tuple[int, int] = (6, 6)


def architecture_suite() -> list[Case]:
    """The networks of the exactness table and tests: activations, BN, residual, bias,
    stride, padding, dilation, non-square kernels, K = 2 and K = 10, padding modes, groups."""
    acts = ["relu", "leaky_relu", "gelu", "silu", "identity"]
    cases = [Case(f"{a}", {"act": a}) for a in acts]
    cases += [Case(f"{a}+bn", {"act": a, "bn": True}) for a in acts]
    cases += [Case(f"{a}+residual", {"act": a, "residual": True}) for a in ("relu", "gelu", "silu")]
    cases += [
        Case("relu+bn+residual", {"act": "relu", "bn": True, "residual": True}),
        Case("silu+bn+residual, no bias", {"act": "silu", "bn": True, "residual": True,
                                           "bias": False}),
        Case("relu, stride 2", {"act": "relu", "stride": 2}, hw=(7, 7)),
        Case("gelu, no padding", {"act": "gelu", "padding": 0}),
        Case("silu, dilation 2", {"act": "silu", "dilation": 2, "padding": 2}),
        Case("relu, kernel 3x2", {"act": "relu", "kernel": (3, 2), "padding": (1, 0)}, hw=(6, 5)),
        Case("gelu, kernel 1x3 stride (2,1)", {"act": "gelu", "kernel": (1, 3), "stride": (2, 1),
                                              "padding": (0, 1)}),
        Case("silu, stride 2 and dilation 2", {"act": "silu", "stride": 2, "dilation": 2,
                                               "padding": 2}, hw=(8, 7)),
        Case("relu, kernel 2x3 stride 3", {"act": "relu", "kernel": (2, 3), "stride": 3,
                                          "padding": 1}, hw=(8, 8)),
        Case("relu, K=2", {"act": "relu", "classes": 2}),
        Case("silu+bn, K=10", {"act": "silu", "bn": True, "classes": 10}, n=11),
        Case("relu, K=10, no bias", {"act": "relu", "classes": 10, "bias": False}, n=13),
        Case("gelu, reflect padding", {"act": "gelu", "padding_mode": "reflect"}),
        Case("silu, 'same' padding", {"act": "silu", "padding": "same", "kernel": (2, 3)}),
        Case("relu6, groups 3", {"act": "relu6", "groups": 3, "width": 3, "filters": 6}),
        Case("tanh, circular padding", {"act": "tanh", "padding_mode": "circular"}),
    ]
    return cases


def build_case(case: Case, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 network of the suite with randomized BN statistics, and its data."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallGapNet(**case.kwargs).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                C = m.num_features
                m.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 0.3)
                m.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
                m.weight.copy_(torch.randn(C, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64) * 0.3)
    in_ch = case.kwargs.get("in_ch", 2)
    K = case.kwargs.get("classes", 3)
    x = torch.randn(case.n, in_ch, *case.hw, generator=g, dtype=torch.float64)
    y = torch.randint(0, K, (case.n,), generator=g)
    return model, x, y


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def exactness_table(cases: list[Case] | None = None, seed: int = 0, batch_size: int = 3):
    """Closed form against the dense autograd Hessian over the architecture suite.

    Returns a pandas DataFrame: architecture, n_params of the kernel, trace (closed form),
    trace (autograd), their relative errors for the trace, the worst block trace (relative to
    the largest block) and kappa, and the seconds of each computation.
    """
    import pandas as pd

    from convflat.curvature import exact_curvature

    rows = []
    for case in cases or architecture_suite():
        model, x, y = build_case(case, seed)
        t0 = time.perf_counter()
        res = exact_curvature(model, (x, y), layer="last", device="cpu", batch_size=batch_size)
        t1 = time.perf_counter()
        H = autograd_kernel_hessian(model, "last", x, y)
        ref = dense_measures(H, model.last.weight.detach())
        t2 = time.perf_counter()
        blocks = ref["block_traces"]
        rows.append({
            "architecture": case.name,
            "kernel_params": model.last.weight.numel(),
            "n_samples": case.n,
            "trace_closed_form": res.trace,
            "trace_autograd": ref["trace"],
            "rel_err_trace": _rel(res.trace, ref["trace"]),
            "rel_err_blocks": float((res.block_traces - blocks).abs().max()
                                    / blocks.abs().max().clamp_min(1e-300)),
            "kappa_closed_form": res.relative_flatness,
            "rel_err_kappa": _rel(res.relative_flatness, ref["relative_flatness"]),
            "seconds_closed_form": t1 - t0,
            "seconds_autograd": t2 - t1,
        })
    return pd.DataFrame(rows)
