"""Floor 2: the CNN families of the study, built from a plain spec, and their checkpoints.

Every family ends in ::

    last conv -> [BatchNorm] (-> + residual) -> activation -> AdaptiveAvgPool2d(1)
        -> Flatten -> Linear

so that the last convolution feeds global average pooling and a linear classifier, the class
:func:`convflat.curvature.exact_curvature` measures in closed form. Everything after that conv
is channel-wise, and every forward is traceable by ``torch.fx.symbolic_trace`` (no
data-dependent Python control flow), because head detection traces the model.

A spec is a JSON-ready dict ``{"family": ..., "in_channels": C, "num_classes": K, ...}``
whose keys are declared once, per family, by the dataclasses of :mod:`convflat.model_spec`;
:func:`normalize_spec` fills in the defaults so that the spec saved in a checkpoint rebuilds
the model without the config that made it. Families:

``gapcnn``  an all-convolutional VGG/NiN-style net: ``depth`` 3 x 3 conv layers, each
            conv -> [BN] -> activation; ``width`` channels in the first stage, doubling at each
            stride-2 downsampling; dropout after every activation except the last (so dropout
            never sits between the measured conv and the pooling).
``resnet``  a CIFAR-style ResNet (3 x 3 stem, no max-pool) with BasicBlocks, post-activation
            (He et al. 2015) or pre-activation (He et al. 2016, ``preact=True``, with a final
            BN -> activation after the last block). ``depth`` 6n+2 (8, 14, 20, 32, 44, 56, 110):
            three stages of n blocks with ``width``, 2, 4 x ``width`` channels (default width
            16); ``depth`` 10, 18, 34: four stages ([1,1,1,1], [2,2,2,2], [3,4,6,3] blocks) with
            ``width`` .. 8 x ``width`` channels (default width 64). The width multiplier of the
            issue is ``width / 16`` (or ``width / 64``).
``torchvision``  any classification architecture of ``torchvision.models`` (``arch``:
            resnet18, resnet50, mobilenet_v2, ...), built with ``weights=None`` (never
            downloads), ``num_classes`` outputs and its first conv rebuilt for ``in_channels``.

Downsampling rule (gapcnn and resnet): a stride-2 step is taken only if the short side of its
output, ``floor((s - 1) / 2) + 1`` for input side s, is at least ``min_size`` (default 2)
pixels; gapcnn also takes at most ``max_downsample`` (default 3) steps and at most depth - 1.
So CIFAR (32 x 32) ends at 4 x 4 (gapcnn: 3 steps; 4-stage ResNet) or 8 x 8 (3-stage ResNet),
MNIST (28 x 28) at 4 x 4, and scikit-learn's 8 x 8 digits at 2 x 2 (P = 4 positions at the
last conv: two steps for a gapcnn of depth >= 3 or a 3-stage ResNet, one for depth 2), never
below 2 x 2. On digits, 2 x 2 trains faster and generalizes better than 4 x 4: the last
conv then sees the whole image.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from convflat import model_spec
from convflat.errors import OptionError
from convflat.io import atomic_torch_save
from convflat.model_spec import FAMILIES, resnet_stages

__all__ = ["ACTIVATIONS", "FAMILIES", "MODEL_FORMAT", "build_model", "check_head",
           "checkpoint_dict", "gapcnn_plan", "load_checkpoint", "load_state", "load_torch_file",
           "normalize_spec", "resnet_stages", "save_checkpoint"]

MODEL_FORMAT = "convflat-model/1"
#: activation name (:data:`convflat.model_spec.ACTIVATIONS`) -> module
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}

# --------------------------------------------------------------------------------------------
# Specs: the keys of each family are the dataclasses of convflat.model_spec
# --------------------------------------------------------------------------------------------


def normalize_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Check ``spec`` and return a complete copy (every default filled in, JSON-ready).

    The keys, types, ranges and defaults are those of the family's dataclass in
    :mod:`convflat.model_spec`. Raises :class:`convflat.errors.OptionError` (a ValueError)
    whose ``key`` is the offending spec key: unknown family, unknown key, missing required
    key (``in_channels``, ``num_classes``; ``arch`` for torchvision), or a bad value.
    """
    out = model_spec.normalize(spec)
    if out["family"] == "torchvision":
        _check_arch(out["arch"])
    return out


