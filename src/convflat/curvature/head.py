r"""Head detection: is the chosen conv in the class that the closed form measures exactly?

The class is that of docs/math.md Eq. (1): after the conv, ``a = <w_c, u_p> + beta_c``, only
ops that act channel by channel and position by position (eval BatchNorm, elementwise
activations, dropout, a residual add or scaling by a tensor that does not depend on the
kernel), then global average pooling and one ``nn.Linear`` whose logits are the model's
output. Then ``g_{n,c}`` depends on the kernel only through its own filter ``w_c``, the head's
Hessian in ``a`` is diagonal, and ``S_n``, ``T_n`` of Eq. (3) come out of backward passes.

The check is structural: the forward is traced with ``torch.fx`` and every node downstream of
the conv is classified (:func:`_classify`) and walked through a small state machine
(``_TRANSITIONS``; what is refused, and why, is ``_REFUSALS``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn


class OutOfClassError(ValueError):
    """The model is not a CNN whose chosen conv feeds GAP and one linear layer through
    channel-wise, position-wise ops; the message names the op that breaks the class."""


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
_CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
# normalizations across channels (each output reads every filter's output)
_CHANNEL_NORM_MODULES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
_CHANNEL_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.local_response_norm,
                           F.rms_norm, F.normalize}

# The walk from the conv to the output. States: "spatial" (between the conv and the GAP),
# "pooled" (after the GAP), "logits" (the single Linear's output, which must be the model's
# output). An op of kind k applied to a tensor in state s keeps the path in the class exactly
# when (s, k) is a key here; the value is the state of the op's output.
_TRANSITIONS: dict[tuple[str | None, str], str] = {
    ("spatial", "elementwise"): "spatial",
    ("spatial", "elementwise_or_flatten"): "spatial",  # dropout, identity
    ("spatial", "add"): "spatial",  # residual add of a tensor that does not depend on the conv
    ("spatial", "mul"): "spatial",  # scaling by such a tensor
    ("spatial", "combine_elementwise"): "spatial",  # x * sigmoid(x): both from the same a
    ("spatial", "cat_channels"): "spatial",  # next to channels that do not depend on the conv
    ("spatial", "gap"): "pooled",
    ("pooled", "flatten"): "pooled",
    ("pooled", "elementwise_or_flatten"): "pooled",  # dropout, identity on the features
    ("pooled", "linear"): "logits",
    ("pooled", "conv_classifier"): "logits",  # a 1x1 conv on the pooled 1x1 map is linear
    ("logits", "flatten"): "logits",  # (B, K, 1, 1) -> (B, K) after a 1x1-conv classifier
    ("logits", "elementwise_or_flatten"): "logits",  # timm's head: Identity after the fc
}

# Why any other op is refused: the first row whose state and kind match (None: any) gives the
# reason. ``{linear}`` is the classifier's name.
_REFUSALS: tuple[tuple[str | None, str | None, str], ...] = (
    (None, "combines",
     "combines two tensors that both depend on the conv (filters or positions are mixed, as "
     "in squeeze-and-excitation or a second branch)"),
    (None, "combines_pooled",
     "combines the conv's output with a tensor computed from its pooled features (filters "
     "are mixed: squeeze-and-excitation or attention gating before the pool is not in the "
     "class)"),
    ("spatial", "index",
     "indexes or slices the conv's output (not supported: the pooled features would no "
     "longer hold each filter's channel once, in order, as the closed form reads them)"),
    (None, "channel_norm",
     "normalizes across the channels (LayerNorm, GroupNorm or alike), so every feature "
     "depends on every filter"),
    (None, "cat_other",
     "concatenates the conv's output other than once along the channels with tensors that "
     "do not depend on the kernel"),
    (None, "batch_stats_norm",
     "normalizes with the statistics of the batch even in eval mode (BatchNorm without "
     "running statistics), so one sample's loss depends on the others"),
    ("logits", None,
     "follows the classifier '{linear}' on the pooled features: exactly one linear map "
     "(nn.Linear or 1x1 conv) must lead straight to the model's output (an MLP head, or "
     "squeeze-and-excitation gating the features, is not in the class)"),
    ("spatial", "operand_right", "has the conv output on the right-hand side of a '-' or '/'"),
    ("pooled", "conv",
     "is a convolution on the pooled features that is not a linear classifier (only a 1x1 "
     "conv without padding or groups is)"),
    (None, "conv", "is a second convolution after the chosen one"),
    ("spatial", "conv_classifier", "is a second convolution after the chosen one"),
    (None, "functional_linear",
     "is a functional linear layer whose weight is not an nn.Linear's (use nn.Linear)"),
    (None, "linear", "is applied before global average pooling"),
    ("pooled", None, "is applied to the pooled features (an MLP head is not in the class)"),
    (None, None, "mixes positions or channels before global average pooling"),
)


def _refusal(state: str | None, kind: str) -> str:
    """The reason of the first row of ``_REFUSALS`` that matches ``(state, kind)``."""
    for s, k, why in _REFUSALS:
        if s in (None, state) and k in (None, kind):
            return why
    raise AssertionError("the last row of _REFUSALS matches everything")


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(node.target)).__name__} module '{node.target}'"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return f"function '{name}' (node '{node.name}')"
    if node.op == "call_method":
        return f"method '.{node.target}()' (node '{node.name}')"
    return f"{node.op} '{node.name}'"


def _is_one(size) -> bool:
    if isinstance(size, int):
        return size == 1
    return isinstance(size, (tuple, list)) and all(s == 1 for s in size)


def _is_gap(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Global average pooling over H and W: AdaptiveAvgPool2d(1), adaptive_avg_pool2d(x, 1),
    or a mean over dims (2, 3)."""
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
    linear: nn.Linear | nn.Conv2d  # nn.Linear, or a 1x1 conv on the pooled map (dla34)
    piecewise_linear: bool  # True when sigma'' vanishes a.e. on the head (ReLU-like only)
    ops: list[str] = field(default_factory=list)  # the ops between conv and classifier
    # fx plumbing (internal): the traced model, the conv node, region and external inputs
    _gm: fx.GraphModule | None = field(default=None, repr=False)
    _conv_node: fx.Node | None = field(default=None, repr=False)
    _region: list[fx.Node] = field(default_factory=list, repr=False)
    _externals: list[fx.Node] = field(default_factory=list, repr=False)
    _feature_node: fx.Node | None = field(default=None, repr=False)
    _linear_node: fx.Node | None = field(default=None, repr=False)
    _logits_node: fx.Node | None = field(default=None, repr=False)
    # channel concatenations between the conv and the pool: (cat node, index of the
    # conv-dependent tensor in its list); the conv's channels sit at an offset in the features
    _cats: list[tuple[fx.Node, int]] = field(default_factory=list, repr=False)

    @property
    def classifier_weight(self) -> torch.Tensor:
        """The classifier's weight as a (K, C_features) matrix (a 1x1 conv's (K, C, 1, 1)
        kernel reshaped), detached."""
        w = self.linear.weight.detach()
        return w.reshape(w.shape[0], -1)


