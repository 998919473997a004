r"""Exact Hessian trace, block traces and relative flatness of the conv that feeds GAP.

Setting (see ``MATH.md`` beside the project for the full derivation). For one sample ``n`` the
network splits into a fixed trunk that produces the input map ``X_n`` of the chosen
convolution, the convolution itself, and a *head* that acts channel by channel and position by
position before a global average pool (GAP) and one linear classifier::

    X_n --conv(W, beta)--> a --(eval BN, residual add, sigma, ...)--> h --GAP--> g --(V, b)--> z

With patches ``u_{n,p}`` (im2col of ``X_n``; ``F.unfold`` uses the ordering of
``W.view(C, -1)``), ``a_{n,c,p} = <w_c, u_{n,p}> + beta_c``. The head being separable, the
pooled feature ``g_{n,c}`` depends on the kernel only through its own filter ``w_c``, and

* ``S_n[c,p] = d g_{n,c} / d a_{n,c,p}``  and  ``T_n[c,p] = d^2 g_{n,c} / d a_{n,c,p}^2``
  come out of two backward passes through the (tiny) head alone;
* ``J_{n,c} = sum_p S_n[c,p] u_{n,p}`` is ``d g_{n,c} / d w_c``;
* with ``p_n = softmax(z_n)``, ``A_n = diag(p_n) - p_n p_n^T``, ``q_n = V^T (p_n - e_{y_n})``
  and ``M_n = V^T A_n V``, the Hessian block between filters ``c`` and ``c'`` of the mean
  cross-entropy ``L = (1/N) sum_n l_n`` is

  .. math::
     H_{c,c'} = \frac1N \sum_n \Big[ M_n[c,c']\, J_{n,c} J_{n,c'}^\top
                + \delta_{cc'}\, q_n[c] \sum_p T_n[c,p]\, u_{n,p} u_{n,p}^\top \Big].

Taking traces, with the patch Gram ``Q_n[p,p'] = <u_{n,p}, u_{n,p'}>``,

.. math::
   \mathrm{Tr}\,H_{c,c'} = \frac1N \sum_n \Big[ M_n[c,c'] (S_n Q_n S_n^\top)[c,c']
        + \delta_{cc'}\, q_n[c] \sum_p T_n[c,p]\, Q_n[p,p] \Big],
   \qquad \mathrm{Tr}\,H = \sum_c \mathrm{Tr}\,H_{c,c},

and the conv-layer relative flatness (Petzka et al. 2021, neurons -> filters, arXiv
2603.09016) is ``kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'}``. The second term is the
``sigma''`` part: zero almost everywhere for piecewise-linear activations, kept for smooth ones,
so the result is the exact Hessian trace and not only its Gauss-Newton part.

The patch Gram never needs the patches: two positions of a pair under the same kernel offset
``o`` differ by a multiple of the stride ``s``, so ``Q_n[p,p'] = sum_o <x_{sp+o}, x_{sp'+o}>``
is a sum of shifted blocks of the Grams of the input's stride phases (:class:`_PhaseGram`):
``k_h k_w`` times fewer multiply-adds than ``U_n^T U_n`` at stride 1, 2.25 times fewer for a
3 x 3 kernel at stride 2, and no im2col copy.

Nothing here is estimated: the numbers equal those of the dense autograd Hessian (tests check
this to 1e-9 in float64). The trunk runs once per batch without autograd; only the head after
the conv is differentiated; sums are accumulated in float64 and the data are streamed, so
peak memory does not grow with the number of samples.
"""

from __future__ import annotations

import copy
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from tqdm.auto import tqdm

from convflat.io import iter_batches, resolve_device

__all__ = [
    "CurvatureResult",
    "Head",
    "HeadBatch",
    "OutOfClassError",
    "classifier_curvature",
    "exact_curvature",
    "find_head",
    "head_batch",
]


class OutOfClassError(ValueError):
    """The model is not a CNN whose chosen conv feeds GAP and one linear layer through
    channel-wise, position-wise ops; the message names the op that breaks the class."""


# --------------------------------------------------------------------------------------------
# Head detection: which ops may sit between the conv and the classifier
# --------------------------------------------------------------------------------------------

# Elementwise (channel-wise and position-wise) modules allowed between the conv and the GAP.
# Each output element depends on exactly one input element, so the head is separable and its
# Hessian in ``a`` is diagonal. Eval-mode BatchNorm is a per-channel affine map.
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish,
    nn.Softplus, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.BatchNorm2d,
)
# Piecewise-linear ones: their second derivative vanishes almost everywhere, so the sigma''
# pass can be skipped (T = 0).
_PIECEWISE_LINEAR_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.PReLU, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.AlphaDropout, nn.BatchNorm2d,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu: True, torch.relu: True, F.relu6: True, F.leaky_relu: True, F.hardtanh: True,
    F.dropout: True, F.dropout2d: True, F.gelu: False, F.silu: False, F.elu: False,
    F.selu: False, F.celu: False, F.mish: False, F.softplus: False, torch.sigmoid: False,
    F.sigmoid: False, torch.tanh: False, F.tanh: False, F.hardswish: False,
    F.hardsigmoid: False,
}  # function -> piecewise linear?
_ELEMENTWISE_METHODS = {
    "relu": True, "relu_": True, "sigmoid": False, "sigmoid_": False, "tanh": False,
    "tanh_": False, "contiguous": True, "clone": True,
}
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.sub, operator.isub}
_ADD_METHODS = {"add", "add_", "sub", "sub_"}
_MUL_FUNCTIONS = {operator.mul, operator.imul, torch.mul, operator.truediv, torch.div}
_MUL_METHODS = {"mul", "mul_", "div", "div_"}
_FLATTEN_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_FLATTEN_METHODS = {"flatten", "view", "reshape", "squeeze"}
_SHAPE_METHODS = {"size", "dim"}


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} module '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function '{name}' (node '{node.name}')"
    if node.op == "call_method":
        return f"method '.{node.target}()' (node '{node.name}')"
    return f"{node.op} '{node.name}'"


