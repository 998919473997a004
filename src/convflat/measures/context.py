"""The shared state of one measurement: model copy, data on the device, seeds, and a cache.

Every measure receives a :class:`Context`. It holds

* a private copy of the model on the measurement device, in eval mode (measures perturb the
  weights in place and restore them; working on a copy means a bug can never leak into the
  caller's model, and moving to a device never moves the caller's model);
* the data as a list of ``(x, y)`` batches on that device, in the model's dtype. The list is
  materialised once because every measure here passes over the data many times (Hessian-vector
  products, Monte Carlo perturbations, ascent steps) and curvlinops needs the same batches in the
  same order on every pass;
* a cache for results that several measures share (the exact curvature, the baseline loss and
  margins, the PAC-Bayes sigma search, the per-sample factors of the conv Hessian block), with the
  seconds each took so that every measure can report its stand-alone cost.

Seeds: randomness always comes from ``torch.Generator`` objects on the CPU seeded with the
measurement seed (and moved to the device), so a seed gives the same numbers on every device
and regardless of which other measures ran before. curvlinops draws its probes from the global
generator; :func:`seeded` forks and seeds it for the duration of a call.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convflat.curvature.plan import model_dtype
from convflat.io import iter_batches, resolve_device

__all__ = ["Context", "perturbed", "seeded"]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators inside the block and restore their state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def perturbed(params: Sequence[nn.Parameter], deltas: Sequence[torch.Tensor]) -> Iterator[None]:
    """Add ``deltas`` to ``params`` in place inside the block; restore the exact originals.

    The originals are copied back (not ``p -= delta``), so the weights after the block are
    bit-for-bit those before it, whatever happened inside.
    """
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, deltas, strict=True):
                p.add_(d.to(dtype=p.dtype, device=p.device))
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)


class Context:
    """Model, data and cache for one set of measures (see the module docstring).

    Args:
        model: the trained network; copied, moved to ``device`` and put in eval mode.
        data: training data: a pair of tensors ``(X, Y)``, a DataLoader, or an iterable of
            ``(x, y)`` batches (see :func:`convflat.io.iter_batches`).
        init_model: the network at initialisation (same architecture), or None.
        device: "auto" (CUDA when present), "cpu", "cuda:0", ...
        seed: seed of every random draw.
        batch_size: batch size when ``data`` is a pair of tensors (default 256).
        progress: show progress bars of long loops.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        *,
        init_model: nn.Module | None = None,
        device: str | torch.device | None = "auto",
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        _batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.device = resolve_device(device)
        self.model = copy.deepcopy(model).to(self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.dtype = model_dtype(self.model)
        self.init_model = None
        if init_model is not None:
            self.init_model = copy.deepcopy(init_model).to(self.device).eval()
            _check_same_architecture(self.model, self.init_model)
        self.seed = int(seed)
        self.batch_size = batch_size
        self.progress = bool(progress)
        if _batches is None:
            _batches = [
                (x.to(self.device, self.dtype), y.to(self.device).long().view(-1))
                for x, y in iter_batches(data, batch_size)
                if x.shape[0] > 0
            ]
        self.batches = _batches
        self.n_samples = sum(int(y.shape[0]) for _, y in self.batches)
        if self.n_samples == 0:
            raise ValueError("data is empty: no samples to measure on")
        self._cache: dict[Any, Any] = {}
        self._seconds: dict[Any, float] = {}
        self._subsets: dict[int, Context] = {}
        self._used: dict[Any, float] | None = None
        self._computed: set[Any] = set()
        self.fold = None  # the FoldResult of a context made by folded(), else None

    # ------------------------------------------------------------------ parameters and data

    def named_params(self, model: nn.Module | None = None) -> list[tuple[str, nn.Parameter]]:
        """The parameters that measures perturb or differentiate (all that require grad)."""
        return [(n, p) for n, p in (model or self.model).named_parameters() if p.requires_grad]

    def params(self, model: nn.Module | None = None) -> list[nn.Parameter]:
        """The tensors of :meth:`named_params`, in the same order."""
        return [p for _, p in self.named_params(model)]

    @property
    def example_input(self) -> torch.Tensor:
        """The first two samples (a batch shape that any eval-mode model accepts)."""
        return self.batches[0][0][:2]

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with ``seed + offset`` (device-independent draws)."""
        g = torch.Generator()
        g.manual_seed(self.seed + int(offset))
        return g

    def randn_like_params(self, params: Sequence[torch.Tensor], gen: torch.Generator
                          ) -> list[torch.Tensor]:
        """Standard normal draws shaped like ``params``, drawn on the CPU, moved to the device."""
        return [
            torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
            for p in params
        ]

    def subset(self, max_samples: int | None) -> Context:
        """A child context on a seeded random subset of ``max_samples`` samples (or self).

        The subset is the same for every measure that asks for the same size, and it has its
        own cache, so a reference computed on it (the exact trace) matches the estimate.
        """
        if max_samples is None or int(max_samples) >= self.n_samples:
            return self
        n = int(max_samples)
        if n <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        if n not in self._subsets:
            idx = torch.randperm(self.n_samples, generator=self.generator(7919))[:n].sort().values
            X = torch.cat([x for x, _ in self.batches])[idx.to(self.device)]
            Y = torch.cat([y for _, y in self.batches])[idx.to(self.device)]
            bs = max(int(x.shape[0]) for x, _ in self.batches)
            child = Context.__new__(Context)
            child.__dict__.update(self.__dict__)
            child.batches = [(X[i:i + bs], Y[i:i + bs]) for i in range(0, n, bs)]
            child.n_samples = n
            child._cache, child._seconds, child._subsets = {}, {}, {}
            child._used, child._computed = None, set()
            child.fold = None
            child._parent = self
            self._subsets[n] = child
        return self._subsets[n]

    # ------------------------------------------------------------------ shared computations

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """Compute ``compute()`` once per context and remember how long it took.

        The measure that asks for it is charged its seconds even when another measure computed
        it first (see :meth:`begin` / :meth:`end`), so reported costs are stand-alone costs.
        """
        root = self._root()
        if key not in self._cache:
            start = self.tic()
            self._cache[key] = compute()
            self._seconds[key] = self.toc(start)
            root._computed.add((id(self), key))
        if root._used is not None:
            root._used[(id(self), key)] = self._seconds[key]
        return self._cache[key]

    def _root(self) -> Context:
        ctx = self
        while getattr(ctx, "_parent", None) is not None:
            ctx = ctx._parent
        return ctx

    def folded(self) -> Context:
        """A context on the same data measuring the model with eval BatchNorm folded into the
        convs (:func:`convflat.measures.fold.fold_batchnorm`), and the initial model folded the
        same way; ``self`` when the model has no conv -> BatchNorm pair.

        The folded context is made once per context (shared result "fold_bn") and has its own
        cache, so shared work on the folded model (the PAC-Bayes sigma search, the spectral
        norms) is done once for every measure that asks for it. Its ``fold`` attribute holds
        the :class:`~convflat.measures.fold.FoldResult` (pairs folded, BatchNorms kept).
        """
        if self.fold is not None:
            return self
        return self.shared("fold_bn", self._make_folded)

    def _make_folded(self) -> Context:
        from convflat.measures.fold import fold_batchnorm

        res = fold_batchnorm(self.model, self.example_input)
        if not res.pairs:
            return self
        child = Context.__new__(Context)
        child.__dict__.update(self.__dict__)
        child.model = res.model
        child.fold = res
        if self.init_model is not None:
            init = fold_batchnorm(self.init_model)
            if init.pairs != res.pairs:
                raise ValueError("the initial model's conv -> BatchNorm pairs differ from the "
                                 f"model's: {init.pairs} against {res.pairs}")
            child.init_model = init.model
        child._cache, child._seconds, child._subsets = {}, {}, {}
        child._used, child._computed = None, set()
        child._parent = self
        return child

    def begin(self) -> None:
        """Start recording which shared results the next measure uses (see :meth:`end`)."""
        self._used, self._computed = {}, set()

    def end(self) -> tuple[float, dict[str, float]]:
        """Seconds of shared results used but computed before this measure, and their names."""
        used, computed = self._used or {}, self._computed
        self._used, self._computed = None, set()
        earlier = sum(s for k, s in used.items() if k not in computed)
        return earlier, {str(k[1]): round(s, 6) for k, s in used.items()}

    def tic(self) -> float:
        """A timer start (synchronises CUDA first, so pending kernels are not missed)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def toc(self, start: float) -> float:
        """Seconds since ``start`` from :meth:`tic` (synchronising CUDA first)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ loss passes

    @torch.no_grad()
    def loss_accuracy(self) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the model's current weights over the data."""
        total, correct = 0.0, 0
        for x, y in self.batches:
            z = self.model(x)
            total += float(F.cross_entropy(z, y, reduction="sum").double())
            correct += int((z.argmax(1) == y).sum())
        return total / self.n_samples, correct / self.n_samples

    @torch.no_grad()
    def accuracy(self) -> float:
        """Training accuracy of the model's current weights over the data."""
        correct = 0
        for x, y in self.batches:
            correct += int((self.model(x).argmax(1) == y).sum())
        return correct / self.n_samples

    def loss_and_grad(self, params: Sequence[nn.Parameter]) -> tuple[float, list[torch.Tensor]]:
        """Mean cross-entropy and its gradient in ``params`` (streamed over batches)."""
        grads = [torch.zeros_like(p) for p in params]
        total = 0.0
        for x, y in self.batches:
            loss = F.cross_entropy(self.model(x), y, reduction="sum")
            gs = torch.autograd.grad(loss, params)
            for acc, g in zip(grads, gs, strict=True):
                acc.add_(g)
            total += float(loss.detach().double())
        n = self.n_samples
        return total / n, [g / n for g in grads]

    def baseline(self) -> dict[str, Any]:
        """Loss, accuracy and per-sample margins of the unperturbed model (shared)."""

        def compute() -> dict[str, Any]:
            margins, total, correct = [], 0.0, 0
            with torch.no_grad():
                for x, y in self.batches:
                    z = self.model(x).double()
                    total += float(F.cross_entropy(z, y, reduction="sum"))
                    correct += int((z.argmax(1) == y).sum())
                    true = z.gather(1, y.view(-1, 1)).squeeze(1)
                    other = z.scatter(1, y.view(-1, 1), float("-inf")).max(1).values
                    margins.append((true - other).cpu())
            return {
                "loss": total / self.n_samples,
                "accuracy": correct / self.n_samples,
                "margins": torch.cat(margins),
            }

        return self.shared("baseline", compute)

    def head(self):
        """The conv that feeds GAP and its classifier (:func:`convflat.curvature.find_head`)."""
        from convflat.curvature import find_head

        return self.shared("head", lambda: find_head(self.model, self.example_input))

    def exact(self):
        """:func:`convflat.curvature.exact_curvature` on this context's data (shared)."""
        from convflat.curvature import exact_curvature

        return self.shared(
            "exact_curvature",
            lambda: exact_curvature(
                self.model, self.batches, device=self.device, progress=self.progress
            ),
        )


def _check_same_architecture(model: nn.Module, init: nn.Module) -> None:
    a = {n: p.shape for n, p in model.named_parameters()}
    b = {n: p.shape for n, p in init.named_parameters()}
    for name, shape in a.items():
        if name not in b:
            raise ValueError(f"init model has no parameter '{name}'")
        if b[name] != shape:
            raise ValueError(
                f"init model parameter '{name}' has shape {tuple(b[name])}, "
                f"the model's has {tuple(shape)}"
            )