def _trace(model: nn.Module) -> fx.GraphModule:
    """The forward traced in eval mode (the mode it is measured in): Python branches on
    ``self.training``, such as timm's ``BatchNormAct2d`` choosing batch statistics, are
    resolved as in eval; every module's own flag is restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot verify the head"
        raise OutOfClassError(
            f"could not trace {type(model).__name__} with torch.fx ({type(exc).__name__}: "
            f"{exc}); convflat traces the forward to verify that the conv feeds global average "
            "pooling and one linear layer, so the forward must be traceable (no data-dependent "
            "Python control flow)"
        ) from exc
    finally:
        for m, flag in flags:
            m.training = flag


def _is_linear_conv(mod: nn.Module) -> bool:
    """A conv that is a linear map of the channels alone (1x1 kernel, no padding, one group):
    on the pooled 1x1 map it is a linear classifier with weight ``(K, C, 1, 1)``."""
    return (isinstance(mod, nn.Conv2d) and _is_one(mod.kernel_size) and mod.groups == 1
            and mod.padding in (0, (0, 0), "valid"))


def _classify_module(mod: nn.Module) -> tuple[str, bool]:
    """``(kind, piecewise_linear)`` of a module applied to the conv-dependent tensor."""
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is None:
        return "batch_stats_norm", True
    if isinstance(mod, _ELEMENTWISE_MODULES):
        # dropout and identity also pass pooled features through unchanged
        flat = isinstance(mod, (nn.Dropout, nn.Identity))
        return ("elementwise_or_flatten" if flat else "elementwise",
                isinstance(mod, _PIECEWISE_LINEAR_MODULES))
    if isinstance(mod, nn.Flatten):
        return "flatten", True
    if isinstance(mod, nn.Linear):
        return "linear", True
    if _is_linear_conv(mod):
        return "conv_classifier", True
    if isinstance(mod, _CHANNEL_NORM_MODULES):
        return "channel_norm", True
    if isinstance(mod, nn.Conv2d):
        return "conv", True
    return "other", True


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` (or keyword ``name``) of a call node."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _classifier(gm: fx.GraphModule, node: fx.Node, root: nn.Module | None = None
                ) -> tuple[str, nn.Module] | None:
    """``(name, module)`` of a classifier node: an nn.Linear or 1x1-conv module, or
    ``F.linear`` whose weight is the 2-D ``weight`` of a submodule (timm's Linear, an
    nn.Linear subclass, is traced into that call); the module is looked up in ``root`` (the
    model; the traced ``gm`` holds only a stub owning the weight). None for a functional
    linear with any other weight."""
    if node.op == "call_module":
        return str(node.target), (root or gm).get_submodule(node.target)
    weight = _arg(node, 1, "weight")
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return None
    owner, _, attr = str(weight.target).rpartition(".")
    if attr != "weight" or not owner or getattr(gm.get_submodule(owner), attr).dim() != 2:
        return None
    return owner, (root or gm).get_submodule(owner)


def _classify_batch_norm(node: fx.Node, dep: fx.Node) -> str:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, ...)``, the form
    timm's ``BatchNormAct2d`` calls: with ``training=False`` and the model's running
    statistics it is a per-channel affine map (elementwise); with ``training=True`` or no
    running statistics it normalizes by the batch."""
    if _arg(node, 0, "input") is not dep:
        return "other"
    mean, var = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
    if _arg(node, 5, "training", False) is not False or mean is None or var is None:
        return "batch_stats_norm"
    stats = [mean, var, _arg(node, 3, "weight"), _arg(node, 4, "bias")]
    if all(a is None or (isinstance(a, fx.Node) and a.op == "get_attr") for a in stats):
        return "elementwise"
    return "other"  # statistics computed in the forward: not the model's fixed buffers


