"""Full-batch training of the small nets the measure tests use (not a test module)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fit_full_batch(model: nn.Module, x, y, *, steps: int, seed: int | None = None,
                   min_acc: float | None = None) -> nn.Module:
    """Adam (lr 1e-2) on the whole batch in float32, in train mode (BatchNorm learns running
    statistics); returned in float64 eval mode. ``seed`` seeds torch first; ``min_acc``
    asserts the net fits the batch."""
    if seed is not None:
        torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x.float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = model.double().eval()
    if min_acc is not None:
        acc = float((model(x).argmax(1) == y).double().mean())
        assert acc > min_acc, f"training failed to fit: accuracy {acc:.2f}"
    return model
