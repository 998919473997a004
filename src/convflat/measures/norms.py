r"""Norm- and margin-based measures (Jiang et al. 2020, "Fantastic Generalization Measures").

Equation numbers refer to Jiang, Neyshabur, Mobahi, Krishnan, Bengio, "Fantastic Generalization
Measures and Where to Find Them", ICLR 2020 (arXiv:1912.02178), appendix C.

"Weights" are the parameters with two or more dimensions (conv kernels and linear matrices);
biases and BatchNorm affine parameters are left out unless ``include_bias=True``, as in the
paper. We report norms themselves, not their squares or logs: every transform used in the paper
is monotone, so rank correlations are unaffected.

**BatchNorm is folded first** (``fold_bn=True``, the default of every norm measure here): the
norms are taken on the network with each eval-mode BatchNorm folded into the conv before it
(:func:`convflat.measures.fold.fold_batchnorm`; the initial network of ``distance_from_init`` is
folded the same way). This is what the reference implementations of Jiang et al.'s measures do,
and it is what makes a norm a property of the function's parameterisation rather than of
BatchNorm's bookkeeping: scaling a conv's filters together with its BN's running statistics
leaves the function and the folded kernels unchanged but moves the raw kernels (docs/math.md
Eq. (11)). ``fold_bn=False`` measures the raw parameters. Each entry records ``bn_folded`` and
``bn_kept``, the numbers of BatchNorm layers folded and left as they are.

Spectral norms of convolutions are exact: the operator norm of the convolution as a linear map
on inputs of the size the layer actually sees (with its stride, padding, dilation and groups),
not the norm of the reshaped kernel matrix (which is neither an upper nor a lower bound in
general).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from convflat.measures.base import Param, register
from convflat.measures.context import Context

__all__ = ["conv_spectral_norm", "layer_spectral_norms", "linear_spectral_norm"]


def _weights(ctx: Context, model: nn.Module, include_bias: bool) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in ctx.named_params(model) if include_bias or p.ndim >= 2]


def _measured(ctx: Context, fold_bn: bool) -> tuple[Context, dict[str, int]]:
    """The context whose model the norms are taken on (BatchNorm-folded or raw), and the
    numbers of BatchNorm layers folded and kept, for the entry."""
    c = ctx.folded() if fold_bn else ctx
    kept = sum(isinstance(m, _BatchNorm) for m in c.model.modules())
    return c, {"bn_folded": len(c.fold.pairs) if c.fold is not None else 0, "bn_kept": kept}


def _flat_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


@register(
    "frobenius_norm",
    defaults={"include_bias": False, "fold_bn": True},
    theory="changes",
    uses_data=False,
    source="Jiang et al. 2020, eq. (42) (param norm), reported as its square root",
)
def frobenius_norm(ctx: Context, *, include_bias: bool, fold_bn: bool) -> dict[str, Any]:
    r"""Euclidean norm of all weights, :math:`\|\theta\|_2 = (\sum_i \|W_i\|_F^2)^{1/2}`.

    Jiang et al. 2020, eq. (42) ("param norm") is the square :math:`\sum_i \|W_i\|_F^2`.
    With ``fold_bn`` (default) the weights are those of the BatchNorm-folded network, as in
    the reference implementation (module docstring).
    """
    c, info = _measured(ctx, fold_bn)
    ws = _weights(c, c.model, include_bias)
    return {"value": _flat_norm([p for _, p in ws]), "n_tensors": len(ws), **info}


@register(
    "distance_from_init",
    defaults={"include_bias": False, "fold_bn": True},
    theory="changes",
    needs_init=True,
    uses_data=False,
    source="Jiang et al. 2020, eq. (40) (frobenius distance to init), square root",
)
def distance_from_init(ctx: Context, *, include_bias: bool, fold_bn: bool) -> dict[str, Any]:
    r"""Distance from initialisation, :math:`\|\theta - \theta_0\|_2` over all weights.

    Jiang et al. 2020, eq. (40) is the square :math:`\sum_i \|W_i - W_i^0\|_F^2`; Nagarajan and
    Kolter 2019 argue for the distance itself. ``theta_0`` comes from ``init_model`` (matched
    by parameter name). With ``fold_bn`` (default) both networks are BatchNorm-folded first,
    each with its own running statistics, as in the reference implementation.
    """
    c, info = _measured(ctx, fold_bn)
    init = dict(c.named_params(c.init_model))
    diffs = [p.detach() - init[n].detach() for n, p in _weights(c, c.model, include_bias)]
    return {"value": _flat_norm(diffs), **info}


# ------------------------------------------------------------------ spectral norms


def linear_spectral_norm(weight: torch.Tensor) -> float:
    """Largest singular value of a linear layer's matrix (exact, by SVD)."""
    return float(torch.linalg.matrix_norm(weight.detach().double(), ord=2))


