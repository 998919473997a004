r"""The measurement plan: the model cut at the chosen conv into a trunk and a head.

For a head found by :func:`~convflat.curvature.head.find_head`, :class:`_Plan` compiles

* the *trunk*, the model up to the conv's input ``X_n`` (and the conv's output ``a``, and
  whatever else the head reads, such as a residual branch), run once per batch in the
  model's own dtype and without autograd;
* a copy of the *head* in the measurement dtype (float64 by default), from ``a`` to the
  pooled features ``g_n`` and the logits ``z_n`` of docs/math.md Eq. (1).

The head being separable, one backward pass of ``sum g`` gives ``S_n`` and, for smooth
heads, a second one gives the diagonal ``T_n`` of Eq. (3) (:func:`_head`). With the softmax
quantities of Eq. (2) these are the per-sample quantities of :class:`HeadBatch`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from convflat.curvature.gram import (
    _conv_pads,
    _GatheredGram,
    _patch_rows,
    _patches,
    _PhaseGram,
)
from convflat.curvature.head import Head, OutOfClassError
from convflat.curvature.options import CurvatureOptions


class _Workspace:
    """Buffers reused across the chunks and batches of one measurement.

    On CPU a fresh large tensor pays a page fault per page on first touch, which costs more
    than writing into memory already touched. Buffers are keyed by name; a request with the
    same trailing shape and at most as many samples gets a view of the existing buffer. With
    ``zero=True`` a new buffer starts zeroed and callers only ever write its interior (the
    zero borders of the padded input).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
        """A buffer of ``shape`` (the first ``shape[0]`` samples of the named buffer)."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape[1:] != tuple(shape[1:]) or buf.shape[0] < shape[0]:
            make = torch.zeros if zero else torch.empty
            buf = make(tuple(shape), dtype=self.dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:shape[0]]


class _EvalAffine(nn.Module):
    """An eval-mode ``BatchNorm2d`` as the per-channel affine map it is, ``a * scale + shift``,
    for the head copy: one elementwise pass forward and one backward, where BatchNorm's own
    backward kernel costs more than its forward, on the path of S and T for every sample.
    Equal to the BatchNorm up to rounding (tests compare with autograd to 1e-9)."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        assert bn.running_mean is not None and bn.running_var is not None
        f64 = torch.float64
        invstd = torch.rsqrt(bn.running_var.detach().to(f64) + bn.eps)
        w = bn.weight.detach().to(f64) if bn.weight is not None else torch.ones_like(invstd)
        b = bn.bias.detach().to(f64) if bn.bias is not None else torch.zeros_like(invstd)
        scale = w * invstd
        self.register_buffer("scale", scale.view(-1, 1, 1))
        self.register_buffer("shift", (b - bn.running_mean.detach().to(f64) * scale)
                             .view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * scale + shift``."""
        return torch.addcmul(self.shift, x, self.scale)


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _build_trunk(head: Head) -> fx.GraphModule:
    """``trunk(x) -> (X, a, *externals)``: the traced model with the output moved to the conv
    input, the conv output and the head's externals; the head is removed as dead code."""
    gm = head._gm
    tg = fx.Graph()
    vmap: dict[fx.Node, fx.Node] = {}
    tg.graph_copy(gm.graph, vmap)
    conv_in = head._conv_node.args[0]
    if not isinstance(conv_in, fx.Node):
        raise OutOfClassError(f"conv layer '{head.conv_name}' has a constant input")
    # the conv's own output comes along: recomputing it in float64 would cost a second
    # conv; a float32 model's pre-activations are float32 numbers anyway
    tg.output(tuple([vmap[conv_in], vmap[head._conv_node]]
                    + [vmap[e] for e in head._externals]))
    trunk = fx.GraphModule(gm, tg)
    trunk.graph.eliminate_dead_code()  # needs the owning module for purity checks
    trunk.recompile()
    return trunk


def _build_head_fn(head: Head, device: torch.device, dtype: torch.dtype) -> fx.GraphModule:
    """``head_fn(a, *externals) -> (g, z)``: the head's nodes copied into a graph of their
    own, in ``dtype``, eval BatchNorms as :class:`_EvalAffine`, no parameter gradients."""
    gm = head._gm
    hg = fx.Graph()
    hmap: dict[fx.Node, fx.Node] = {head._conv_node: hg.placeholder("a")}
    for i, e in enumerate(head._externals):
        hmap[e] = hg.placeholder(f"ext{i}")
    attrs: dict[str, Any] = {}
    for node in gm.graph.nodes:  # get_attr constants used by the head
        if node.op == "get_attr" and any(u in head._region for u in node.users):
            hmap[node] = hg.get_attr(node.target)
            attrs[node.target] = _fetch_attr(gm, node.target)
    for node in head._region:
        hmap[node] = hg.node_copy(node, lambda n: hmap[n])
        if node.op == "call_module":
            attrs[node.target] = gm.get_submodule(node.target)
    hg.output((hmap[head._feature_node], hmap[head._logits_node]))
    root = {k: _EvalAffine(v) if isinstance(v, nn.BatchNorm2d) else copy.deepcopy(v)
            for k, v in attrs.items()}
    head_fn = fx.GraphModule(root, hg)
    head_fn = head_fn.to(device=device, dtype=dtype).eval()
    for p in head_fn.parameters():
        p.requires_grad_(False)
    return head_fn


def _batched_externals(head: Head) -> list[bool]:
    """Which externals are computed from the input: they carry the batch in dim 0 and are
    sliced with the conv output when the head runs on a chunk of the batch; those computed
    from parameters alone are passed whole."""
    dep: set[fx.Node] = set()
    for node in head._gm.graph.nodes:
        if node.op == "placeholder" or any(i in dep for i in node.all_input_nodes):
            dep.add(node)
    return [e in dep for e in head._externals]


class _Plan:
    """Compiled pieces for one (model, head, device, dtype).

    ``trunk(x) -> (X, a, *externals)`` runs the model up to the conv input (the conv and the
    head are removed by dead-code elimination), in the model's own dtype and without
    autograd. ``head_fn(a, *externals) -> (g, z)`` is a copy of the head in the measurement
    dtype. ``options.gram_from`` steers :meth:`gram`.
    """

    def __init__(self, model: nn.Module, head: Head, device: torch.device, dtype: torch.dtype,
                 options: CurvatureOptions | None = None):
        assert head._gm is not None and head._conv_node is not None
        self.head = head
        self.device = device
        self.dtype = dtype
        self.options = options or CurvatureOptions()
        self.trunk = _build_trunk(head)
        self.head_fn = _build_head_fn(head, device, dtype)
        self.batched_externals = _batched_externals(head)
        # the classifier on all pooled features (K, C_features), and its columns that read
        # the conv's channels (K, C): all of them unless a channel concatenation puts other
        # channels next to the conv's (then known at the first batch, see set_offset)
        self.V_full = head.classifier_weight.to(device=device, dtype=dtype)
        self.groups = head.conv.groups
        self.C = head.conv.out_channels
        self.offset: int | None = None
        self.V = self.V_full
        if not head._cats:
            self.set_offset([])
        # (left, right, top, bottom) as F.pad takes them; what F.pad adds before a gather;
        # what the gather adds as zeros
        self.pads, self.explicit_pad, self.padding = _conv_pads(head.conv)
        self._grams: dict[tuple[int, int, int, int], _PhaseGram | _GatheredGram] = {}

    def gram(self, H: int, W: int, Ho: int, Wo: int) -> _PhaseGram | _GatheredGram | None:
        """How the Gram route forms the patch Gram for an (H, W) input and an (Ho, Wo)
        output: from the input's stride phases (:class:`_PhaseGram`) or as ``U U^T`` from
        gathered patches (:class:`_GatheredGram`), whichever costs fewer operations (or what
        ``options.gram_from`` says); None for grouped convs, which take the direct route."""
        if self.groups > 1:
            return None
        key = (H, W, Ho, Wo)
        if key not in self._grams:
            conv = self.head.conv
            # zero padding ("same" included) is only an offset of the phases; other modes are
            # applied to X first, and their padded entries take part in the Grams
            pad_first = self.explicit_pad if conv.padding_mode != "zeros" else None
            left, right, top, bottom = self.pads
            if pad_first is None:
                tl = (top, left)
            else:
                H, W, tl = H + top + bottom, W + left + right, (0, 0)
            phases = _PhaseGram(conv.kernel_size, conv.stride, conv.dilation, tl, (H, W),
                                (Ho, Wo), pad_first)
            gathered = _GatheredGram(self, Ho * Wo)
            c_in = conv.in_channels
            use = {"phases": True, "patches": False}.get(
                self.options.gram_from, phases.cost(c_in) <= gathered.cost(c_in))
            self._grams[key] = phases if use else gathered
        return self._grams[key]

    def set_offset(self, externals: list[Any]) -> None:
        """The first feature channel of the conv's channels: the channels of the tensors
        concatenated before the conv's output, summed over the head's concatenations (their
        sizes read from the externals of a batch); ``V`` becomes those C columns."""
        if self.offset is not None:
            return
        head, off = self.head, 0
        for cat, idx in head._cats:
            for t in cat.args[0][:idx]:
                if isinstance(t, fx.Node) and t in head._externals:
                    off += int(externals[head._externals.index(t)].shape[1])
                elif isinstance(t, fx.Node) and t.op == "get_attr":
                    off += int(_fetch_attr(head._gm, t.target).shape[1])
                else:
                    raise OutOfClassError(f"cannot size the input {t!r} of {cat.name}")
        if off + self.C > self.V_full.shape[1]:
            raise OutOfClassError(
                f"the classifier '{head.linear_name}' reads {self.V_full.shape[1]} features, "
                f"fewer than the {off} + {self.C} channels up to those of '{head.conv_name}'")
        self.offset = off
        self.V = self.V_full[:, off:off + self.C]

    def chunk_externals(self, externals: list[Any], sl: slice, B: int) -> list[Any] | None:
        """The externals for the samples ``sl`` of a batch of ``B``, or None when the head
        cannot run on part of the batch (an input-dependent external that is not a batch
        tensor, such as the input's size)."""
        out = []
        for e, batched in zip(externals, self.batched_externals, strict=True):
            if not batched:
                out.append(e)
            elif isinstance(e, torch.Tensor) and e.dim() > 0 and e.shape[0] == B:
                out.append(e[sl])
            else:
                return None
        return out

    def patch_rows(self, X: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        """Patches as rows, ``Ut`` (b, groups, P, d), in ``dtype``, written into ``ws``
        (entries of a patch in (kh, kw, C_in) order, see :func:`_patch_rows`)."""
        X = X.to(device=self.device)
        return _patch_rows(X, self.head.conv, self.padding, self.explicit_pad, ws)

    def patches(self, X: torch.Tensor) -> torch.Tensor:
        """Patches U (B, groups, d, P) of the conv input, in ``dtype``, ordered like
        ``W.view(C, -1)``."""
        conv = self.head.conv
        X = X.to(device=self.device)
        if self.explicit_pad is not None:
            pads, mode = self.explicit_pad
            X = F.pad(X, pads, mode=mode)
        U = _patches(X, conv.kernel_size, self.padding, conv.stride, conv.dilation, self.dtype)
        return U.view(X.shape[0], self.groups, -1, U.shape[-1])


@dataclass
class HeadBatch:
    """Per-sample quantities of docs/math.md Eqs. (2)-(4) for one batch (all in the plan's
    dtype).

    ``patches`` (B, P, d) for groups == 1, else (B, groups, d, P) in ``patches_grouped``;
    ``S``, ``T`` (B, C, P); ``probs`` (B, K); ``labels`` (B,); ``features`` (B, C') = g, all
    pooled features (C' > C when other channels are concatenated with the conv's);
    ``V`` (K, C) the classifier's columns that read the conv's channels; ``logits`` (B, K).
    """

    patches_grouped: torch.Tensor
    S: torch.Tensor
    T: torch.Tensor
    probs: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    V: torch.Tensor
    logits: torch.Tensor

    @property
    def patches(self) -> torch.Tensor:
        """The patches as (B, P, d), for ungrouped convs."""
        if self.patches_grouped.shape[1] != 1:
            raise ValueError("grouped convolution: use patches_grouped (B, groups, d, P)")
        return self.patches_grouped[:, 0].transpose(1, 2)


def _trunk(plan: _Plan, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[Any]]:
    """The model up to the conv, without autograd: conv input X, conv output a, externals
    (floating tensors converted to the plan's dtype)."""
    with torch.no_grad():
        outs = plan.trunk(x)
    externals = [
        e.to(device=plan.device, dtype=plan.dtype) if isinstance(e, torch.Tensor) and
        e.is_floating_point() else e for e in outs[2:]
    ]
    plan.set_offset(externals)
    return outs[0], outs[1], externals


def _head(plan: _Plan, a: torch.Tensor, externals: list[Any]
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """S, T (b, C, P) of docs/math.md Eq. (3), features g (b, C) and logits z (b, K) by one or
    two backward passes through the head copy; T is None for piecewise-linear heads
    (sigma'' = 0)."""
    a = a.to(device=plan.device, dtype=plan.dtype)
    b = a.shape[0]
    with torch.enable_grad():
        a_leaf = a.detach().requires_grad_(True)
        g, z = plan.head_fn(a_leaf, *externals)
        if g.dim() == 4 and g.shape[2:] == (1, 1):  # pooled map before a 1x1-conv classifier
            g = g.flatten(1)
        z = z.reshape(b, -1)
        n_feat = plan.V_full.shape[1]
        if g.dim() != 2 or g.shape[1] != n_feat:
            raise OutOfClassError(
                f"the classifier '{plan.head.linear_name}' sees features of shape "
                f"{tuple(g.shape)}, expected (batch, {n_feat}) pooled channels (those of "
                f"'{plan.head.conv_name}' and any concatenated with them)"
            )
        # S[n,c,p] = d g_{n,c} / d a_{n,c,p}: g_{n,c} depends only on a_{n,c,:}, so the
        # gradient of sum(g) holds every entry at once.
        smooth = not plan.head.piecewise_linear
        (S,) = torch.autograd.grad(g.sum(), a_leaf, create_graph=smooth)
        T = None
        if smooth:
            # the head's Hessian in a is diagonal, so d sum(S) / d a is that diagonal
            (T,) = torch.autograd.grad(S.sum(), a_leaf, allow_unused=True)
            T = torch.zeros_like(S) if T is None else T.detach().reshape(b, plan.C, -1)
    return S.detach().reshape(b, plan.C, -1), T, g.detach(), z.detach()


def _check_labels(y: torch.Tensor, B: int, batch_index: int, K: int,
                  device: torch.device) -> torch.Tensor:
    """Labels in 0..K-1, one per input (the errors name the batch); returns y as int64."""
    y = y.to(device=device).long().view(-1)
    if y.numel() != B:
        raise ValueError(f"batch {batch_index}: {B} inputs but {y.numel()} labels")
    if y.min() < 0 or y.max() >= K:
        raise ValueError(
            f"batch {batch_index}: labels must lie in 0..{K - 1} for a {K}-class classifier, "
            f"got range {int(y.min())}..{int(y.max())}"
        )
    return y


def _check_finite(z: torch.Tensor, batch_index: int, B: int) -> None:
    if not torch.isfinite(z).all():
        raise ValueError(
            f"non-finite logits in batch {batch_index} (samples "
            f"{batch_index}x{B}); check the checkpoint and the input normalization"
        )


class _eval_mode:
    """Put every submodule in eval mode and restore each one's own flag afterwards."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, flag in self.flags:
            m.training = flag
        return False


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first floating-point parameter (torch's default dtype for a
    model without one): the dtype inputs are cast to, here and in :mod:`convflat.measures`."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _run_head(plan: _Plan, x: torch.Tensor, y: torch.Tensor, batch_index: int) -> HeadBatch:
    """Trunk without autograd, then S and T by one or two backward passes through the head."""
    X, a, externals = _trunk(plan, x)
    S, T, g, z = _head(plan, a, externals)
    _check_finite(z, batch_index, z.shape[0])
    y = _check_labels(y, z.shape[0], batch_index, z.shape[1], plan.device)
    return HeadBatch(
        patches_grouped=plan.patches(X),
        S=S,
        T=torch.zeros_like(S) if T is None else T,
        probs=torch.softmax(z, dim=1),
        labels=y,
        features=g,
        V=plan.V,
        logits=z,
    )


def head_batch(
    model: nn.Module, head: Head, x: torch.Tensor, y: torch.Tensor,
    dtype: torch.dtype = torch.float64,
) -> HeadBatch:
    """The per-sample quantities (patches, S, T, softmax, features) of one batch.

    The model is evaluated in eval mode and restored to its mode afterwards. Building the plan
    costs a trace and a copy of the head; for many batches use
    :func:`~convflat.curvature.exact_curvature`.
    """
    device = x.device
    with _eval_mode(model):
        plan = _Plan(model, head, device, dtype)
        x = x.to(dtype=model_dtype(model))
        return _run_head(plan, x, y, 0)