def _check_arch(arch: Any) -> None:
    from torchvision import models as tvm

    names = tvm.list_models(module=tvm)
    if arch not in names:
        raise OptionError("arch", f"spec key 'arch': {arch!r} is not a torchvision "
                                  "classification model (e.g. resnet18, resnet50, mobilenet_v2)")


def downsampled(size: int) -> int:
    """Side length after a 3 x 3 (or 1 x 1) stride-2 conv with padding 1 (or 0)."""
    return (size - 1) // 2 + 1


def gapcnn_plan(spec: dict[str, Any]) -> list[tuple[int, int, int]]:
    """``[(in_channels, out_channels, stride), ...]`` of the gapcnn conv layers.

    The number of stride-2 steps is the largest n <= min(max_downsample, depth - 1) that
    keeps the short side >= min_size; the depth layers are split into n + 1 stages as evenly
    as possible (later stages get the extra layers), and the first layer of every stage but
    the first has stride 2 and doubles the channels.
    """
    spec = normalize_spec(spec)
    side, n_down = min(spec["image_size"]), 0
    while (n_down < min(spec["max_downsample"], spec["depth"] - 1)
           and downsampled(side) >= spec["min_size"]):
        side, n_down = downsampled(side), n_down + 1
    stages = n_down + 1
    base, extra = divmod(spec["depth"], stages)
    sizes = [base + (1 if s >= stages - extra else 0) for s in range(stages)]
    plan, c_in = [], spec["in_channels"]
    for s, n in enumerate(sizes):
        c_out = spec["width"] * 2**s
        for i in range(n):
            plan.append((c_in, c_out, 2 if (s > 0 and i == 0) else 1))
            c_in = c_out
    return plan


# --------------------------------------------------------------------------------------------
# gapcnn
# --------------------------------------------------------------------------------------------


class ConvBNAct(nn.Sequential):
    """3 x 3 conv (padding 1) -> [BatchNorm2d] -> activation: (B, C_in, H, W) -> (B, C_out,
    ceil(H / stride), ceil(W / stride))."""

    def __init__(self, c_in: int, c_out: int, stride: int, batchnorm: bool, activation: str):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batchnorm)
        if batchnorm:
            self.bn = nn.BatchNorm2d(c_out)
        self.act = ACTIVATIONS[activation]()


class GapCNN(nn.Module):
    """All-convolutional net: ``features`` (ConvBNAct layers, dropout between them) ->
    ``pool`` -> ``flatten`` -> ``classifier``. (B, C, H, W) -> logits (B, K)."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        spec = normalize_spec(spec)
        plan = gapcnn_plan(spec)
        layers: list[nn.Module] = []
        for i, (c_in, c_out, stride) in enumerate(plan):
            layers.append(ConvBNAct(c_in, c_out, stride, spec["batchnorm"], spec["activation"]))
            if spec["dropout"] > 0 and i < len(plan) - 1:
                layers.append(nn.Dropout(spec["dropout"]))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(plan[-1][1], spec["num_classes"])
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, K)."""
        return self.classifier(self.flatten(self.pool(self.features(x))))


# --------------------------------------------------------------------------------------------
# resnet
# --------------------------------------------------------------------------------------------


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation block: act(bn2(conv2(act(bn1(conv1(x))))) + shortcut(x)); the shortcut
    is a 1 x 1 conv + BN when the shape changes, else the identity."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = ACTIVATIONS[activation]()
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.act2 = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, K)."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: conv2(act(bn2(conv1(a)))) + shortcut, a = act(bn1(x)); the
    shortcut is a 1 x 1 conv of ``a`` when the shape changes, else ``x`` itself."""

    def __init__(self, c_in: int, c_out: int, stride: int, activation: str):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.act1 = ACTIVATIONS[activation]()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act2 = ACTIVATIONS[activation]()
        self.conv2 = _conv3x3(c_out, c_out)
        self.project = stride != 1 or c_in != c_out  # a Python constant: fx traces one branch
        if self.project:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, K)."""
        a = self.act1(self.bn1(x))
        skip = self.shortcut(a) if self.project else x
        out = self.conv2(self.act2(self.bn2(self.conv1(a))))
        return out + skip