def _classify_cat(node: fx.Node, dep: fx.Node) -> str:
    """``torch.cat(tensors, dim)``: in the class when the conv-dependent tensor is one element
    of ``tensors``, exactly once, and ``dim`` is the channel dim (the other elements do not
    depend on the kernel: a DenseNet block's concatenation)."""
    tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
    if (isinstance(tensors, (list, tuple)) and dim in (1, -3)
            and sum(1 for t in tensors if t is dep) == 1):
        return "cat_channels"
    return "cat_other"


def _classify_function(tgt: Any, right: bool) -> tuple[str, bool]:
    """``(kind, piecewise_linear)`` of a function; ``right``: the conv-dependent tensor is not
    its first argument (functional batch norm and concatenation: see :func:`_classify`)."""
    if tgt in _ELEMENTWISE_FUNCTIONS:
        return ("elementwise_or_flatten" if tgt is F.dropout else "elementwise",
                _ELEMENTWISE_FUNCTIONS[tgt])
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
    if tgt in _CHANNEL_NORM_FUNCTIONS:
        return "channel_norm", True
    if tgt is operator.getitem:
        return "index", True
    if tgt is F.conv2d:
        return "conv", True
    return "other", True


def _classify_method(tgt: str, right: bool) -> tuple[str, bool]:
    """``(kind, piecewise_linear)`` of a tensor method (``right`` as for functions)."""
    if tgt in _ELEMENTWISE_METHODS:
        return "elementwise", _ELEMENTWISE_METHODS[tgt]
    if tgt in _ADD_METHODS | _MUL_METHODS:
        if right and tgt.startswith(("sub", "div")):
            return "operand_right", True
        return ("add" if tgt in _ADD_METHODS else "mul"), True
    if tgt in _FLATTEN_METHODS:
        return "flatten", True
    return "other", True


def _is_arithmetic(node: fx.Node) -> bool:
    """``+ - * /`` in any form (operator, torch function, tensor method)."""
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS | _MUL_FUNCTIONS
    return node.op == "call_method" and node.target in _ADD_METHODS | _MUL_METHODS


