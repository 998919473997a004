r"""The driver: :func:`exact_curvature` and its :class:`CurvatureResult`.

For each batch, following docs/math.md: the trunk runs once (the conv input ``X_n`` and its
output ``a``); then, chunk by chunk of samples, the head gives ``S_n``, ``T_n`` (Eq. (3)) and
the logits, the route's products give ``JJ_n = (S_n Q_n S_n^T)`` or ``J_n J_n^T`` (Eq. (8)),
and the Gauss-Newton part ``sum_n M_n o JJ_n`` and the sigma'' part of Eq. (6) are added to
their sums; the classifier's Eqs. (12), (13), the loss and the accuracy are summed once per
batch. At the end the block traces are divided by N, their diagonal sums to Tr H (Eq. (7))
and ``kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'}`` (Eq. (9)).
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from convflat.curvature.contract import (
    _direct_products,
    _GaussNewtonSum,
    _gram_products,
    _outer_by_gemm,
    _route_costs,
    _samples_per_chunk,
    _sigma2_term,
)
from convflat.curvature.gram import _GatheredGram, _PhaseGram
from convflat.curvature.head import Head, OutOfClassError, find_head
from convflat.curvature.options import CurvatureOptions
from convflat.curvature.plan import (
    _check_finite,
    _check_labels,
    _eval_mode,
    _head,
    _model_device,
    _Plan,
    _trunk,
    _Workspace,
    model_dtype,
)
from convflat.io import iter_batches, resolve_device

# The memory budget of one chunk of samples when chunk_bytes is not given: on CPU small
# enough that a chunk's per-sample arrays stay in the caches, on CUDA large enough that the
# batched kernels have work to fill the device.
_CHUNK_BYTES = {"cpu": 32 * 2**20, "cuda": 256 * 2**20}


@dataclass
class CurvatureResult:
    """Exact curvature of the conv that feeds GAP, and of the classifier (bias excluded).

    ``trace`` = Tr H (H: Hessian of the mean cross-entropy in the conv kernel, docs/math.md
    Eq. (7)); ``relative_flatness`` = kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'} (Eq. (9));
    ``block_traces`` (C x C) = Tr H_{c,c'} (Eq. (6)); ``classifier_trace`` = Tr H_V (Eq. (12))
    and ``classifier_relative_flatness`` = kappa_V (Eq. (13), Petzka et al. 2021).
    """

    trace: float
    relative_flatness: float
    block_traces: torch.Tensor
    classifier_trace: float
    classifier_relative_flatness: float
    n_samples: int
    seconds: float
    layer: str
    classifier: str
    route: str
    gauss_newton_trace: float  # the part without sigma'' (equal to trace for ReLU heads)
    loss: float  # the mean cross-entropy at which the curvature was measured
    accuracy: float
    device: str
    dtype: str

    def to_dict(self, include_blocks: bool = False) -> dict[str, Any]:
        """The scalars (and, if asked, the block traces as nested lists) for JSON."""
        d = {
            "trace": self.trace,
            "relative_flatness": self.relative_flatness,
            "classifier_trace": self.classifier_trace,
            "classifier_relative_flatness": self.classifier_relative_flatness,
            "gauss_newton_trace": self.gauss_newton_trace,
            "loss": self.loss,
            "accuracy": self.accuracy,
            "n_samples": self.n_samples,
            "seconds": self.seconds,
            "layer": self.layer,
            "classifier": self.classifier,
            "route": self.route,
            "device": self.device,
            "dtype": self.dtype,
            "n_filters": int(self.block_traces.shape[0]),
        }
        if include_blocks:
            d["block_traces"] = self.block_traces.tolist()
        return d


class ZeroCurvatureWarning(UserWarning):
    """Every block trace of the measured conv is exactly 0: the loss does not depend on its
    kernel at these weights (typically a BatchNorm with gamma = 0 right after it, as timm
    initializes the last BatchNorm of each residual block)."""


def _zero_gamma_norm(head: Head) -> str | None:
    """The name of a BatchNorm in the head whose gamma is 0 in every channel, if any (module
    or functional call, as in timm's ``BatchNormAct2d``)."""
    gm = head._gm
    for node in head._region:
        weight, name = None, None
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                weight, name = mod.weight, str(node.target)
        elif node.op == "call_function" and node.target is F.batch_norm:
            w = node.args[3] if len(node.args) > 3 else node.kwargs.get("weight")
            if w is not None and getattr(w, "op", None) == "get_attr":
                owner, _, attr = str(w.target).rpartition(".")
                weight, name = getattr(gm.get_submodule(owner), attr), owner
        if weight is not None and not bool(weight.detach().any()):
            return name
    return None


def _warn_if_zero(res: CurvatureResult, head: Head) -> None:
    """Say so when the Hessian in the kernel is exactly 0, and why when a zero-gamma
    BatchNorm explains it."""
    if bool(res.block_traces.any()):
        return
    norm = _zero_gamma_norm(head)
    why = (f"the BatchNorm '{norm}' after it has gamma = 0 in every channel, so the loss does "
           "not depend on this kernel (timm zero-initializes the last BatchNorm of each "
           "residual block: a fresh timm ResNet measures 0 here)" if norm is not None else
           "the loss does not depend on this kernel at these weights (a zero classifier, a "
           "zero scaling or dead activations after the conv)")
    warnings.warn(f"exact_curvature: the trace and every block trace of '{res.layer}' are "
                  f"exactly 0: {why}; measure trained weights or pass layer= to choose "
                  "another conv", ZeroCurvatureWarning, stacklevel=3)


def classifier_curvature(features: torch.Tensor, probs: torch.Tensor, V: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch sums of Tr H_V and kappa_V for the linear classifier (bias excluded).

    For one sample the Hessian of the cross-entropy in V is ``A_n (x) g_n g_n^T``, so
    ``Tr H_V = ||g_n||^2 tr(A_n) = ||g_n||^2 (1 - ||p_n||^2)`` (docs/math.md Eq. (12)) and,
    with the rows ``v_k`` of V as neurons and ``G_V = V V^T``,
    ``kappa_V = ||g_n||^2 (sum_k G_V[k,k] p_k - p^T G_V p)`` (Eq. (13), Petzka et al. 2021).

    Args:
        features: the pooled features ``g_n``, (B, C).
        probs: the softmax ``p_n``, (B, K).
        V: the classifier's weight, (K, C).

    Returns:
        ``(trace_sum, kappa_sum)``: the two 0-d tensors summed over the batch (not the means).

    Raises:
        RuntimeError: the shapes do not match (from the tensor products).
    """
    g2 = (features * features).sum(1)  # (B,)
    tr_A = 1.0 - (probs * probs).sum(1)
    GV = V @ V.T  # (K, K)
    kap = (probs * GV.diagonal()).sum(1) - ((probs @ GV) * probs).sum(1)
    return (g2 * tr_A).sum(), (g2 * kap).sum()


def _check_logits(model_logits: torch.Tensor, head_logits: torch.Tensor, head: Head) -> None:
    """Guard against a wrong split of the model: the head copy must reproduce the logits."""
    # (B, K, 1, 1) from a 1x1-conv classifier without a flatten: the same K logits
    ref = model_logits.detach().to(head_logits.dtype).reshape(head_logits.shape)
    if not torch.isfinite(ref).all():
        raise ValueError("non-finite logits in batch 0; check the checkpoint and the inputs")
    # float32 trunks feed a float64 head: allow float32 rounding, nothing more
    tol = 1e-8 if model_logits.dtype == torch.float64 else 1e-3
    scale = ref.abs().max().clamp_min(1.0)
    err = float((ref - head_logits).abs().max() / scale)
    if err > tol:
        raise OutOfClassError(
            f"the head after '{head.conv_name}' did not reproduce the model's logits "
            f"(relative error {err:.2e}); the model's forward is not the traced graph, so it "
            "cannot be measured exactly"
        )


class _Measurement:
    """The sums of one :func:`exact_curvature` call, batch by batch (float64): the
    Gauss-Newton blocks, the sigma'' diagonal, the classifier's trace and kappa, the loss."""

    def __init__(self, model: nn.Module, head: Head, dev: torch.device, dtype: torch.dtype,
                 route: str, chunk_bytes: int | None, options: CurvatureOptions):
        self.model, self.head, self.dev, self.dtype = model, head, dev, dtype
        self.route, self.options = route, options  # "auto" until the first batch decides
        self.plan = _Plan(model, head, dev, dtype, options)
        self.acc = acc = torch.float64
        C = self.plan.C
        self.T_diag = torch.zeros(C, dtype=acc, device=dev)  # sigma'' term, diagonal blocks
        self.clf_tr = torch.zeros((), dtype=acc, device=dev)
        self.clf_kap = torch.zeros((), dtype=acc, device=dev)
        self.loss_sum = torch.zeros((), dtype=acc, device=dev)
        self.correct = 0
        self.n = 0
        conv = head.conv
        self.d = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
        self.budget = chunk_bytes or _CHUNK_BYTES["cuda" if dev.type == "cuda" else "cpu"]
        self.ws = _Workspace(dev, dtype)
        self.gn: _GaussNewtonSum | None = None  # made at the first batch, when P is known

    def _choose_gram(self, X: torch.Tensor, a: torch.Tensor
                     ) -> _PhaseGram | _GatheredGram | None:
        """The route (fixed at the first batch: the cheaper by Eq. (15) when "auto"; grouped
        convs always direct) and, on the Gram route, the patch Gram's source; else None."""
        C, d, P = self.plan.C, self.d, a[0, 0].numel()
        gram = self.plan.gram(X.shape[2], X.shape[3], a.shape[2], a.shape[3])
        if self.route == "auto":
            q_cost = gram.cost(self.head.conv.in_channels) if gram is not None else P * P * d
            costs = _route_costs(C, P, d, q_cost)
            self.route = "gram" if costs["gram"] <= costs["direct"] else "direct"
        if gram is None:  # grouped convs
            self.route = "direct"
        return gram if self.route == "gram" else None

    def _gn_sum(self, gram: Any, P: int) -> _GaussNewtonSum:
        """The Gauss-Newton sum, made at the first batch with the tiling the options give."""
        if self.gn is None:
            o, C = self.options, self.plan.C
            outer = o.outer_by_gemm if o.outer_by_gemm is not None else _outer_by_gemm(C, P)
            self.gn = _GaussNewtonSum(
                self.plan.V, self.acc, self.ws, self.budget, gram is not None and outer,
                o.tile_bytes if self.dev.type == "cpu" else None, o.min_tiles,
                o.class_sum_max_bytes)
        return self.gn

    def _head_chunks(self, a: torch.Tensor, externals: list[Any], per: int
                     ) -> Iterator[tuple[slice, tuple]]:
        """``(sl, (S, T, g, z))`` for chunks of ``per`` samples; the head runs on the whole
        batch at once when one of its externals cannot be cut (such as the batch size)."""
        plan, B = self.plan, a.shape[0]
        whole = None
        if plan.chunk_externals(externals, slice(0, 1), B) is None:
            whole = _head(plan, a, externals)
        for s0 in range(0, B, per):
            sl = slice(s0, min(B, s0 + per))
            if whole is None:
                yield sl, _head(plan, a[sl], plan.chunk_externals(externals, sl, B))
            else:
                yield sl, tuple(t[sl] if t is not None else None for t in whole)

    def add_batch(self, bi: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One batch: trunk once, then head, route products and both sums chunk by chunk."""
        plan = self.plan
        X, a, externals = _trunk(plan, x)  # trunk once per batch, without autograd
        B, P, C = a.shape[0], a[0, 0].numel(), plan.C
        y = _check_labels(y, B, bi, plan.V.shape[0], self.dev)
        gram = self._choose_gram(X, a)
        gram_in = gram.prepare(X) if gram is not None else None
        c_in = self.head.conv.in_channels
        per = _samples_per_chunk(C, P, self.d, plan.groups, self.dtype.itemsize, self.budget,
                                 gram.numel(c_in) if gram is not None else None)
        gn = self._gn_sum(gram, P)
        zs, gs = [], []
        for sl, (S, T, g, z) in self._head_chunks(a, externals, per):
            if bi == 0 and sl.start == 0:  # non-finite logits are caught after the chunks
                k8 = min(8, z.shape[0])
                with torch.no_grad():
                    _check_logits(self.model(x[:k8]), z[:k8], self.head)
            zs.append(z)
            gs.append(g)
            p = torch.softmax(z, dim=1)  # (b, K)
            if gram is not None:  # JJ_n = (S_n Q_n) S_n^T
                SQ, diagQ = _gram_products(gram(gram_in[sl], self.ws), S, self.ws)
                A, Bm = SQ, S
            else:  # JJ_n = J_n J_n^T
                A, diagQ = _direct_products(plan.patch_rows(X[sl], self.ws), S, self.ws,
                                            T is not None)
                Bm, SQ = A, None
            gn.add(A, Bm, p, S, SQ)  # Gauss-Newton part: M_n o JJ_n
            if T is not None:  # sigma'' part, diagonal blocks only
                self.T_diag += _sigma2_term(T, diagQ, p, y[sl], plan.V).to(self.acc)
        self._add_classifier(bi, torch.cat(zs), torch.cat(gs), y)

    def _add_classifier(self, bi: int, z: torch.Tensor, g: torch.Tensor, y: torch.Tensor
                        ) -> None:
        """Per-batch sums: classifier trace and kappa (Eqs. (12), (13)), loss, accuracy."""
        _check_finite(z, bi, z.shape[0])
        p = torch.softmax(z, dim=1)
        ctr, ckap = classifier_curvature(g, p, self.plan.V_full)
        self.clf_tr += ctr.to(self.acc)
        self.clf_kap += ckap.to(self.acc)
        self.loss_sum += F.cross_entropy(z, y, reduction="sum").to(self.acc)
        self.correct += int((z.argmax(1) == y).sum())
        self.n += z.shape[0]

    def result(self, start: float) -> CurvatureResult:
        """Block traces (Eq. (6)) as means over the samples, Tr H (Eq. (7)), kappa (Eq. (9))."""
        n, acc, head = self.n, self.acc, self.head
        if n == 0:
            raise ValueError("data is empty: no samples to measure the curvature on")
        assert self.gn is not None
        BT = self.gn.total()
        gn_trace = float(BT.diagonal().sum() / n)
        BT.diagonal().add_(self.T_diag)
        BT = (BT / n).cpu()
        W = head.conv.weight.detach().to(dtype=acc, device="cpu").reshape(self.plan.C, -1)
        Gw = W @ W.T  # <w_c, w_c'>
        # For grouped convs the filters of all groups are d-vectors of the same shape; kappa
        # keeps the cross-group pairs, matching Tr of the Hessian in A of L(W (I + A)) with
        # one A shared by all groups' patches (docs/math.md Eq. (10)).
        return CurvatureResult(
            trace=float(BT.diagonal().sum()),
            relative_flatness=float((Gw * BT).sum()),
            block_traces=BT,
            classifier_trace=float(self.clf_tr / n),
            classifier_relative_flatness=float(self.clf_kap / n),
            n_samples=n,
            seconds=time.perf_counter() - start,
            layer=head.conv_name,
            classifier=head.linear_name,
            route=self.route if self.route != "auto" else "gram",
            gauss_newton_trace=gn_trace,
            loss=float(self.loss_sum / n),
            accuracy=self.correct / n,
            device=str(self.dev),
            dtype=str(self.dtype).replace("torch.", ""),
        )


def exact_curvature(
    model: nn.Module,
    data: Any,
    *,
    layer: str | None = None,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype = torch.float64,
    batch_size: int | None = None,
    route: str = "auto",
    progress: bool = False,
    chunk_bytes: int | None = None,
    options: CurvatureOptions | None = None,
) -> CurvatureResult:
    """Exact trace, block traces and relative flatness of the conv that feeds GAP.

    The Hessian is that of the mean cross-entropy in the conv's kernel, sigma'' part
    included (docs/math.md Eqs. (5)-(9)); nothing is estimated. The model is measured in eval
    mode and left in the mode it came in. Memory does not grow with the number of samples:
    sums are streamed over batches.

    Args:
        model: a CNN whose chosen conv feeds global average pooling and one ``nn.Linear``
            through channel-wise, position-wise ops (see :func:`find_head`).
        data: a DataLoader, an iterable of ``(x, y)`` batches, or a pair of tensors
            ``(X, Y)`` (split into ``batch_size`` batches).
        layer: the conv to measure (a name from ``model.named_modules()``); found if None.
        device: "auto" (CUDA when present), "cpu", "cuda:0", ... The model is not moved: when
            the device differs from the model's, a copy is measured.
        dtype: precision of the per-sample products (sums are always float64).
        batch_size: the batch size when ``data`` is a pair of tensors (default 256).
        route: "gram" (patch Gram Q_n = U_n^T U_n), "direct" (J_n = S_n U_n^T), or "auto"
            (the cheaper from the layer's shape, docs/math.md Eq. (15)). Grouped convs always
            take the direct route.
        progress: show a progress bar over batches.
        chunk_bytes: memory budget for the per-sample arrays of one chunk of a batch (the
            head, the patches and the C x C products run chunk by chunk); default 32 MiB on
            CPU, where small chunks stay in cache, and 256 MiB on CUDA, where larger kernels
            keep the device busy.
        options: how the products are formed (:class:`CurvatureOptions`: the patch Gram's
            source, the tiling of the C x C products); the defaults when None. They change
            the time, not the result (beyond rounding).

    Returns:
        A :class:`CurvatureResult`: ``trace``, ``relative_flatness``, ``block_traces``
        (C x C, float64, CPU), the classifier's trace and relative flatness, the
        Gauss-Newton part of the trace, the loss and accuracy, the route taken.

    Raises:
        OutOfClassError: the model (or ``layer``) is not in the class measured exactly, or
            the traced head does not reproduce the model's logits.
        ValueError: a bad ``route``, empty data, labels outside 0..K-1 or not one per input,
            non-finite logits.

    Warns:
        ZeroCurvatureWarning: every block trace is exactly 0, and why (a BatchNorm with
            gamma = 0 after the conv, as in a fresh timm ResNet's last block, is named).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from convflat.curvature import exact_curvature
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3),
        ...                     nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(6, 3))
        >>> x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1])
        >>> res = exact_curvature(net, (x, y), device="cpu")
        >>> res.layer, res.classifier, res.route, res.n_samples
        ('2', '6', 'direct', 5)
        >>> res.trace > 0, res.relative_flatness > 0, tuple(res.block_traces.shape)
        (True, True, (6, 6))
        >>> gram = exact_curvature(net, (x, y), device="cpu", route="gram")
        >>> abs(gram.trace - res.trace) < 1e-12 * res.trace
        True
    """
    if route not in ("auto", "gram", "direct"):
        raise ValueError(f"route must be 'auto', 'gram' or 'direct', got {route!r}")
    start = time.perf_counter()
    dev = resolve_device(device)
    if _model_device(model) != dev:
        model = copy.deepcopy(model).to(dev)
    head = find_head(model, layer=layer)
    mdtype = model_dtype(model)
    with _eval_mode(model):
        run = _Measurement(model, head, dev, dtype, route, chunk_bytes,
                           options or CurvatureOptions())
        batches: Iterable = iter_batches(data, batch_size)
        bar = tqdm(batches, desc=f"exact curvature [{head.conv_name}]", unit="batch",
                   disable=not progress, leave=False)
        for bi, (x, y) in enumerate(bar):
            if x.shape[0] > 0:
                run.add_batch(bi, x.to(device=dev, dtype=mdtype), y)
        bar.close()
    res = run.result(start)
    _warn_if_zero(res, head)
    return res