class ResNet(nn.Module):
    """CIFAR ResNet: ``stem`` (3 x 3 conv [-> BN -> act]) -> ``layers`` (stages of blocks) ->
    [``final``: BN -> act, pre-activation only] -> ``pool`` -> ``flatten`` -> ``classifier``.
    (B, C, H, W) -> logits (B, K)."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        spec = normalize_spec(spec)
        self.preact = spec["preact"]
        act, width = spec["activation"], spec["width"]
        block = PreActBlock if self.preact else BasicBlock
        if self.preact:
            self.stem = _conv3x3(spec["in_channels"], width)
        else:
            self.stem = nn.Sequential(_conv3x3(spec["in_channels"], width),
                                      nn.BatchNorm2d(width), ACTIVATIONS[act]())
        side, c_in, stages = min(spec["image_size"]), width, []
        for s, n_blocks in enumerate(resnet_stages(spec["depth"])):
            c_out = width * 2**s
            stride = 2 if s > 0 and downsampled(side) >= spec["min_size"] else 1
            side = downsampled(side) if stride == 2 else side
            blocks = []
            for b in range(n_blocks):
                blocks.append(block(c_in, c_out, stride if b == 0 else 1, act))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        if self.preact:
            self.final = nn.Sequential(nn.BatchNorm2d(c_in), ACTIVATIONS[act]())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(c_in, spec["num_classes"])
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> logits (B, K)."""
        h = self.layers(self.stem(x))
        if self.preact:
            h = self.final(h)
        return self.classifier(self.flatten(self.pool(h)))


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan-in, ReLU gain), zero conv biases, BN = identity; the Linear keeps
    PyTorch's default. Draws from the global torch RNG (seeded by the caller)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------


def _torchvision_model(spec: dict[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, num_classes=K)`` with its first conv
    rebuilt for ``in_channels`` (same kernel, stride, padding, bias) when that is not 3."""
    from torchvision import models as tvm

    model = tvm.get_model(spec["arch"], weights=None, num_classes=spec["num_classes"])
    if spec["in_channels"] != 3:
        name, conv = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        new = nn.Conv2d(spec["in_channels"], conv.out_channels, conv.kernel_size,
                        stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                        bias=conv.bias is not None, padding_mode=conv.padding_mode)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return model


# --------------------------------------------------------------------------------------------
# Public: build, save, load
# --------------------------------------------------------------------------------------------


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The model a spec describes, freshly initialised from the global torch RNG (seed it
    first for reproducible weights). The complete spec is attached as ``model.spec``."""
    spec = normalize_spec(spec)
    if spec["family"] == "gapcnn":
        model = GapCNN(spec)
    elif spec["family"] == "resnet":
        model = ResNet(spec)
    else:
        model = _torchvision_model(spec)
    model.spec = spec
    return model


def checkpoint_dict(model: nn.Module, spec: dict[str, Any] | None = None,
                    **extra: Any) -> dict[str, Any]:
    """``{"format": "convflat-model/1", "spec", "state_dict", **extra}`` with the state on the
    CPU in the default (contiguous) memory format.

    Training passes ``data=`` :func:`convflat.data.data_identity` of the prepared data it
    trains on (model.pt and init.pt); :func:`checkpoint_data` reads it back. Checkpoints
    written before that have no ``data`` key."""
    spec = normalize_spec(spec if spec is not None else model.spec)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return {"format": MODEL_FORMAT, "spec": spec, "state_dict": state, **extra}


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    spec: dict[str, Any] | None = None, **extra: Any) -> Path:
    """Write :func:`checkpoint_dict` atomically (a killed job never leaves half a file)."""
    return atomic_torch_save(path, checkpoint_dict(model, spec, **extra))


