r"""Contractions: from the per-sample quantities to the block traces of docs/math.md Eq. (6).

Per sample ``n`` the block traces need ``<J_{n,c}, J_{n,c'}>`` for all filter pairs, which
two routes form (Eq. (8)):

* the *Gram route*: ``JJ_n = S_n Q_n S_n^T`` from the patch Gram ``Q_n`` of Eq. (4)
  (:func:`_gram_products`);
* the *direct route*: ``J_n = S_n U_n^T`` (Eq. (4)), then ``JJ_n = J_n J_n^T``
  (:func:`_direct_products`); grouped convs always take it.

Their multiply-adds per sample are Eq. (15) (:func:`_route_costs`). The Gauss-Newton part of
Eq. (6), ``sum_n M_n o JJ_n`` with ``M_n`` of Eq. (2), is streamed over chunks of samples by
:class:`_GaussNewtonSum`; the sigma'' part, ``q_n[c] sum_p T_n[c,p] Q_n[p,p]`` on the
diagonal blocks only, by :func:`_sigma2_term`. Chunks are sized by
:func:`_samples_per_chunk`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from convflat.curvature.plan import _Workspace


def _route_costs(C: int, P: int, d: int, gram_cost: int) -> dict[str, int]:
    """Multiply-adds per sample for the block traces (docs/math.md Eq. (15)); ``gram_cost``
    is what the patch Gram costs (``P^2 d`` from gathered patches, less from the input's
    phases)."""
    return {"direct": C * P * d + C * C * d, "gram": gram_cost + C * P * P + C * C * P}


def _gram_products(Q: torch.Tensor, S: torch.Tensor, ws: _Workspace
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram route for a chunk: ``SQ = S_n Q_n`` (b, C, P), so that ``JJ_n = SQ_n S_n^T``,
    and the patch norms ``diag Q_n`` as (b, 1, P)."""
    SQ = torch.matmul(S, Q, out=ws.get("SQ", S.shape))  # (b, C, P)
    return SQ, Q.diagonal(dim1=1, dim2=2).unsqueeze(1)


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