def _is_gap(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Global average pooling over H and W: AdaptiveAvgPool2d(1), adaptive_avg_pool2d(x, 1),
    or a mean over dims (2, 3)."""

    def _is_one(size) -> bool:
        if isinstance(size, int):
            return size == 1
        return isinstance(size, (tuple, list)) and all(s == 1 for s in size)

    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        return isinstance(mod, nn.AdaptiveAvgPool2d) and _is_one(mod.output_size)
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return _is_one(size)
    is_mean = (node.op == "call_function" and node.target is torch.mean) or (
        node.op == "call_method" and node.target == "mean"
    )
    if is_mean:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if isinstance(dim, (tuple, list)):
            return sorted(d % 4 for d in dim) == [2, 3]
    return False


@dataclass
class Head:
    """The chosen convolution and the classifier it feeds (see :func:`find_head`)."""

    conv_name: str
    conv: nn.Conv2d
    linear_name: str
    linear: nn.Linear
    piecewise_linear: bool  # True when sigma'' vanishes a.e. on the head (ReLU-like only)
    ops: list[str] = field(default_factory=list)  # the ops between conv and classifier
    # fx plumbing (internal): the traced model, the conv node, region and external inputs
    _gm: fx.GraphModule | None = field(default=None, repr=False)
    _conv_node: fx.Node | None = field(default=None, repr=False)
    _region: list[fx.Node] = field(default_factory=list, repr=False)
    _externals: list[fx.Node] = field(default_factory=list, repr=False)
    _feature_node: fx.Node | None = field(default=None, repr=False)
    _linear_node: fx.Node | None = field(default=None, repr=False)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot verify the head"
        raise OutOfClassError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{exc}); convflat traces the forward to verify that the conv feeds global average "
            "pooling and one linear layer, so the forward must be traceable (no data-dependent "
            "Python control flow)"
        ) from exc


def _classify(node: fx.Node, gm: fx.GraphModule, src: fx.Node) -> tuple[str, bool]:
    """What a node that consumes the conv-dependent tensor ``src`` does, whatever its form
    (module, function or method): ``(kind, piecewise_linear)`` with kind one of elementwise,
    add, mul, operand_right (``x - a`` or ``x / a``), gap, flatten, linear,
    functional_linear, conv, other."""
    tgt = node.target
    if _is_gap(node, gm):
        return "gap", True
    if node.op == "call_module":
        mod = gm.get_submodule(tgt)
        if isinstance(mod, _ELEMENTWISE_MODULES):
            # dropout and identity also pass pooled features through unchanged
            flat = isinstance(mod, (nn.Dropout, nn.Identity))
            return ("elementwise_or_flatten" if flat else "elementwise",
                    isinstance(mod, _PIECEWISE_LINEAR_MODULES))
        if isinstance(mod, nn.Flatten):
            return "flatten", True
        if isinstance(mod, nn.Linear):
            return "linear", True
        if isinstance(mod, nn.Conv2d):
            return "conv", True
        return "other", True
    if node.op == "call_function":
        if tgt in _ELEMENTWISE_FUNCTIONS:
            return ("elementwise_or_flatten" if tgt is F.dropout else "elementwise",
                    _ELEMENTWISE_FUNCTIONS[tgt])
        right = node.args[0] is not src
        if tgt in _ADD_FUNCTIONS:
            return ("operand_right" if right and tgt in (operator.sub, operator.isub)
                    else "add"), True
        if tgt in _MUL_FUNCTIONS:
            return ("operand_right" if right and tgt in (operator.truediv, torch.div)
                    else "mul"), True
        if tgt in _FLATTEN_FUNCTIONS:
            return "flatten", True
        if tgt is F.linear:
            return "functional_linear", True
        if tgt is F.conv2d:
            return "conv", True
        return "other", True
    if node.op == "call_method":
        if tgt in _ELEMENTWISE_METHODS:
            return "elementwise", _ELEMENTWISE_METHODS[tgt]
        if tgt in _ADD_METHODS | _MUL_METHODS:
            if node.args[0] is not src and tgt.startswith(("sub", "div")):
                return "operand_right", True
            return ("add" if tgt in _ADD_METHODS else "mul"), True
        if tgt in _FLATTEN_METHODS:
            return "flatten", True
    return "other", True


def _check_head(gm: fx.GraphModule, conv_node: fx.Node) -> Head:
    """Verify that every op downstream of ``conv_node`` keeps the closed form exact.

    States: "spatial" (between the conv and the GAP: only elementwise ops, a residual add of a
    tensor that does not depend on the conv, scaling by such a tensor), "pooled" (after the GAP:
    flatten, dropout), "logits" (the single Linear's output, which must be the model's output).
    Shape queries (``x.size(0)``) are allowed anywhere and carry no dependence.
    """
    state: dict[fx.Node, str] = {conv_node: "spatial"}
    shape_nodes: set[fx.Node] = set()
    ops: list[str] = []
    piecewise = True
    linear_node: fx.Node | None = None
    region: list[fx.Node] = []
    conv_name = conv_node.target

    def refuse(node: fx.Node, why: str) -> OutOfClassError:
        return OutOfClassError(
            f"conv layer '{conv_name}' is not in the class measured exactly: "
            f"{_describe(node, gm)} {why}. The chosen conv must feed global average pooling "
            "and one nn.Linear through channel-wise, position-wise ops only (eval BatchNorm, "
            "elementwise activations, dropout, residual add of a tensor that does not depend "
            "on the kernel, flatten). Pass layer= to choose another conv."
        )

    for node in gm.graph.nodes:
        if node is conv_node or node.op in ("placeholder", "get_attr"):
            continue
        inputs = node.all_input_nodes
        dep_inputs = [n for n in inputs if n in state]
        shape_inputs = [n for n in inputs if n in shape_nodes]
        if node.op == "output":
            if dep_inputs:
                out = node.args[0]
                if out is not linear_node or linear_node is None:
                    raise refuse(
                        dep_inputs[0],
                        "reaches the model's output without passing a global average pool "
                        "and one nn.Linear (or the output is not the classifier's logits alone)",
                    )
            continue
        if not dep_inputs:
            if shape_inputs and node.op in ("call_function", "call_method"):
                shape_nodes.add(node)  # arithmetic on shapes
                region.append(node)
            continue
        region.append(node)
        if (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
            node.op == "call_function" and node.target is getattr
        ):
            shape_nodes.add(node)
            continue
        if len(dep_inputs) > 1:
            raise refuse(
                node,
                "combines two tensors that both depend on the conv (filters or positions are "
                "mixed, as in squeeze-and-excitation or a second branch)",
            )
        src = dep_inputs[0]
        s = state[src]
        if node.op == "call_module" and isinstance(
                gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm) and \
                gm.get_submodule(node.target).running_mean is None:
            raise refuse(
                node,
                "normalizes with the statistics of the batch even in eval mode (BatchNorm "
                "without running statistics), so one sample's loss depends on the others",
            )
        if s == "logits":
            raise refuse(
                node,
                f"follows nn.Linear '{linear_node.target}' on the pooled features: exactly one "
                "nn.Linear must lead straight to the model's output (an MLP head, or "
                "squeeze-and-excitation gating the features, is not in the class)",
            )
        kind, smooth_ok = _classify(node, gm, src)
        if kind == "elementwise_or_flatten":  # dropout, identity: fine on either side of GAP
            kind = "elementwise" if s == "spatial" else "flatten"
        if s == "spatial" and kind == "elementwise":
            state[node] = "spatial"
            piecewise &= smooth_ok
        elif s == "spatial" and kind in ("add", "mul"):
            state[node] = "spatial"
        elif s == "spatial" and kind == "operand_right":
            raise refuse(node, "has the conv output on the right-hand side of a '-' or '/'")
        elif (s == "spatial" and kind == "gap") or (s == "pooled" and kind == "flatten"):
            state[node] = "pooled"
        elif s == "pooled" and kind == "linear":
            state[node] = "logits"
            linear_node = node
        elif kind == "conv":
            raise refuse(node, "is a second convolution after the chosen one")
        elif kind == "functional_linear":
            raise refuse(node, "is a functional linear layer (use nn.Linear)")
        elif kind == "linear":
            raise refuse(node, "is applied before global average pooling")
        elif s == "pooled":
            raise refuse(
                node, "is applied to the pooled features (an MLP head is not in the class)"
            )
        else:
            raise refuse(node, "mixes positions or channels before global average pooling")
        ops.append(_describe(node, gm))

    if linear_node is None:
        raise OutOfClassError(
            f"conv layer '{conv_name}' does not reach a global average pool followed by one "
            "nn.Linear that produces the model's output"
        )
    externals: list[fx.Node] = []
    region_set = set(region)
    for node in region:
        for inp in node.all_input_nodes:
            if inp is conv_node or inp in region_set or inp.op == "get_attr":
                continue
            if inp not in externals:
                externals.append(inp)
    linear = gm.get_submodule(linear_node.target)
    return Head(
        conv_name=str(conv_name),
        conv=gm.get_submodule(conv_node.target),
        linear_name=str(linear_node.target),
        linear=linear,
        piecewise_linear=piecewise,
        ops=ops,
        _gm=gm,
        _conv_node=conv_node,
        _region=region,
        _externals=externals,
        _feature_node=linear_node.args[0],
        _linear_node=linear_node,
    )


def _depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        depth[node] = 1 + max((depth[i] for i in ins), default=-1)
    return depth


def find_head(model: nn.Module, example_input: Any = None, *, layer: str | None = None) -> Head:
    """Find the conv whose output feeds global average pooling and one linear classifier.

    Without ``layer``, every ``nn.Conv2d`` is checked and, among those in the class, the one
    deepest in the graph (longest path from the input; ties go to the later one) is chosen:
    that is the main-branch conv of a final residual block, not a parallel shortcut conv.
    ``layer`` names a module (as in ``model.named_modules()``) to measure instead.

    ``example_input`` is accepted for API symmetry and ignored: the check is structural (a
    torch.fx trace), so no data are needed. Raises :class:`OutOfClassError` naming the op that
    breaks the class.
    """
    del example_input
    gm = _trace(model)
    conv_nodes = [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    ]
    if layer is not None:
        names = dict(model.named_modules())
        if layer not in names:
            raise OutOfClassError(f"layer={layer!r} is not a module of {type(model).__name__}")
        if not isinstance(names[layer], nn.Conv2d):
            raise OutOfClassError(
                f"layer={layer!r} is a {type(names[layer]).__name__}, not an nn.Conv2d"
            )
        chosen = [n for n in conv_nodes if n.target == layer]
        if not chosen:
            raise OutOfClassError(f"layer={layer!r} is never called in the forward pass")
        if len(chosen) > 1:
            raise OutOfClassError(f"layer={layer!r} is called more than once in the forward")
        return _check_head(gm, chosen[0])
    if not conv_nodes:
        raise OutOfClassError(f"{type(model).__name__} has no nn.Conv2d called in its forward")
    depth = _depths(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ranked = sorted(conv_nodes, key=lambda n: (depth[n], order[n]), reverse=True)
    first_error: OutOfClassError | None = None
    for node in ranked:
        if sum(1 for n in conv_nodes if n.target == node.target) > 1:
            continue  # a conv module called twice shares its kernel between calls
        try:
            return _check_head(gm, node)
        except OutOfClassError as exc:
            if first_error is None:
                first_error = exc
    assert first_error is not None
    raise first_error


# --------------------------------------------------------------------------------------------
# The measurement plan: a trunk that stops at the conv input, and a float64 copy of the head
# --------------------------------------------------------------------------------------------


class _Plan:
    """Compiled pieces for one (model, head, device, dtype).

    ``trunk(x) -> (X, *externals)`` runs the model up to the conv input (the conv and the head
    are removed by dead-code elimination), in the model's own dtype and without autograd.
    ``head_fn(a, *externals) -> (g, z)`` is a copy of the head in the measurement dtype.
    """

    def __init__(self, model: nn.Module, head: Head, device: torch.device, dtype: torch.dtype):
        gm = head._gm
        assert gm is not None and head._conv_node is not None
        self.head = head
        self.device = device
        self.dtype = dtype
        conv = head.conv
        # trunk: copy the graph, output (conv input, externals), drop everything unused
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
        self.trunk = fx.GraphModule(gm, tg)
        self.trunk.graph.eliminate_dead_code()  # needs the owning module for purity checks
        self.trunk.recompile()
        # head: placeholders for the conv output and the externals, region nodes copied
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
        hg.output((hmap[head._feature_node], hmap[head._linear_node]))
        # externals computed from the input carry the batch in dim 0 and are sliced with the
        # conv output when the head runs on a chunk of the batch; those computed from
        # parameters alone are passed whole
        dep: set[fx.Node] = set()
        for node in gm.graph.nodes:
            if node.op == "placeholder" or any(i in dep for i in node.all_input_nodes):
                dep.add(node)
        self.batched_externals = [e in dep for e in head._externals]
        root = {k: _EvalAffine(v) if isinstance(v, nn.BatchNorm2d) else copy.deepcopy(v)
                for k, v in attrs.items()}
        head_fn = fx.GraphModule(root, hg)
        head_fn = head_fn.to(device=device, dtype=dtype).eval()
        for p in head_fn.parameters():
            p.requires_grad_(False)
        self.head_fn = head_fn
        self.V = head.linear.weight.detach().to(device=device, dtype=dtype)  # (K, C)
        self.groups = conv.groups
        self.C = conv.out_channels
        # padding: unfold only knows zero padding, so other modes and "same" pad explicitly
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        if isinstance(conv.padding, str):
            if conv.padding == "valid":
                pads = (0, 0, 0, 0)
            else:  # "same" (stride 1): total dilation*(k-1), the extra one on the right
                th, tw = dh * (kh - 1), dw * (kw - 1)
                pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            ph, pw = conv.padding
            pads = (pw, pw, ph, ph)
        self.pads = pads  # (left, right, top, bottom), as F.pad takes them
        self.explicit_pad = None
        self.padding = conv.padding if not isinstance(conv.padding, str) else (0, 0)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            self.explicit_pad = (pads, mode)
            self.padding = (0, 0)
        self._grams: dict[tuple[int, int, int, int], _PhaseGram | _GatheredGram] = {}

    def gram(self, H: int, W: int, Ho: int, Wo: int) -> _PhaseGram | _GatheredGram | None:
        """How the Gram route forms the patch Gram for an (H, W) input and an (Ho, Wo)
        output: from the input's stride phases (:class:`_PhaseGram`) or as ``U U^T`` from
        gathered patches (:class:`_GatheredGram`), whichever costs fewer operations (or what
        ``_GRAM_FROM`` says); None for grouped convs, which take the direct route."""
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
            phases = _PhaseGram(conv.kernel_size, conv.stride, conv.dilation, tl, H, W, Ho, Wo,
                                pad_first)
            gathered = _GatheredGram(self, Ho * Wo)
            c_in = conv.in_channels
            use = {"phases": True, "patches": False}.get(
                _GRAM_FROM, phases.cost(c_in) <= gathered.cost(c_in))
            self._grams[key] = phases if use else gathered
        return self._grams[key]

    def chunk_externals(self, externals: list[Any], sl: slice, B: int) -> list[Any] | None:
        """The externals for the samples ``sl`` of a batch of ``B``, or None when the head
        cannot run on part of the batch (an input-dependent external that is not a batch
        tensor, such as the input's size)."""
        out = []
        for e, batched in zip(externals, self.batched_externals):
            if not batched:
                out.append(e)
            elif isinstance(e, torch.Tensor) and e.dim() > 0 and e.shape[0] == B:
                out.append(e[sl])
            else:
                return None
        return out

    def patch_rows(self, X: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        """Patches as rows, ``Ut`` (b, groups, P, d), in ``dtype``, written into ``ws``.

        The order within a patch is (kh, kw, C_in), not that of ``W.view(C, -1)``: every
        contraction of :func:`exact_curvature` sums over the patch entries, so their order does
        not matter, and gathering from a channels-last copy of X moves whole channel runs
        (3-6x faster on CPU than the (C_in, kh, kw) gather of :meth:`patches`).
        """
        conv = self.head.conv
        (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
        X = X.to(device=self.device)
        b, Cin, H, W = X.shape
        if self.explicit_pad is not None:
            pads, mode = self.explicit_pad
            X = F.pad(X, pads, mode=mode)
            Xc = ws.get("X", (b, X.shape[2], X.shape[3], Cin))
            Xc.copy_(X.permute(0, 2, 3, 1))
        else:  # zero padding: the borders of the buffer are zero once and never written
            ph, pw = self.padding
            Xc = ws.get("X", (b, H + 2 * ph, W + 2 * pw, Cin), zero=True)
            Xc[:, ph:ph + H, pw:pw + W].copy_(X.permute(0, 2, 3, 1))
        V = Xc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)
        V = V[..., ::dh, ::dw]  # (b, Ho, Wo, C_in, kh, kw)
        Ho, Wo, G = V.shape[1], V.shape[2], self.groups
        V = V.unflatten(3, (G, Cin // G)).permute(0, 3, 1, 2, 5, 6, 4)
        Ut = ws.get("U", (b, G, Ho, Wo, kh, kw, Cin // G))
        Ut.copy_(V)
        return Ut.view(b, G, Ho * Wo, -1)

    def patches(self, X: torch.Tensor) -> torch.Tensor:
        """Patches U (B, groups, d, P) of the conv input, in ``dtype``."""
        conv = self.head.conv
        X = X.to(device=self.device)
        if self.explicit_pad is not None:
            pads, mode = self.explicit_pad
            X = F.pad(X, pads, mode=mode)
        U = _patches(X, conv.kernel_size, self.padding, conv.stride, conv.dilation, self.dtype)
        return U.view(X.shape[0], self.groups, -1, U.shape[-1])


# Where the patch Gram comes from: "auto" (the cheaper by multiply-adds), "phases" or "patches"
# (tests force each one)
_GRAM_FROM = "auto"


class _GatheredGram:
    """The patch Gram as ``U U^T`` from the gathered patch rows (:meth:`_Plan.patch_rows`),
    with the interface of :class:`_PhaseGram`."""

    def __init__(self, plan: _Plan, P: int):
        self.plan, self.P = plan, P
        kh, kw = plan.head.conv.kernel_size
        self.k = kh * kw

    def cost(self, c_in: int) -> int:
        """Multiply-adds of ``U U^T`` plus the gather, per sample."""
        d = c_in * self.k
        return self.P * (self.P * d + d)

    def numel(self, c_in: int) -> int:
        """Workspace entries per sample (the patch rows)."""
        return self.P * c_in * self.k

    def prepare(self, X: torch.Tensor) -> torch.Tensor:
        return X  # patch_rows pads as it gathers

    def __call__(self, X: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        U0 = self.plan.patch_rows(X, ws)[:, 0]  # (b, P, d)
        return torch.matmul(U0, U0.transpose(1, 2), out=ws.get("Q", (U0.shape[0], self.P,
                                                                      self.P)))


class _PhaseGram:
    r"""The patch Gram ``Q_n[p,p'] = <u_{n,p}, u_{n,p'}>`` from Grams of the input itself.

    A patch is the stack of the input vectors ``x_r`` (C_in entries, r a position of the padded
    input) under the kernel's offsets ``o = (i_k d_h, j_k d_w)``: ``u_p = (x_{s p + o})_o``
    with s the stride. Hence

    .. math:: Q[p,p'] = \sum_o \langle x_{s p + o},\, x_{s p' + o} \rangle ,

    and the two positions of each pair differ by a multiple of the stride, so they lie in the
    same *stride phase* ``phi = o mod s``. With the Gram ``R_phi = X_phi X_phi^T`` of the input
    positions of one phase (real positions only: padded zeros contribute nothing), every
    offset adds one shifted block of ``R_phi`` to Q:
    ``Q[p,p'] += R_phi[p + floor(o / s) - t0, p' + floor(o / s) - t0]`` where the index is in
    range (``t0``: the phase index of the first real input row or column).

    Cost per sample: ``sum_phi n_phi^2 C_in`` multiply-adds for the Grams and ``k_h k_w P^2``
    additions, against ``P^2 d = k_h k_w P^2 C_in`` for ``U U^T`` and a gather of ``P d``
    patch entries. A stride-1 conv has one phase of about P positions: ~k_h k_w times fewer
    multiply-adds (9x for 3 x 3); stride 2 has four phases of about P each: ~2.25x fewer for
    3 x 3. No library forms a patch Gram this way, hence the hand-written shifts.
    """

    def __init__(self, kernel, stride, dilation, pads_tl, H: int, W: int, Ho: int, Wo: int,
                 pad_first: tuple | None = None):
        (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
        top, left = pads_tl
        self.Ho, self.Wo = Ho, Wo
        self.pad_first = pad_first  # (pads, mode) applied to X by prepare(), or None

        def axis(phase, s, pad, n_in, n_out, shifts):
            """Real input indices of one phase (start, count, index of the first in the
            phase grid) and, per shift, the output range it reaches and the R offset."""
            start = (phase - pad) % s
            count = max(0, -(-(n_in - start) // s))
            t0 = (start + pad) // s
            ranges = []
            for alpha in shifts:
                lo, hi = max(0, t0 - alpha), min(n_out, count + t0 - alpha)
                ranges.append((lo, hi, lo + alpha - t0) if lo < hi else None)
            return start, count, ranges

        rows: dict[int, list[int]] = {}  # phase -> shifts floor(d a / s)
        cols: dict[int, list[int]] = {}
        for a in range(kh):
            rows.setdefault(dh * a % sh, []).append(dh * a // sh)
        for b in range(kw):
            cols.setdefault(dw * b % sw, []).append(dw * b // sw)
        # one entry per stride phase: (row start, rows, col start, cols, [(row range, col
        # range)] for each kernel offset of the phase that reaches the output)
        self.phases = []
        for ph, ashifts in rows.items():
            r0, nr, rr = axis(ph, sh, top, H, Ho, ashifts)
            for pw, bshifts in cols.items():
                c0, nc, cr = axis(pw, sw, left, W, Wo, bshifts)
                terms = [(ri, ci) for ri in rr for ci in cr if ri is not None and ci is not None]
                if terms and nr and nc:
                    self.phases.append(((r0, nr, sh), (c0, nc, sw), terms))

    def cost(self, c_in: int) -> int:
        """Multiply-adds (Grams) plus additions (shifted blocks) per sample."""
        P = self.Ho * self.Wo
        return sum((nr * nc) ** 2 * c_in + len(t) * P * P
                   for (_, nr, _), (_, nc, _), t in self.phases)

    def numel(self, c_in: int) -> int:
        """Workspace entries per sample (input phases and their Grams)."""
        return sum(nr * nc * (c_in + nr * nc) for (_, nr, _), (_, nc, _), _ in self.phases)

    def prepare(self, X: torch.Tensor) -> torch.Tensor:
        """X as the phases are read from it: padded first unless the padding is zeros."""
        if self.pad_first is not None:
            pads, mode = self.pad_first
            X = F.pad(X, pads, mode=mode)
        return X

    def __call__(self, X: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        """``Q`` (b, P, P) in the workspace's dtype from the prepared input X."""
        b, c_in = X.shape[:2]
        P = self.Ho * self.Wo
        Q = ws.get("Q", (b, P, P))
        Q.zero_()
        Q6 = Q.view(b, self.Ho, self.Wo, self.Ho, self.Wo)
        for k, ((r0, nr, sh), (c0, nc, sw), terms) in enumerate(self.phases):
            n = nr * nc
            Xp = ws.get(f"Xphase{k}", (b, nr, nc, c_in))
            Xp.copy_(X[:, :, r0:r0 + (nr - 1) * sh + 1:sh, c0:c0 + (nc - 1) * sw + 1:sw]
                     .permute(0, 2, 3, 1))
            Xp = Xp.view(b, n, c_in)
            R = torch.matmul(Xp, Xp.transpose(1, 2), out=ws.get(f"Rphase{k}", (b, n, n)))
            R6 = R.view(b, nr, nc, nr, nc)
            for (i0, i1, ri), (j0, j1, rj) in terms:
                hi, wj = i1 - i0, j1 - j0
                Q6[:, i0:i1, j0:j1, i0:i1, j0:j1] += \
                    R6[:, ri:ri + hi, rj:rj + wj, ri:ri + hi, rj:rj + wj]
        return Q


def _patches(X: torch.Tensor, kernel, padding, stride, dilation,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """im2col: (B, C_in*kh*kw, Ho*Wo), ordered like ``W.view(C, -1)`` (as ``F.unfold``).

    Built from strided views (``Tensor.unfold``) and one copy that also converts to ``dtype``;
    ``F.unfold``'s im2col kernel was 10-100x slower on CPU here, in float64 above all, and
    converting after the copy costs a second pass over the largest array of the computation.
    """
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = kernel, padding, stride, dilation
    if ph or pw:
        X = F.pad(X, (pw, pw, ph, ph))
    B, Cin = X.shape[:2]
    V = X.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    V = V[..., ::dh, ::dw]  # (B, C_in, Ho, Wo, kh, kw)
    Ho, Wo = V.shape[2], V.shape[3]
    out = torch.empty((B, Cin, kh, kw, Ho, Wo), dtype=dtype or X.dtype, device=X.device)
    out.copy_(V.permute(0, 1, 4, 5, 2, 3))
    return out.view(B, Cin * kh * kw, Ho * Wo)


class _EvalAffine(nn.Module):
    """An eval-mode ``BatchNorm2d`` as the per-channel affine map it is, ``a * scale + shift``,
    for the head copy: one pass forward and one backward, where BatchNorm's backward kernel
    took twice as long as its forward in float64 here, on the path of S and T for every
    sample. Equal to the BatchNorm up to rounding (tests compare with autograd to 1e-9)."""

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
        return torch.addcmul(self.shift, x, self.scale)


class _Workspace:
    """Buffers reused across the chunks and batches of one measurement.

    On CPU a fresh large tensor pays a page fault per page on first touch: writing 38 MB of
    float64 into fresh memory took 4x as long as into reused memory here. Buffers are keyed by
    name; a request with the same trailing shape and at most as many samples gets a view of
    the existing buffer. With ``zero=True`` a new buffer starts zeroed and callers only ever
    write its interior (the zero borders of the padded input).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape[1:] != tuple(shape[1:]) or buf.shape[0] < shape[0]:
            make = torch.zeros if zero else torch.empty
            buf = make(tuple(shape), dtype=self.dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:shape[0]]


def _fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class HeadBatch:
    """Per-sample quantities of MATH.md section 2 for one batch (all in the plan's dtype).

    ``patches`` (B, P, d) for groups == 1, else (B, groups, d, P) in ``patches_grouped``;
    ``S``, ``T`` (B, C, P); ``probs`` (B, K); ``labels`` (B,); ``features`` (B, C) = g;
    ``V`` (K, C) the classifier weight; ``logits`` (B, K).
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
    return outs[0], outs[1], externals


def _head(plan: _Plan, a: torch.Tensor, externals: list[Any]
          ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """S, T (b, C, P), features g (b, C) and logits z (b, K) by one or two backward passes
    through the head copy; T is None for piecewise-linear heads (sigma'' = 0)."""
    a = a.to(device=plan.device, dtype=plan.dtype)
    b = a.shape[0]
    with torch.enable_grad():
        a_leaf = a.detach().requires_grad_(True)
        g, z = plan.head_fn(a_leaf, *externals)
        if g.dim() != 2 or g.shape[1] != plan.C:
            raise OutOfClassError(
                f"the classifier '{plan.head.linear_name}' sees features of shape "
                f"{tuple(g.shape)}, expected (batch, {plan.C}) pooled channels of "
                f"'{plan.head.conv_name}'"
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
    costs a trace and a copy of the head; for many batches use :func:`exact_curvature`.
    """
    device = x.device
    with _eval_mode(model):
        plan = _Plan(model, head, device, dtype)
        x = x.to(dtype=_model_dtype(model))
        return _run_head(plan, x, y, 0)


# --------------------------------------------------------------------------------------------
# Contractions
# --------------------------------------------------------------------------------------------


def _route_costs(C: int, P: int, d: int, gram_cost: int) -> dict[str, int]:
    """Multiply-adds per sample for the block traces (MATH.md section 5); ``gram_cost`` is
    what the patch Gram costs (``P^2 d`` from gathered patches, less from the input's
    phases)."""
    return {"direct": C * P * d + C * C * d, "gram": gram_cost + C * P * P + C * C * P}


def _direct_products(Ut: torch.Tensor, S: torch.Tensor, ws: _Workspace, need_diag: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Direct route for a chunk: ``J_n = S_n U_n^T`` (b, C, d), whose ``J_n J_n^T`` are the
    ``JJ_n``, and if ``need_diag`` the patch norms (b, G, P). Grouped convolutions take this
    route, the filters of group g seeing the patches of group g. ``Ut``: patches as rows
    (b, G, P, d)."""
    b, G, P, d = Ut.shape
    C = S.shape[1]
    J = torch.matmul(S.view(b, G, C // G, P), Ut, out=ws.get("J", (b, G, C // G, d)))
    diag = None
    if need_diag:
        sq = torch.mul(Ut, Ut, out=ws.get("U2", (b, G, P, d)))
        diag = sq.sum(-1)
    return J.view(b, C, d), diag  # J[c] = sum_p S[c,p] u_p


_CLASS_SUM_MAX_BYTES = 256 * 2**20  # the (K, C^2) accumulator of _GaussNewtonSum, at most


class _GaussNewtonSum:
    """``sum_n M_n o JJ_n`` with ``M_n = V^T diag(p_n) V - m_n m_n^T``, ``m_n = V^T p_n`` and
    ``JJ_n = A_n B_n^T`` (Gram route: ``A = S Q``, ``B = S``; direct route: ``A = B = J``),
    streamed over chunks of samples; :meth:`total` returns the (C, C) float64 sum.

    Every term is symmetric in (c, c'), so only the upper triangle is formed, in tiles of rows:
    tile ``r0:r1`` holds ``JJ[:, r0:r1, r0:] = A[:, r0:r1] B[:, r0:]^T`` (b, r, C - r0). With T
    tiles that is (T + 1) / 2T of the square (5/8 for four), and a tile is small enough to stay
    in cache while it is consumed: the whole (b, C, C) array went to memory and back once per
    chunk, which made the class sum below as slow as a memory copy of it (C = 256: half a
    megabyte per sample). :meth:`total` mirrors the triangle.

    First part, ``sum_k (v_k v_k^T) o [sum_n p_nk JJ_n]``: per tile, the bracket is one GEMM
    ``p^T (K x b) @ JJ-tile (b x r (C - r0))``, accumulated over the whole measurement in a
    buffer of K entries per upper-triangle entry (tile by tile) and scaled by ``v_k v_k^T``
    once at the end. Where that buffer would exceed ``_CLASS_SUM_MAX_BYTES`` (ImageNet heads:
    1000 classes x 512^2), each tile's product is scaled at once, classes chunked to
    ``chunk_bytes``.

    Second part, ``sum_n (m_n m_n^T) o JJ_n = sum_n (D_n S_n Q_n)(D_n S_n)^T``: either on each
    tile (two scalings and a sum over samples, in cache), or on the Gram route as GEMMs whose
    inner dimension runs over samples and positions (C^2 P per sample, compute-bound, tile by
    tile on the same triangle), whichever the shape makes cheaper (``outer_gemm``).
    """

    def __init__(self, V: torch.Tensor, acc: torch.dtype, ws: _Workspace, chunk_bytes: int,
                 outer_gemm: bool, tile_bytes: int | None = None):
        C = V.shape[1]
        self.V, self.ws, self.chunk_bytes, self.outer_gemm = V, ws, chunk_bytes, outer_gemm
        self.tile_bytes = tile_bytes  # None: only the _MIN_TILES tiles (GPUs: few launches)
        self.acc = acc
        self.BT = torch.zeros(C, C, dtype=acc, device=V.device)
        self.R: torch.Tensor | None = None
        self.tiles: list[tuple[int, int, int]] = []  # (r0, r1, offset in R), fixed at chunk 0

    def _make_tiles(self, b: int, C: int, esize: int) -> None:
        # at least _MIN_TILES tiles (the triangle's saving); on CPU rows that fit tile_bytes
        rows = -(-C // _MIN_TILES)
        if self.tile_bytes is not None:
            rows = min(rows, max(1, self.tile_bytes // max(1, b * C * esize)))
        K = self.V.shape[0]
        off = 0
        for r0 in range(0, C, rows):
            r1 = min(C, r0 + rows)
            self.tiles.append((r0, r1, off))
            off += K * (r1 - r0) * (C - r0)
        if off * self.acc.itemsize <= _CLASS_SUM_MAX_BYTES:
            self.R = torch.zeros(off, dtype=self.acc, device=self.V.device)

    def add(self, A: torch.Tensor, B: torch.Tensor, p: torch.Tensor, S: torch.Tensor,
            SQ: torch.Tensor | None) -> None:
        """One chunk: ``JJ_n = A_n B_n^T`` with ``A``, ``B`` (b, C, e); ``S``, ``SQ``
        (b, C, P) for the outer GEMM on the Gram route (None on the direct route)."""
        b, C, _ = A.shape
        K = p.shape[1]
        if not self.tiles:
            self._make_tiles(b, C, A.element_size())
        m = p @ self.V  # (b, C)
        in_tiles = not (self.outer_gemm and SQ is not None)
        if not in_tiles:
            P = S.shape[2]
            # flat buffers: a last, smaller chunk reuses them too
            L = self.ws.get("L", (C * b * P,)).view(C, b, P)
            torch.mul(SQ.permute(1, 0, 2), m.T.unsqueeze(2), out=L)
            Rt = self.ws.get("Rt", (C * b * P,)).view(C, b, P)
            torch.mul(S.permute(1, 0, 2), m.T.unsqueeze(2), out=Rt)
            L, Rt = L.view(C, b * P), Rt.view(C, b * P)
        for r0, r1, off in self.tiles:
            r, w = r1 - r0, C - r0
            JJ = torch.matmul(A[:, r0:r1], B[:, r0:].transpose(1, 2),
                              out=self.ws.get("JJ", (b * r * w,)).view(b, r, w))
            flat = JJ.view(b, r * w)
            if self.R is not None:
                Rk = self.R[off:off + K * r * w].view(K, r * w)
                if Rk.dtype == flat.dtype:
                    torch.addmm(Rk, p.T, flat, out=Rk)
                else:
                    Rk += (p.T @ flat).to(Rk.dtype)
            else:
                per = self._classes_per_pass(r * w, JJ.element_size())
                for k0 in range(0, K, per):
                    ks = slice(k0, min(K, k0 + per))
                    R = self.ws.get("R", (per * r * w,))[:(ks.stop - ks.start) * r * w]
                    torch.mm(p[:, ks].T, flat, out=R.view(-1, r * w))
                    self._add_scaled(R, self.V[ks], r0, r1)
            if in_tiles:
                JJ.mul_(m[:, r0:r1].unsqueeze(2)).mul_(m[:, r0:].unsqueeze(1))
                self.BT[r0:r1, r0:] -= JJ.sum(0).to(self.BT.dtype)
            else:
                self.BT[r0:r1, r0:] -= (L[r0:r1] @ Rt[r0:].T).to(self.BT.dtype)

    def _classes_per_pass(self, entries: int, esize: int) -> int:
        """Classes whose (entries,) products fit in ``chunk_bytes`` together."""
        return max(1, min(self.V.shape[0], int(self.chunk_bytes // max(1, entries * esize))))

    def _add_scaled(self, R: torch.Tensor, Vk: torch.Tensor, r0: int, r1: int) -> None:
        """``BT[r0:r1, r0:] += sum_k (v_k v_k^T)[r0:r1, r0:] o R_k``, R (classes, r1 - r0,
        C - r0) in any flat form."""
        C = Vk.shape[1]
        Vk = Vk.to(R.dtype)
        R3 = R.view(-1, r1 - r0, C - r0).mul_(Vk[:, r0:r1].unsqueeze(2))
        R3.mul_(Vk[:, r0:].unsqueeze(1))
        self.BT[r0:r1, r0:] += R3.sum(0).to(self.BT.dtype)

    def total(self) -> torch.Tensor:
        K, C = self.V.shape
        for r0, r1, off in self.tiles:
            if self.R is not None:
                r, w = r1 - r0, C - r0
                Rk = self.R[off:off + K * r * w].view(K, r * w)
                per = self._classes_per_pass(r * w, self.R.element_size())
                for k0 in range(0, K, per):
                    self._add_scaled(Rk[k0:k0 + per], self.V[k0:k0 + per], r0, r1)
            # the lower triangle right of the diagonal block is the mirror of the upper one
            self.BT[r1:, r0:r1] = self.BT[r0:r1, r1:].T
        self.R = None
        return self.BT


# Tiles of the upper triangle at the least (when C allows): four give 5/8 of the square.
_MIN_TILES = 4

# Bytes of one tile of JJ rows (b, r, C) on CPU, so that a tile is consumed by the class-sum
# GEMM while it is still in cache: 4 MiB was the fastest of 1-16 MiB (and of no tiling, 11%
# slower; square tiles then, before the triangle) for gapcnn-w32-d4 (C = 256) on this
# project's 2-core CPU (2 MiB L2 per core, 32 MiB L3). On CUDA there are only the _MIN_TILES
# tiles of the triangle: more would only multiply the kernel launches (not measured: no GPU
# was lent to this project yet).
_TILE_BYTES = 4 * 2**20


def _outer_by_gemm(C: int, P: int) -> bool:
    """Whether ``sum_n D_n JJ_n D_n`` is cheaper as one GEMM (C^2 P multiply-adds and two
    scaled copies of C P per sample) than in place on JJ (three memory passes over C^2 per
    sample), counting a GEMM multiply-add at 1/8 of a memory-bound element operation."""
    return C * C * P / 8 + 4 * C * P < 3 * C * C


def _samples_per_chunk(C: int, P: int, d: int, G: int, esize: int, chunk_bytes: int,
                       gram_entries: int | None) -> int:
    """Samples whose per-sample arrays (patches or the input's phases and their Grams, Q or
    J, S, T, JJ and the head's temporaries) fit in ``chunk_bytes``: small chunks stay in cache
    and reuse the allocator's memory, which on CPU made the memory-bound steps several times
    faster than whole batches. ``gram_entries``: what the patch Gram's source takes per
    sample on the Gram route (None: direct route)."""
    per_sample = C * C + 8 * C * P
    if gram_entries is not None:
        per_sample += P * P + gram_entries
    else:
        per_sample += G * d * P + C * d
    return max(1, int(chunk_bytes // (esize * per_sample)))


@dataclass
class CurvatureResult:
    """Exact curvature of the conv that feeds GAP, and of the classifier (bias excluded).

    ``trace`` = Tr H (H: Hessian of the mean cross-entropy in the conv kernel);
    ``relative_flatness`` = kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'};
    ``block_traces`` (C x C) = Tr H_{c,c'}; ``classifier_trace`` = Tr H_V and
    ``classifier_relative_flatness`` = kappa_V (Petzka et al. 2021, MATH.md section 6).
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


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def classifier_curvature(features: torch.Tensor, probs: torch.Tensor, V: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch sums of Tr H_V and kappa_V for the linear classifier (bias excluded).

    For one sample the Hessian of the cross-entropy in V is ``A_n (x) g_n g_n^T``, so
    ``Tr H_V = ||g_n||^2 tr(A_n) = ||g_n||^2 (1 - ||p_n||^2)`` and, with the rows ``v_k`` of V
    as neurons and ``G_V = V V^T``, ``kappa_V = ||g_n||^2 (sum_k G_V[k,k] p_k - p^T G_V p)``
    (Petzka et al. 2021). Returns the sums over the batch (not the means).
    """
    g2 = (features * features).sum(1)  # (B,)
    tr_A = 1.0 - (probs * probs).sum(1)
    GV = V @ V.T  # (K, K)
    kap = (probs * GV.diagonal()).sum(1) - ((probs @ GV) * probs).sum(1)
    return (g2 * tr_A).sum(), (g2 * kap).sum()


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
) -> CurvatureResult:
    """Exact trace, block traces and relative flatness of the conv that feeds GAP.

    Args:
        model: a CNN whose chosen conv feeds global average pooling and one ``nn.Linear``
            through channel-wise, position-wise ops (see :func:`find_head`).
        data: a DataLoader, an iterable of ``(x, y)`` batches, or a pair of tensors
            ``(X, Y)`` (split into ``batch_size`` batches, default 256).
        layer: the conv to measure (a name from ``model.named_modules()``); found if None.
        device: "auto" (CUDA when present), "cpu", "cuda:0", ... The model is not moved: when
            the device differs from the model's, a copy is measured.
        dtype: precision of the per-sample products (sums are always float64).
        route: "gram" (patch Gram Q_n = U_n^T U_n), "direct" (J_n = S_n U_n^T), or "auto"
            (the cheaper from the layer's shape, MATH.md section 5).
        progress: show a progress bar over batches.
        chunk_bytes: memory budget for the per-sample arrays of one chunk of a batch (the
            head, the patches and the C x C products run chunk by chunk); default 32 MiB on
            CPU (fastest of 8-64 MiB in ``bench curvature`` here) and 256 MiB on CUDA.

    The model is measured in eval mode and left in the mode it came in. Memory does not grow
    with the number of samples: sums are streamed over batches.
    """
    if route not in ("auto", "gram", "direct"):
        raise ValueError(f"route must be 'auto', 'gram' or 'direct', got {route!r}")
    start = time.perf_counter()
    dev = resolve_device(device)
    if _model_device(model) != dev:
        model = copy.deepcopy(model).to(dev)
    head = find_head(model, layer=layer)
    mdtype = _model_dtype(model)
    acc = torch.float64
    with _eval_mode(model):
        plan = _Plan(model, head, dev, dtype)
        C = plan.C
        T_diag = torch.zeros(C, dtype=acc, device=dev)  # the sigma'' term (diagonal blocks)
        clf_tr = torch.zeros((), dtype=acc, device=dev)
        clf_kap = torch.zeros((), dtype=acc, device=dev)
        loss_sum = torch.zeros((), dtype=acc, device=dev)
        correct = 0
        n = 0
        chosen = route
        K = plan.V.shape[0]
        conv = head.conv
        d = (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
        esize = dtype.itemsize
        budget = chunk_bytes or (256 * 2**20 if dev.type == "cuda" else 32 * 2**20)
        ws = _Workspace(dev, dtype)
        gn: _GaussNewtonSum | None = None  # made at the first batch, when P is known
        batches: Iterable = iter_batches(data, batch_size)
        bar = tqdm(batches, desc=f"exact curvature [{head.conv_name}]", unit="batch",
                   disable=not progress, leave=False)
        for bi, (x, y) in enumerate(bar):
            if x.shape[0] == 0:
                continue
            x = x.to(device=dev, dtype=mdtype)
            X, a, externals = _trunk(plan, x)
            B, P = a.shape[0], a[0, 0].numel()
            y = _check_labels(y, B, bi, K, dev)
            gram = plan.gram(X.shape[2], X.shape[3], a.shape[2], a.shape[3])
            if chosen == "auto":
                q_cost = gram.cost(conv.in_channels) if gram is not None else P * P * d
                costs = _route_costs(C, P, d, q_cost)
                chosen = "gram" if costs["gram"] <= costs["direct"] else "direct"
            if gram is None:  # grouped convs
                chosen = "direct"
            if chosen != "gram":
                gram = None
            gram_in = gram.prepare(X) if gram is not None else None
            per = _samples_per_chunk(C, P, d, plan.groups, esize, budget,
                                     gram.numel(conv.in_channels) if gram is not None else None)
            if gn is None:
                gn = _GaussNewtonSum(plan.V, acc, ws, budget,
                                     gram is not None and _outer_by_gemm(C, P),
                                     _TILE_BYTES if dev.type == "cpu" else None)
            whole = None
            if plan.chunk_externals(externals, slice(0, 1), B) is None:
                whole = _head(plan, a, externals)  # the head needs the whole batch
            zs, gs = [], []
            for s0 in range(0, B, per):
                sl = slice(s0, min(B, s0 + per))
                if whole is None:
                    S, T, g, z = _head(plan, a[sl], plan.chunk_externals(externals, sl, B))
                else:
                    S, T, g, z = (t[sl] if t is not None else None for t in whole)
                if bi == 0 and s0 == 0:  # non-finite logits are caught after the chunks
                    k8 = min(8, z.shape[0])
                    with torch.no_grad():
                        _check_logits(model(x[:k8]), z[:k8], head)
                zs.append(z)
                gs.append(g)
                p = torch.softmax(z, dim=1)  # (b, K)
                if gram is not None:
                    Q = gram(gram_in[sl], ws)  # (b, P, P)
                    SQ = torch.matmul(S, Q, out=ws.get("SQ", S.shape))  # (b, C, P)
                    diagQ = Q.diagonal(dim1=1, dim2=2).unsqueeze(1)
                    A, Bm = SQ, S  # JJ_n = S_n Q_n S_n^T
                else:
                    A, diagQ = _direct_products(plan.patch_rows(X[sl], ws), S, ws,
                                                T is not None)
                    Bm, SQ = A, None  # JJ_n = J_n J_n^T
                # Gauss-Newton part: M_n o JJ_n with M_n = V^T diag(p_n) V - (V^T p)(V^T p)^T
                gn.add(A, Bm, p, S, SQ)
                # sigma'' term, diagonal blocks only: q_n[c] sum_p T_n[c,p] Q_n[p,p]
                if T is not None:
                    G = diagQ.shape[1]
                    q = (p - F.one_hot(y[sl], K).to(p.dtype)) @ plan.V  # (b, C) = V^T r_n
                    tq = (T.view(-1, G, C // G, P) * diagQ.unsqueeze(2)).sum(-1).reshape(-1, C)
                    T_diag += (q * tq).sum(0).to(acc)
            # per-batch quantities once per batch, not per chunk
            z, g = torch.cat(zs), torch.cat(gs)
            _check_finite(z, bi, B)
            p = torch.softmax(z, dim=1)
            ctr, ckap = classifier_curvature(g, p, plan.V)
            clf_tr += ctr.to(acc)
            clf_kap += ckap.to(acc)
            loss_sum += F.cross_entropy(z, y, reduction="sum").to(acc)
            correct += int((z.argmax(1) == y).sum())
            n += B
        bar.close()
    if n == 0:
        raise ValueError("data is empty: no samples to measure the curvature on")
    assert gn is not None
    BT = gn.total()
    gn_trace = float(BT.diagonal().sum() / n)
    BT.diagonal().add_(T_diag)
    BT = (BT / n).cpu()
    W = head.conv.weight.detach().to(dtype=acc, device="cpu").reshape(C, -1)
    Gw = W @ W.T  # <w_c, w_c'>
    # For grouped convs the filters of all groups are d-vectors of the same shape; kappa keeps
    # the cross-group pairs, matching Tr of the Hessian in A of L(W (I + A)) with one A shared
    # by all groups' patches (MATH.md section 3).
    return CurvatureResult(
        trace=float(BT.diagonal().sum()),
        relative_flatness=float((Gw * BT).sum()),
        block_traces=BT,
        classifier_trace=float(clf_tr / n),
        classifier_relative_flatness=float(clf_kap / n),
        n_samples=n,
        seconds=time.perf_counter() - start,
        layer=head.conv_name,
        classifier=head.linear_name,
        route=chosen if chosen != "auto" else "gram",
        gauss_newton_trace=gn_trace,
        loss=float(loss_sum / n),
        accuracy=correct / n,
        device=str(dev),
        dtype=str(dtype).replace("torch.", ""),
    )


def _check_logits(model_logits: torch.Tensor, head_logits: torch.Tensor, head: Head) -> None:
    """Guard against a wrong split of the model: the head copy must reproduce the logits."""
    ref = model_logits.detach().to(head_logits.dtype)
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
