r"""Patches and the patch Gram ``Q_n = U_n^T U_n`` of docs/math.md Eq. (4).

The patches ``u_{n,p}`` (im2col of the conv input ``X_n``) are what the direct route of
Eq. (8) contracts with ``S_n``; the Gram route needs only their Gram ``Q_n``. Two sources of
``Q_n`` share one interface (``cost``, ``numel``, ``prepare`` and a call), and
:meth:`~convflat.curvature.plan._Plan.gram` picks one per input size:

* :class:`_PhaseGram`: from the Grams of the input's stride phases (Eq. (14)); no im2col
  copy, and ``k_h k_w`` times fewer multiply-adds than ``U_n U_n^T`` at stride 1;
* :class:`_GatheredGram`: ``U_n U_n^T`` of the gathered patch rows.

Both return the same matrix up to rounding; which is cheaper is Eq. (15)'s ``gram_cost``.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from convflat.curvature.head import Head


class _Workspace(Protocol):
    """What the Grams need of :class:`convflat.curvature.plan._Workspace` (this module sits
    below plan: it names the interface, not the class)."""

    def get(self, name: str, shape: tuple[int, ...], zero: bool = False) -> torch.Tensor: ...


class _Plan(Protocol):
    """What :class:`_GatheredGram` needs of :class:`convflat.curvature.plan._Plan`."""

    head: Head

    def patch_rows(self, X: torch.Tensor, ws: _Workspace) -> torch.Tensor: ...


def _conv_pads(conv: nn.Conv2d) -> tuple[tuple[int, int, int, int], tuple | None,
                                         tuple[int, int]]:
    """The conv's padding as ``(pads, explicit_pad, padding)``: ``pads`` (left, right, top,
    bottom) as ``F.pad`` takes them; ``explicit_pad`` ``(pads, mode)`` to apply with
    ``F.pad`` before gathering patches, for "same"/"valid" and non-zero modes (the gather
    only knows symmetric zero padding), else None; ``padding`` (h, w) what is left for the
    gather to add as zeros."""
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
    explicit_pad = None
    padding = conv.padding if not isinstance(conv.padding, str) else (0, 0)
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        explicit_pad = (pads, mode)
        padding = (0, 0)
    return pads, explicit_pad, padding


def _patch_rows(X: torch.Tensor, conv: nn.Conv2d, padding: tuple[int, int],
                explicit_pad: tuple | None, ws: _Workspace) -> torch.Tensor:
    """Patches as rows, ``Ut`` (b, groups, P, d), in the workspace's dtype, written into
    ``ws``; ``padding`` and ``explicit_pad`` as :func:`_conv_pads` gives them.

    The order within a patch is (kh, kw, C_in), not that of ``W.view(C, -1)``: every
    contraction sums over the patch entries, so their order does not matter, and gathering
    from a channels-last copy of X moves whole runs of channels instead of single entries.
    """
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    b, Cin, H, W = X.shape
    if explicit_pad is not None:
        pads, mode = explicit_pad
        X = F.pad(X, pads, mode=mode)
        Xc = ws.get("X", (b, X.shape[2], X.shape[3], Cin))
        Xc.copy_(X.permute(0, 2, 3, 1))
    else:  # zero padding: the borders of the buffer are zero once and never written
        ph, pw = padding
        Xc = ws.get("X", (b, H + 2 * ph, W + 2 * pw, Cin), zero=True)
        Xc[:, ph:ph + H, pw:pw + W].copy_(X.permute(0, 2, 3, 1))
    V = Xc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)
    V = V[..., ::dh, ::dw]  # (b, Ho, Wo, C_in, kh, kw)
    Ho, Wo, G = V.shape[1], V.shape[2], conv.groups
    V = V.unflatten(3, (G, Cin // G)).permute(0, 3, 1, 2, 5, 6, 4)
    Ut = ws.get("U", (b, G, Ho, Wo, kh, kw, Cin // G))
    Ut.copy_(V)
    return Ut.view(b, G, Ho * Wo, -1)


def _patches(X: torch.Tensor, kernel, padding, stride, dilation,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """im2col: (B, C_in*kh*kw, Ho*Wo), ordered like ``W.view(C, -1)`` (as ``F.unfold``).

    Built from strided views (``Tensor.unfold``) and one copy that also converts to
    ``dtype``: ``F.unfold``'s own im2col kernel is far slower on CPU, in float64 above all,
    and converting after the copy would cost a second pass over the largest array.
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
        """X unchanged: the gather pads as it goes."""
        return X

    def __call__(self, X: torch.Tensor, ws: _Workspace) -> torch.Tensor:
        """``Q`` (b, P, P) in the workspace's dtype."""
        U0 = self.plan.patch_rows(X, ws)[:, 0]  # (b, P, d)
        return torch.matmul(U0, U0.transpose(1, 2), out=ws.get("Q", (U0.shape[0], self.P,
                                                                      self.P)))


def _phase_axis(phase: int, s: int, pad: int, n_in: int, n_out: int, shifts: list[int]
                ) -> tuple[int, int, list[tuple[int, int, int] | None]]:
    """One axis of one stride phase: the real input indices of the phase (start, count) and,
    per shift, the output range it reaches and the offset into the phase's Gram (None when
    the range is empty)."""
    start = (phase - pad) % s
    count = max(0, -(-(n_in - start) // s))
    t0 = (start + pad) // s  # index of the first real row or column in the phase grid
    ranges: list[tuple[int, int, int] | None] = []
    for alpha in shifts:
        lo, hi = max(0, t0 - alpha), min(n_out, count + t0 - alpha)
        ranges.append((lo, hi, lo + alpha - t0) if lo < hi else None)
    return start, count, ranges


class _PhaseGram:
    r"""The patch Gram ``Q_n[p,p'] = <u_{n,p}, u_{n,p'}>`` from Grams of the input itself
    (docs/math.md Eq. (14)).

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

    def __init__(self, kernel, stride, dilation, pads_tl, in_hw: tuple[int, int],
                 out_hw: tuple[int, int], pad_first: tuple | None = None):
        (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
        (H, W), (Ho, Wo) = in_hw, out_hw
        top, left = pads_tl
        self.Ho, self.Wo = Ho, Wo
        self.pad_first = pad_first  # (pads, mode) applied to X by prepare(), or None
        rows: dict[int, list[int]] = {}  # phase -> shifts floor(d a / s)
        cols: dict[int, list[int]] = {}
        for a in range(kh):
            rows.setdefault(dh * a % sh, []).append(dh * a // sh)
        for b in range(kw):
            cols.setdefault(dw * b % sw, []).append(dw * b // sw)
        # one entry per stride phase: (row start, rows, col start, cols, [(row range, col
        # range)] for each kernel offset of the phase that reaches the output)
        self.phases: list[tuple[tuple[int, int, int], tuple[int, int, int], list[Any]]] = []
        for ph, ashifts in rows.items():
            r0, nr, rr = _phase_axis(ph, sh, top, H, Ho, ashifts)
            for pw, bshifts in cols.items():
                c0, nc, cr = _phase_axis(pw, sw, left, W, Wo, bshifts)
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