def _sigma2_term(T: torch.Tensor, diagQ: torch.Tensor, p: torch.Tensor, y: torch.Tensor,
                 V: torch.Tensor) -> torch.Tensor:
    """The sigma'' part of the diagonal blocks of docs/math.md Eq. (6) for a chunk, summed
    over its samples: ``sum_n q_n[c] sum_p T_n[c,p] Q_n[p,p]`` with ``q_n = V^T r_n``
    (Eq. (2)); ``diagQ`` (b, G, P) the patch norms of each group."""
    _, C, P = T.shape
    K, G = V.shape[0], diagQ.shape[1]
    q = (p - F.one_hot(y, K).to(p.dtype)) @ V  # (b, C) = V^T r_n
    tq = (T.view(-1, G, C // G, P) * diagQ.unsqueeze(2)).sum(-1).reshape(-1, C)
    return (q * tq).sum(0)


class _GaussNewtonSum:
    """``sum_n M_n o JJ_n`` (docs/math.md Eqs. (5), (8)) with
    ``M_n = V^T diag(p_n) V - m_n m_n^T``, ``m_n = V^T p_n`` and ``JJ_n = A_n B_n^T`` (Gram
    route: ``A = S Q``, ``B = S``; direct route: ``A = B = J``), streamed over chunks of
    samples; :meth:`total` returns the (C, C) float64 sum.

    Every term is symmetric in (c, c'), so only the upper triangle is formed, in tiles of rows:
    tile ``r0:r1`` holds ``JJ[:, r0:r1, r0:] = A[:, r0:r1] B[:, r0:]^T`` (b, r, C - r0). With T
    tiles that is (T + 1) / 2T of the square (5/8 for four), and a tile is small enough to stay
    in cache while it is consumed (``tile_bytes``): the whole (b, C, C) array would go to
    memory and back once per chunk, which would make the class sum below as slow as a memory
    copy of it. :meth:`total` mirrors the triangle.

    First part, ``sum_k (v_k v_k^T) o [sum_n p_nk JJ_n]``: per tile, the bracket is one GEMM
    ``p^T (K x b) @ JJ-tile (b x r (C - r0))``, accumulated over the whole measurement in a
    buffer of K entries per upper-triangle entry (tile by tile) and scaled by ``v_k v_k^T``
    once at the end. Where that buffer would exceed ``class_sum_max_bytes`` (ImageNet heads:
    1000 classes x 512^2), each tile's product is scaled at once, classes chunked to
    ``chunk_bytes``.

    Second part, ``sum_n (m_n m_n^T) o JJ_n = sum_n (D_n S_n Q_n)(D_n S_n)^T``: either on each
    tile (two scalings and a sum over samples, in cache), or on the Gram route as GEMMs whose
    inner dimension runs over samples and positions (C^2 P per sample, compute-bound, tile by
    tile on the same triangle), whichever the shape makes cheaper (``outer_gemm``).
    """

    def __init__(self, V: torch.Tensor, acc: torch.dtype, ws: _Workspace, chunk_bytes: int,
                 outer_gemm: bool, tile_bytes: int | None = None, min_tiles: int = 4,
                 class_sum_max_bytes: int = 256 * 2**20):
        C = V.shape[1]
        self.V, self.ws, self.chunk_bytes, self.outer_gemm = V, ws, chunk_bytes, outer_gemm
        self.tile_bytes = tile_bytes  # None: only the min_tiles tiles (GPUs: few launches)
        self.min_tiles = min_tiles
        self.class_sum_max_bytes = class_sum_max_bytes
        self.acc = acc
        self.BT = torch.zeros(C, C, dtype=acc, device=V.device)
        self.R: torch.Tensor | None = None
        self.tiles: list[tuple[int, int, int]] = []  # (r0, r1, offset in R), fixed at chunk 0

    def _make_tiles(self, b: int, C: int, esize: int) -> None:
        # at least min_tiles tiles (the triangle's saving); on CPU rows that fit tile_bytes
        rows = -(-C // self.min_tiles)
        if self.tile_bytes is not None:
            rows = min(rows, max(1, self.tile_bytes // max(1, b * C * esize)))
        K = self.V.shape[0]
        off = 0
        for r0 in range(0, C, rows):
            r1 = min(C, r0 + rows)
            self.tiles.append((r0, r1, off))
            off += K * (r1 - r0) * (C - r0)
        if off * self.acc.itemsize <= self.class_sum_max_bytes:
            self.R = torch.zeros(off, dtype=self.acc, device=self.V.device)

    def add(self, A: torch.Tensor, B: torch.Tensor, p: torch.Tensor, S: torch.Tensor,
            SQ: torch.Tensor | None) -> None:
        """One chunk: ``JJ_n = A_n B_n^T`` with ``A``, ``B`` (b, C, e); ``S``, ``SQ``
        (b, C, P) for the outer GEMM on the Gram route (None on the direct route)."""
        b, C, _ = A.shape
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
            self._class_sum(JJ.view(b, r * w), p, r0, r1, off)
            if in_tiles:
                JJ.mul_(m[:, r0:r1].unsqueeze(2)).mul_(m[:, r0:].unsqueeze(1))
                self.BT[r0:r1, r0:] -= JJ.sum(0).to(self.BT.dtype)
            else:
                self.BT[r0:r1, r0:] -= (L[r0:r1] @ Rt[r0:].T).to(self.BT.dtype)

    def _class_sum(self, flat: torch.Tensor, p: torch.Tensor, r0: int, r1: int, off: int
                   ) -> None:
        """``sum_n p_nk JJ_n`` of one tile (``flat``: (b, r w)), into the accumulator ``R``
        or, without one, scaled by ``v_k v_k^T`` into ``BT`` at once."""
        K = p.shape[1]
        rw = flat.shape[1]
        if self.R is not None:
            Rk = self.R[off:off + K * rw].view(K, rw)
            if Rk.dtype == flat.dtype:
                torch.addmm(Rk, p.T, flat, out=Rk)
            else:
                Rk += (p.T @ flat).to(Rk.dtype)
            return
        per = self._classes_per_pass(rw, flat.element_size())
        for k0 in range(0, K, per):
            ks = slice(k0, min(K, k0 + per))
            R = self.ws.get("R", (per * rw,))[:(ks.stop - ks.start) * rw]
            torch.mm(p[:, ks].T, flat, out=R.view(-1, rw))
            self._add_scaled(R, self.V[ks], r0, r1)

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
        """The (C, C) sum over every sample added, both triangles."""
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


def _outer_by_gemm(C: int, P: int) -> bool:
    """Whether ``sum_n D_n JJ_n D_n`` is cheaper as one GEMM (C^2 P multiply-adds and two
    scaled copies of C P per sample) than in place on JJ (three memory passes over C^2 per
    sample), counting a GEMM multiply-add at 1/8 of a memory-bound element operation."""
    return C * C * P / 8 + 4 * C * P < 3 * C * C


def _samples_per_chunk(C: int, P: int, d: int, G: int, esize: int, chunk_bytes: int,
                       gram_entries: int | None) -> int:
    """Samples whose per-sample arrays (patches or the input's phases and their Grams, Q or
    J, S, T, JJ and the head's temporaries) fit in ``chunk_bytes``: small chunks stay in cache
    and reuse the allocator's memory, which keeps the memory-bound steps fast where whole
    batches would stream through main memory. ``gram_entries``: what the patch Gram's source
    takes per sample on the Gram route (None: direct route)."""
    per_sample = C * C + 8 * C * P
    if gram_entries is not None:
        per_sample += P * P + gram_entries
    else:
        per_sample += G * d * P + C * d
    return max(1, int(chunk_bytes // (esize * per_sample)))