def _classify_combination(node: fx.Node, states: list[str], after_cat: bool
                          ) -> tuple[str, bool]:
    """A node with two or more conv-dependent inputs in ``states``. ``+ - * /`` of tensors
    that are all elementwise functions of the conv output ``a`` (state spatial, no channel
    concatenation upstream, which would shift channels against each other) is elementwise
    (``x * sigmoid(x)``): each output entry depends on one entry of ``a``."""
    if set(states) == {"spatial"} and not after_cat and _is_arithmetic(node):
        name = node.target if node.op == "call_method" else node.target.__name__
        return "combine_elementwise", name.rstrip("_").lstrip("i") in ("add", "sub")
    if "spatial" in states and set(states) - {"spatial"}:
        return "combines_pooled", True
    return "combines", True


def _classify(node: fx.Node, gm: fx.GraphModule, deps: list[fx.Node]) -> tuple[str, bool]:
    """What a node that consumes the one conv-dependent tensor ``deps[0]`` does, whatever its
    form (module, function or method): ``(kind, piecewise_linear)`` with kind one of
    elementwise, elementwise_or_flatten (dropout, identity), add, mul, operand_right
    (``x - a`` or ``x / a``), gap, flatten, linear, conv_classifier (1x1 conv), functional_linear,
    conv, batch_stats_norm (BatchNorm without running statistics), cat_channels, cat_other,
    other. Nodes with several conv-dependent inputs: :func:`_classify_combination`."""
    if _is_gap(node, gm):
        return "gap", True
    if node.op == "call_function" and node.target is F.batch_norm:
        return _classify_batch_norm(node, deps[0]), True
    if node.op == "call_function" and node.target in _CAT_FUNCTIONS:
        return _classify_cat(node, deps[0]), True
    if node.op == "call_function" and node.target is F.linear:
        # timm's Linear (an nn.Linear subclass) is traced into F.linear(x, weight, bias)
        return ("linear" if _arg(node, 0, "input") is deps[0] and _classifier(gm, node)
                else "functional_linear"), True
    # keyword-only arguments count as the right-hand side: '-' and '/' are then refused
    right = not node.args or node.args[0] is not deps[0]
    if node.op == "call_module":
        return _classify_module(gm.get_submodule(node.target))
    if node.op == "call_function":
        return _classify_function(node.target, right)
    if node.op == "call_method":
        return _classify_method(node.target, right)
    return "other", True