def _conv_map(conv: nn.Conv2d, weight: torch.Tensor):
    # the layer's own forward without bias: this keeps its padding mode (zeros, circular,
    # reflect, ...), stride, dilation and groups exactly as the network applies them
    return lambda x: conv._conv_forward(x, weight, None)


def _explicit_matrix(fn, in_shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    n = int(np.prod(in_shape))
    eye = torch.eye(n, device=device, dtype=dtype).reshape(n, *in_shape)
    with torch.no_grad():
        out = torch.cat([fn(eye[i:i + 256]).reshape(min(256, n - i), -1)
                         for i in range(0, n, 256)])
    return out.T  # (out_dim, in_dim): column j is the image of basis vector j


def conv_spectral_norm(
    conv: nn.Conv2d,
    input_hw: tuple[int, int],
    *,
    method: str = "auto",
    tol: float = 1e-8,
    seed: int = 0,
    dense_max: int = 256,
) -> tuple[float, str]:
    r"""Largest singular value of the convolution as a linear map on ``C_in x H x W`` inputs.

    The convolution :math:`x \mapsto W * x` (bias excluded) is linear; its spectral norm is
    :math:`\sqrt{\lambda_{\max}(A^\top A)}`. Methods:

    * ``"dense"``: build the matrix A column by column (the conv applied to the identity basis)
      and take its largest singular value; for inputs up to ``dense_max`` entries.
    * ``"lanczos"``: Lanczos (scipy ``eigsh``, ARPACK) on :math:`A^\top A`, where
      :math:`A^\top` is applied by reverse-mode autodiff of the conv (exactly the adjoint,
      whatever the padding mode); converges to ``tol`` relative accuracy.
    * ``"fft"``: Sedghi, Gupta, Long, "The Singular Values of Convolutional Layers", ICLR 2019,
      Theorem 6: for a stride-1 *circular* convolution the singular values are those of the
      ``C_out x C_in`` matrices :math:`\hat K(u, v)` (2-D DFT of the kernel zero-padded to
      ``H x W``) over all frequencies. Exact for circular padding; for zero padding it is the
      norm of the circular convolution, an approximation.
    * ``"auto"``: "dense" up to ``dense_max`` input entries, else "lanczos".

    Returns ``(sigma_max, method_used)``.
    """
    C_in = conv.in_channels
    H, W = int(input_hw[0]), int(input_hw[1])
    n = C_in * H * W
    weight = conv.weight.detach().double()
    if method == "auto":
        method = "dense" if n <= dense_max else "lanczos"
    if method == "fft":
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ValueError("method='fft' needs stride 1, dilation 1 and groups 1")
        kh, kw = weight.shape[-2:]
        if kh > H or kw > W:
            raise ValueError(f"kernel {kh}x{kw} larger than the input {H}x{W}")
        Khat = torch.fft.fft2(weight, s=(H, W))  # (C_out, C_in, H, W), complex
        sv = torch.linalg.matrix_norm(Khat.permute(2, 3, 0, 1), ord=2)  # (H, W)
        return float(sv.max()), "fft"
    fn = _conv_map(conv, weight)
    if method == "dense":
        A = _explicit_matrix(fn, (C_in, H, W), weight.device, weight.dtype)
        return float(torch.linalg.matrix_norm(A, ord=2)), "dense"
    if method != "lanczos":
        raise ValueError(f"method must be 'auto', 'dense', 'lanczos' or 'fft', got {method!r}")
    x0 = torch.zeros(1, C_in, H, W, dtype=weight.dtype, device=weight.device)
    _, vjp = torch.func.vjp(fn, x0)  # the conv is linear: its vjp at any point is A^T

    def normal(v: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(v).reshape(1, C_in, H, W), device=weight.device,
                            dtype=weight.dtype)
        with torch.no_grad():
            y = fn(x)
        (xt,) = vjp(y)
        return xt.reshape(-1).cpu().numpy()

    op = LinearOperator((n, n), matvec=normal, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    (lam,) = eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return math.sqrt(max(float(lam), 0.0)), "lanczos"


def layer_spectral_norms(
    model: nn.Module, example_input: torch.Tensor, *, method: str = "auto", tol: float = 1e-8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Spectral norm of every Conv2d and Linear layer, in forward order.

    Each conv is measured at the spatial size of the input it receives in a forward pass of
    ``example_input`` (recorded with hooks). A module called more than once is measured at the
    size of its first call.
    """
    sizes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            def hook(m, inp, out, name=name):
                if name not in sizes:
                    sizes[name] = tuple(inp[0].shape[1:])
                    order.append(name)
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    mods = dict(model.named_modules())
    out = []
    for name in order:
        mod = mods[name]
        if isinstance(mod, nn.Linear):
            out.append({"layer": name, "kind": "linear",
                        "sigma": linear_spectral_norm(mod.weight), "method": "svd"})
        else:
            sigma, used = conv_spectral_norm(mod, sizes[name][-2:], method=method, tol=tol,
                                             seed=seed)
            out.append({"layer": name, "kind": "conv", "input": list(sizes[name]),
                        "sigma": sigma, "method": used})
    return out


def _spectral(ctx: Context, method: str, tol: float, fold_bn: bool
              ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    c, info = _measured(ctx, fold_bn)
    layers = c.shared(
        ("spectral_norms", method, tol),
        lambda: layer_spectral_norms(c.model, c.example_input[:1], method=method, tol=tol,
                                     seed=c.seed),
    )
    return layers, info


_SPECTRAL = {"method": Param("auto", choices=("auto", "dense", "lanczos", "fft")),
             "tol": Param(1e-8, above=0), "fold_bn": True}


@register(
    "spectral_norm_sum",
    defaults=dict(_SPECTRAL),
    theory="changes",
    uses_data=False,
    source="sum of layer spectral norms (a plain variant; not Jiang et al. 2020, eq. (35))",
)
def spectral_norm_sum(ctx: Context, *, method: str, tol: float, fold_bn: bool
                      ) -> dict[str, Any]:
    r"""Sum of layer spectral norms, :math:`\sum_i \|W_i\|_2` over Conv2d and Linear layers.

    Conv norms are operator norms at the layer's input size (:func:`conv_spectral_norm`), on
    the BatchNorm-folded network unless ``fold_bn=False`` (module docstring). This plain sum is
    *not* Jiang et al. 2020's "sum-of-spec", eq. (35): that one is
    :math:`\log(d\,(\prod_i \|W_i\|_2^2)^{1/d})`, a function of the product and the depth
    only (``spectral_norm_balanced_sum``). The plain sum moves under the function-preserving
    rescaling of whole layers (layer i times c > 0, layer i+1 divided by c, ReLU between),
    which leaves the product and eq. (35) unchanged.
    """
    layers, info = _spectral(ctx, method, tol, fold_bn)
    return {"value": sum(r["sigma"] for r in layers), "layers": layers, **info}


@register(
    "spectral_norm_balanced_sum",
    defaults=dict(_SPECTRAL),
    theory="changes",
    uses_data=False,
    source="Jiang et al. 2020, eq. (35) (sum-of-spec), exponentiated",
)
def spectral_norm_balanced_sum(ctx: Context, *, method: str, tol: float, fold_bn: bool
                               ) -> dict[str, Any]:
    r"""Jiang et al.'s "sum-of-spec", :math:`d\,(\prod_{i=1}^d \|W_i\|_2^2)^{1/d}` over the d
    Conv2d and Linear layers (eq. (35) is its log, reported as ``log_value``).

    By the AM-GM inequality it is the smallest :math:`\sum_i \|c_i W_i\|_2^2` over layer
    rescalings :math:`c_i > 0` with :math:`\prod_i c_i = 1`, i.e. the sum of squared spectral
    norms of the best-balanced network computing the same function (ReLU). For a fixed depth
    it is a monotone function of ``spectral_norm_product``; across depths it is not. Conv
    norms as in ``spectral_norm_sum``, on the BatchNorm-folded network unless ``fold_bn=False``.
    """
    layers, info = _spectral(ctx, method, tol, fold_bn)
    d = len(layers)
    log_prod_sq = sum(2 * math.log(r["sigma"]) for r in layers)
    log_value = math.log(d) + log_prod_sq / d
    return {"value": math.exp(log_value), "log_value": log_value, "depth": d, **info}


@register(
    "spectral_norm_product",
    defaults=dict(_SPECTRAL),
    theory="changes",
    uses_data=False,
    source="Jiang et al. 2020, eq. (32) (log product of spectral norms), exponentiated",
)
def spectral_norm_product(ctx: Context, *, method: str, tol: float, fold_bn: bool
                          ) -> dict[str, Any]:
    r"""Product of layer spectral norms, :math:`\prod_i \|W_i\|_2` (also as ``log_value``).

    Jiang et al. 2020, eq. (32) is :math:`\log \prod_i \|W_i\|_2^2 = 2\,` ``log_value``. The
    product bounds the network's Lipschitz constant for 1-Lipschitz activations (Bartlett
    et al. 2017). On the BatchNorm-folded network unless ``fold_bn=False`` (module
    docstring): only then is it a bound of the eval-mode network's Lipschitz constant.
    """
    layers, info = _spectral(ctx, method, tol, fold_bn)
    log_value = sum(math.log(r["sigma"]) for r in layers)
    return {"value": math.exp(log_value), "log_value": log_value, **info}


# ------------------------------------------------------------------ path norm and margin


@register(
    "path_norm",
    defaults={"fold_bn": True},
    theory="invariant",
    uses_data=False,
    source="Neyshabur et al. 2015; Jiang et al. 2020, eq. (44)",
)
def path_norm(ctx: Context, *, fold_bn: bool) -> dict[str, Any]:
    r"""Path norm :math:`\sum_k f_{\theta^{\circ 2}}(\mathbf 1)_k` of the BatchNorm-folded net.

    Every parameter is squared elementwise and an all-ones input (one sample, the data's
    shape) is passed through in eval mode; the outputs are summed (Neyshabur, Tomioka, Srebro
    2015; Jiang et al. 2020, eq. (44)). For a bias-free ReLU network this is the sum over all
    input-output paths of the product of squared weights.

    With ``fold_bn`` (default) the network is first BatchNorm-folded (module docstring), as in
    the reference implementation: the path norm is then that of the plain conv network that
    computes the same function, and it is invariant under positive per-filter rescaling
    (the squared network is rescaled by :math:`\alpha_c^2` in the same function-preserving
    way) and under the rescaling of a conv together with its BN's running statistics (which
    leaves the folded network unchanged). With ``fold_bn=False`` the raw parameters are
    squared but BatchNorm's running statistics, being buffers, are not, which is neither a
    path norm of the network nor invariant. A BatchNorm that follows no conv (after a
    residual add) is kept, with squared affine parameters, in both cases.
    """
    c, info = _measured(ctx, fold_bn)
    model = copy.deepcopy(c.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.pow_(2)
        x = torch.ones((1, *c.batches[0][0].shape[1:]), device=c.device, dtype=c.dtype)
        value = float(model(x).double().sum())
    return {"value": value, **info}


@register(
    "inverse_margin",
    defaults={"percentile": Param(10.0, above=0, maximum=100)},
    theory="invariant",
    source="Jiang et al. 2020, eq. (22)",
)
def inverse_margin(ctx: Context, *, percentile: float) -> dict[str, Any]:
    r"""Inverse squared margin :math:`1/\gamma^2` (Jiang et al. 2020, eq. (22)).

    The margin of sample n is :math:`f(x_n)_{y_n} - \max_{j \ne y_n} f(x_n)_j`; ``gamma`` is
    its ``percentile``-th percentile over the training set (the 10th in the paper, which is
    robust to a few outliers): the k-th smallest margin with ``k = max(1, floor(m p/100))``.
    Undefined for ``gamma <= 0`` (more than ``p``% of the training set misclassified); the
    value is then ``inf``, the monotone continuation of ``1/gamma^2`` from ``gamma -> 0+``.
    The margin itself is returned as ``margin``.
    """
    margins = ctx.baseline()["margins"]
    m = margins.numel()
    k = max(1, int(m * float(percentile) / 100.0))
    gamma = float(margins.kthvalue(k).values)
    value = 1.0 / gamma**2 if gamma > 0 else math.inf
    return {"value": value, "margin": gamma}
