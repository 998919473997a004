"""Every model family is in the class exact_curvature measures, and it measures it right.

For tiny instances of gapcnn and resnet the reference is the full float64 autograd Hessian
of the mean cross-entropy with respect to the last conv's weight W (C x d entries): its
trace, its C x C block traces Tr H_{c,c'} and kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'}.
For torchvision models, whose last conv is too big for a full Hessian, the reference is
the Hessian of the loss in one filter w_c (d x d), i.e. the diagonal block trace Tr H_{c,c}.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from convflat.curvature import exact_curvature
from convflat.models import build_model

DIGITS = {"in_channels": 1, "num_classes": 10, "image_size": 8}

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    {"family": "gapcnn", "width": 2, "depth": 2, **DIGITS},
    {"family": "gapcnn", "width": 2, "depth": 3, "batchnorm": False, "activation": "silu",
     "dropout": 0.3, **DIGITS},
    {"family": "gapcnn", "width": 2, "depth": 2, "activation": "gelu", **DIGITS},
    {"family": "resnet", "depth": 8, "width": 2, **DIGITS},
    {"family": "resnet", "depth": 8, "width": 2, "preact": True, **DIGITS},
    {"family": "resnet", "depth": 8, "width": 2, "activation": "silu", **DIGITS},
]
IDS = ["gapcnn-relu-bn", "gapcnn-silu-dropout", "gapcnn-gelu-bn", "resnet-post", "resnet-pre",
       "resnet-silu"]


def _tiny_model(spec, x):
    """A float64 model in eval mode with non-trivial BatchNorm statistics and affine terms."""
    torch.manual_seed(0)
    model = build_model(spec).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        model.train()
        model(x * 1.3 + 0.2)  # running statistics away from (0, 1)
    return model.eval()


def _loss_fn(model, name, x, y):
    # detached: the graph holds only what depends on w (the conv and the head after it)
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(w):
        out = functional_call(model, {**params, **buffers, name: w}, (x,))
        return torch.nn.functional.cross_entropy(out, y)

    return loss


@pytest.mark.parametrize("spec", TINY, ids=IDS)
def test_exact_curvature_matches_autograd_hessian(spec):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (12,), generator=g)
    model = _tiny_model(spec, x)
    res = exact_curvature(model, (x, y), device="cpu", batch_size=5)

    name = res.layer + ".weight"
    w0 = model.get_submodule(res.layer).weight.detach().clone()
    c = w0.shape[0]
    d = w0[0].numel()
    hess = torch.autograd.functional.hessian(_loss_fn(model, name, x, y), w0, vectorize=True)
    hess = hess.reshape(c * d, c * d)
    blocks = hess.view(c, d, c, d).diagonal(dim1=1, dim2=3).sum(-1)  # Tr H_{c,c'}  (C, C)
    gram = w0.view(c, -1) @ w0.view(c, -1).T

    assert res.classifier == "classifier"
    assert res.n_samples == 12
    torch.testing.assert_close(torch.as_tensor(res.trace, dtype=torch.float64),
                               hess.trace(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.block_traces, blocks, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.as_tensor(res.relative_flatness, dtype=torch.float64),
                               (gram * blocks).sum(), rtol=1e-8, atol=1e-12)


def _filter_hessian_trace(model, conv_name, x, y, c):
    """Tr of the float64 autograd Hessian of the loss in filter c of conv ``conv_name`` alone.

    Output channel c of the conv is recomputed from the variable filter as an im2col product
    and spliced in by a forward hook (checked to reproduce the model at the current weights),
    so autograd never forms the gradient of the whole C x d kernel per Hessian column.
    """
    conv = model.get_submodule(conv_name)
    assert conv.groups == 1
    seen = {}
    hook = conv.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], out=out))
    with torch.no_grad():
        model(x)
    hook.remove()
    u = torch.nn.functional.unfold(seen["x"], conv.kernel_size, conv.dilation, conv.padding,
                                   conv.stride)                      # (B, d, P)
    shape = seen["out"][:, c].shape                                  # (B, H_out, W_out)

    def channel(wc):
        oc = torch.einsum("d,bdp->bp", wc.reshape(-1), u).reshape(shape)
        return oc if conv.bias is None else oc + conv.bias[c]

    torch.testing.assert_close(channel(conv.weight[c].detach()), seen["out"][:, c])

    def loss(wc):
        def splice(m, inp, out):
            return torch.cat([out[:, :c], channel(wc)[:, None], out[:, c + 1 :]], dim=1)

        h = conv.register_forward_hook(splice)
        try:
            return torch.nn.functional.cross_entropy(model(x), y)
        finally:
            h.remove()

    model.requires_grad_(False)
    try:
        w = conv.weight[c].detach().clone()
        hc = torch.func.hessian(loss)(w)  # forward-over-reverse, d x d
    finally:
        model.requires_grad_(True)
    return hc.reshape(w.numel(), w.numel()).trace()


@pytest.mark.slow
def test_exact_curvature_on_torchvision_resnet18():
    torch.manual_seed(0)
    model = build_model({"family": "torchvision", "arch": "resnet18", "in_channels": 3,
                         "num_classes": 4}).double()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3,), generator=g)
    with torch.no_grad():
        model.train()
        model(x)
        model.fc.weight.normal_()  # an ordinary-scale classifier: curvature not ~0 at init
    model.eval()
    res = exact_curvature(model, (x, y), device="cpu")
    assert (res.layer, res.classifier) == ("layer4.1.conv2", "fc")
    assert res.trace > 0 and res.relative_flatness >= 0  # ReLU head: Gauss-Newton, PSD
    torch.testing.assert_close(torch.as_tensor(res.trace, dtype=torch.float64),
                               res.block_traces.diagonal().sum(), rtol=1e-10, atol=0)
    ref = _filter_hessian_trace(model, res.layer, x, y, c=5)
    torch.testing.assert_close(res.block_traces[5, 5], ref, rtol=1e-8, atol=1e-14)


@pytest.mark.slow
def test_exact_curvature_runs_on_torchvision_mobilenet_v2():
    """float32 model (float64 depthwise convs are very slow on CPU); products in float64."""
    torch.manual_seed(0)
    model = build_model({"family": "torchvision", "arch": "mobilenet_v2", "in_channels": 1,
                         "num_classes": 3})
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 16, 16, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    res = exact_curvature(model, (x, y), device="cpu")
    assert (res.layer, res.classifier) == ("features.18.0", "classifier.1")
    assert res.block_traces.shape == (1280, 1280)
    assert torch.isfinite(res.block_traces).all() and res.trace >= 0