def _channel_norm_ahead(node: fx.Node, gm: fx.GraphModule, steps: int = 3) -> fx.Node | None:
    """A normalization across channels among the next ``steps`` consumers of ``node`` (timm's
    LayerNorm2d permutes the channels last, normalizes and permutes back)."""
    frontier = [node]
    for _ in range(steps):
        frontier = [u for n in frontier for u in n.users]
        for u in frontier:
            if (u.op == "call_module" and isinstance(gm.get_submodule(u.target),
                                                     _CHANNEL_NORM_MODULES)) or (
                    u.op == "call_function" and u.target in _CHANNEL_NORM_FUNCTIONS):
                return u
    return None


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size(0)``, ``x.dim()``, ``getattr(x, "shape")``: no dependence on the values."""
    return (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
        node.op == "call_function" and node.target is getattr
    )


@dataclass
class _Walk:
    """What the walk from the conv to the output found (see :func:`_walk`)."""

    region: list[fx.Node] = field(default_factory=list)  # nodes after the conv, in order
    ops: list[str] = field(default_factory=list)
    piecewise: bool = True
    linear_node: fx.Node | None = None
    cats: list[tuple[fx.Node, int]] = field(default_factory=list)  # (cat, index of the conv's)
    logits_node: fx.Node | None = None  # the model's output: the classifier's, or flattened


def _walk(gm: fx.GraphModule, conv_node: fx.Node) -> _Walk:
    """Walk every node downstream of ``conv_node`` through ``_TRANSITIONS``; the first op
    that has none is refused with its ``_REFUSALS`` reason. Shape queries are allowed
    anywhere and carry no dependence; arithmetic on shapes stays in the region."""
    state: dict[fx.Node, str] = {conv_node: "spatial"}
    shape_nodes: set[fx.Node] = set()
    after_cat: set[fx.Node] = set()  # downstream of a channel concatenation
    walk = _Walk()
    for node in gm.graph.nodes:
        if node is conv_node or node.op in ("placeholder", "get_attr"):
            continue
        inputs = node.all_input_nodes
        deps = [n for n in inputs if n in state]
        if node.op == "output":
            out = node.args[0]
            if deps and (walk.linear_node is None or not isinstance(out, fx.Node)
                         or state.get(out) != "logits"):
                raise _refuse(gm, conv_node, deps[0],
                              "reaches the model's output without passing a global average "
                              "pool and one nn.Linear (or the output is not the classifier's "
                              "logits alone)")
            walk.logits_node = out if deps else None
            continue
        if not deps:
            if node.op in ("call_function", "call_method") and any(
                    n in shape_nodes for n in inputs):
                shape_nodes.add(node)  # arithmetic on shapes
                walk.region.append(node)
            continue
        walk.region.append(node)
        if _is_shape_query(node):
            shape_nodes.add(node)
            continue
        states = [state[n] for n in deps]
        src_state = states[0] if len(set(states)) == 1 else None
        if len(deps) > 1:
            kind, piecewise = _classify_combination(node, states,
                                                    any(n in after_cat for n in deps))
        else:
            kind, piecewise = _classify(node, gm, deps)
        nxt = _TRANSITIONS.get((src_state, kind))
        if nxt is None:
            linear = (_classifier(gm, walk.linear_node)[0]
                      if walk.linear_node is not None else None)
            norm = _channel_norm_ahead(node, gm) if kind == "other" else None
            if norm is not None:  # a LayerNorm written as permute, norm, permute: name it
                node, kind = norm, "channel_norm"
            raise _refuse(gm, conv_node, node,
                          _refusal(src_state, kind).format(linear=linear))
        state[node] = nxt
        walk.piecewise &= piecewise
        walk.ops.append(_describe(node, gm))
        if kind == "cat_channels":
            walk.cats.append((node, next(i for i, t in enumerate(node.args[0])
                                         if t is deps[0])))
        if kind == "cat_channels" or any(n in after_cat for n in deps):
            after_cat.add(node)
        if kind in ("linear", "conv_classifier"):
            walk.linear_node = node
    return walk


def _refuse(gm: fx.GraphModule, conv_node: fx.Node, node: fx.Node, why: str
            ) -> OutOfClassError:
    return OutOfClassError(
        f"conv layer '{conv_node.target}' is not in the class measured exactly: "
        f"{_describe(node, gm)} {why}. The chosen conv must feed global average pooling "
        "and one nn.Linear through channel-wise, position-wise ops only (eval BatchNorm, "
        "elementwise activations, dropout, residual add of a tensor that does not depend "
        "on the kernel, flatten). Pass layer= to choose another conv."
    )


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """The nodes that ``node`` is computed from."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _check_head(gm: fx.GraphModule, conv_node: fx.Node, root: nn.Module) -> Head:
    """Verify that every op downstream of ``conv_node`` keeps the closed form exact, and
    collect the head: its nodes and the tensors it reads from outside (the externals, such as
    a residual branch)."""
    walk = _walk(gm, conv_node)
    linear_node = walk.linear_node
    if linear_node is None:
        raise OutOfClassError(
            f"conv layer '{conv_node.target}' does not reach a global average pool followed "
            "by one nn.Linear that produces the model's output"
        )
    externals: list[fx.Node] = []
    region_set = set(walk.region)
    for node in walk.region:
        for inp in node.all_input_nodes:
            if inp is conv_node or inp in region_set or inp.op == "get_attr":
                continue
            if inp not in externals:
                externals.append(inp)
    return Head(
        conv_name=str(conv_node.target),
        conv=gm.get_submodule(conv_node.target),
        linear_name=_classifier(gm, linear_node, root)[0],
        linear=_classifier(gm, linear_node, root)[1],
        piecewise_linear=walk.piecewise,
        ops=walk.ops,
        _gm=gm,
        _conv_node=conv_node,
        _region=walk.region,
        _externals=externals,
        _feature_node=linear_node.args[0],
        _linear_node=linear_node,
        _logits_node=walk.logits_node,
        _cats=[c for c in walk.cats if c[0] in _ancestors(linear_node)],  # not dead branches
    )