def load_state(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """``model.load_state_dict(state)`` after checking every key and shape, so that a file
    that does not fit fails with ``ValueError("<what>: first mismatching key ...")``."""
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            raise ValueError(f"{what}: first mismatching key {key!r} is missing from the file")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise ValueError(f"{what}: first mismatching key {key!r} has shape "
                             f"{tuple(state[key].shape)} in the file, {tuple(ref.shape)} in "
                             "the model the spec builds")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ValueError(f"{what}: first mismatching key {extra[0]!r} is not in the model the "
                         "spec builds")
    model.load_state_dict(state)
    return model


def check_head(spec: dict[str, Any]):
    """The :class:`convflat.curvature.Head` of the model ``spec`` describes, or
    :class:`convflat.curvature.OutOfClassError` naming the op that puts it outside the class
    ``convflat curvature`` measures (e.g. torchvision's vgg: a MaxPool2d after the last conv;
    squeezenet: its last conv is the classifier, no linear layer after the pooling).

    The check is structural (a ``torch.fx`` trace), so the model is built on the meta device
    (no memory, no initialisation cost) where its constructor allows, else on the CPU.
    """
    from convflat.curvature import find_head

    spec = normalize_spec(spec)
    try:
        with torch.device("meta"):
            model = build_model(spec)
    except (NotImplementedError, RuntimeError):  # a constructor that copies data (regnet)
        model = build_model(spec)
    return find_head(model)


def load_torch_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one clear error for a file that is not
    a torch file (truncated, text, garbage, a directory): ``ValueError("not a convflat or
    torch checkpoint: <path>")``. A torch file that holds Python objects besides tensors (a
    whole pickled model) is refused with its own message: convflat never unpickles code."""
    import warnings
    import zipfile

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"not a convflat or torch checkpoint: {path} is a directory")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # the unpickler warns about foreign pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zip, EOF, OS and unpickling errors alike
        if isinstance(exc, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("data.pkl") for n in zf.namelist()):
                    raise ValueError(
                        f"{path} is a torch file that holds Python objects besides tensors (a "
                        "pickled model?); convflat reads only tensors and plain containers "
                        "(torch.load weights_only=True): save model.state_dict() instead"
                    ) from exc
        raise ValueError(f"not a convflat or torch checkpoint: {path}") from exc


def checkpoint_data(ckpt: dict[str, Any], path: str | os.PathLike = "checkpoint") -> (
        dict[str, Any] | None):
    """The data identity a convflat checkpoint records (:func:`convflat.data.data_identity`),
    or None for a checkpoint written before checkpoints recorded one. ValueError naming the
    file for a ``data`` entry that is not an identity."""
    from convflat.data import IDENTITY_FORMAT

    ident = ckpt.get("data")
    if ident is None:
        return None
    if not isinstance(ident, dict) or ident.get("format") != IDENTITY_FORMAT:
        found = ident.get("format") if isinstance(ident, dict) else type(ident).__name__
        raise ValueError(f"{path}: its data identity has format {found!r}, expected "
                         f"{IDENTITY_FORMAT!r}")
    missing = [k for k in ("image_shape", "classes", "train_hash") if k not in ident]
    if missing:
        raise ValueError(f"{path}: its data identity lacks {', '.join(missing)}")
    return dict(ident)


def load_checkpoint(path: str | os.PathLike,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint's spec describes and load its weights; the model is
    returned in eval mode, with the whole checkpoint dict.

    Errors: FileNotFoundError for a missing file; ValueError for a file that is not a torch
    file ("not a convflat or torch checkpoint: <path>"), a torch file that is not a convflat
    checkpoint, the stand-in of a failed run, a bad spec, or a ``state_dict`` that does not fit
    the spec (naming the first mismatching key).
    """
    path = Path(path)
    ckpt = load_torch_file(path, map_location)
    if isinstance(ckpt, dict) and ckpt.get("format") == "convflat-failed/1":
        raise ValueError(f"{path} stands in for the model of a failed run: "
                         f"{ckpt.get('error') or 'no error recorded'}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != MODEL_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = ""
        if isinstance(ckpt, dict) and found is None and ckpt and all(
                isinstance(v, torch.Tensor) for v in ckpt.values()):
            hint = " (a plain state_dict: give its architecture, e.g. `convflat curvature " \
                   "--arch resnet18`)"
        raise ValueError(f"{path} is not a convflat checkpoint: expected a dict with format "
                         f"{MODEL_FORMAT!r}, found {found!r}{hint}")
    for key in ("spec", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"{path}: checkpoint lacks key {key!r}")
    try:
        model = build_model(ckpt["spec"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    load_state(model, ckpt["state_dict"], f"{path}: state_dict does not fit the spec")
    model.to(map_location)
    return model.eval(), ckpt