def _pooled(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes that hold pooled features: a global average pool, and what is computed from
    pooled features alone (parameters aside). A conv there acts on a 1x1 map (a 1x1-conv
    classifier, the conv head of MobileNetV3, a squeeze-and-excitation's reduce) and is no
    candidate; the product of a spatial map with an SE gate is spatial again."""
    pooled: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        ins = [n for n in node.all_input_nodes if n.op != "get_attr"]
        if _is_gap(node, gm) or (ins and all(n in pooled for n in ins)):
            pooled.add(node)
    return pooled


def _depths(gm: fx.GraphModule) -> dict[fx.Node, int]:
    depth: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        ins = node.all_input_nodes
        depth[node] = 1 + max((depth[i] for i in ins), default=-1)
    return depth


def _named_conv(gm: fx.GraphModule, model: nn.Module, conv_nodes: list[fx.Node],
                layer: str) -> fx.Node:
    """The one call of the conv module ``layer``; an unknown name or a module that is not a
    conv raises an error that lists the conv layers one could name (each called once)."""
    names = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in conv_nodes:
        calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    once = [name for name, k in calls.items() if k == 1]
    choices = (f"; the conv layers of {type(model).__name__}: {', '.join(once)}" if once
               else f"; {type(model).__name__} calls no nn.Conv2d exactly once")
    if layer not in names:
        raise OutOfClassError(
            f"layer={layer!r} is not a module of {type(model).__name__}{choices}")
    if not isinstance(names[layer], nn.Conv2d):
        raise OutOfClassError(
            f"layer={layer!r} is a {type(names[layer]).__name__}, not an nn.Conv2d{choices}"
        )
    chosen = [n for n in conv_nodes if n.target == layer]
    if not chosen:
        raise OutOfClassError(f"layer={layer!r} is never called in the forward pass")
    if len(chosen) > 1:
        raise OutOfClassError(f"layer={layer!r} is called more than once in the forward")
    return chosen[0]


def find_head(model: nn.Module, example_input: Any = None, *, layer: str | None = None) -> Head:
    """Find the conv whose output feeds global average pooling and one linear classifier.

    Without ``layer``, every ``nn.Conv2d`` is checked and, among those in the class
    (docs/math.md Eq. (1)), the one deepest in the graph (longest path from the input; ties
    go to the later one) is chosen: that is the main-branch conv of a final residual block,
    not a parallel shortcut conv. A conv module called more than once (its kernel shared
    between calls), and a conv applied after a global average pool (a 1x1-conv classifier),
    are skipped.

    Args:
        model: the network; its forward must be traceable by ``torch.fx`` (no data-dependent
            Python control flow).
        example_input: accepted for API symmetry and ignored: the check is structural (a
            torch.fx trace), so no data are needed.
        layer: the name of the conv to measure instead (as in ``model.named_modules()``).

    Returns:
        The :class:`Head`: the conv and its name, the classifier and its name, whether the
        head is piecewise linear (sigma'' = 0 a.e., so the Hessian is its Gauss-Newton part),
        and the ops between the conv and the classifier.

    Raises:
        OutOfClassError: the model cannot be traced; ``layer`` is not a conv called exactly
            once; no conv is in the class. The message names the op that breaks the class
            (for the deepest conv when ``layer`` is not given).
    """
    del example_input
    gm = _trace(model)
    conv_nodes = [
        n for n in gm.graph.nodes
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Conv2d)
    ]
    if layer is not None:
        return _check_head(gm, _named_conv(gm, model, conv_nodes, layer), model)
    if not conv_nodes:
        raise OutOfClassError(f"{type(model).__name__} has no nn.Conv2d called in its forward")
    depth = _depths(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pooled = _pooled(gm)
    spatial = [n for n in conv_nodes if n not in pooled]
    if not spatial:
        raise OutOfClassError(
            f"{type(model).__name__} calls nn.Conv2d modules only on pooled features "
            f"({', '.join(str(n.target) for n in conv_nodes[:3])}); its other convs are not "
            "nn.Conv2d modules (such as weight-standardized convs, traced as functions), so "
            "no conv before the pool can be measured")
    ranked = sorted(spatial, key=lambda n: (depth[n], order[n]), reverse=True)
    first_error: OutOfClassError | None = None
    for node in ranked:
        if sum(1 for n in conv_nodes if n.target == node.target) > 1:
            continue  # a conv module called twice shares its kernel between calls
        try:
            return _check_head(gm, node, model)
        except OutOfClassError as exc:
            if first_error is None:
                first_error = exc
    assert first_error is not None
    raise first_error
