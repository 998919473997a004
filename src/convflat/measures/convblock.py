r"""Exact spectral measures of the last conv's Hessian block: top eigenvalue, Frobenius norm.

Notation of docs/math.md Eq. (2) (per sample n: softmax p_n, :math:`A_n = \mathrm{diag}(p_n) -
p_n p_n^\top`, classifier V (K x C), :math:`M_n = V^\top A_n V`, :math:`q_n = V^\top(p_n -
e_{y_n})`, :math:`J_{n,c} = \sum_p S_n[c,p] u_{n,p} \in R^d`, T_n the sigma'' table). The
kernel Hessian (Cd x Cd, blocks indexed by filters c, c') is

.. math::
   H_{c,c'} = \frac1N \sum_n M_n[c,c']\, J_{n,c} J_{n,c'}^\top
            + \delta_{cc'} \frac1N \sum_n q_n[c] \sum_p T_n[c,p]\, u_{n,p} u_{n,p}^\top .

Write :math:`B_n \in R^{Cd \times K}` for the Jacobian of the logits in the kernel,
:math:`(B_n)_{(c,\cdot),k} = V[k,c] J_{n,c}`. Then the first term is
:math:`\frac1N \sum_n B_n A_n B_n^\top`: a sum of N PSD terms of rank K-1 (A_n has rank K-1,
its null vector is the all-ones vector), so H has rank at most N(K-1) for piecewise-linear
heads (ReLU; ``Head.piecewise_linear``), where the second (sigma'') term vanishes. Methods, all
exact (no sampling):

* ``"lanczos"`` (top eigenvalue): scipy ``eigsh`` (ARPACK) with an exact matrix-free product
  from cached per-sample factors, :math:`Hv = \frac1N\sum_n B_n A_n (B_n^\top v)` +
  sigma'' term (:class:`ConvFactors`): either the Jacobians J (O(N C d) memory and work per
  product) or the patches and S (O(N (G P d + C P)) memory, O(N P C d) work in GEMMs),
  whichever is smaller; the product is memory-bound, and P is small at the last conv.
  Converges to ``tol`` (1e-10): exact to solver precision.
* ``"dense"``: H itself, accumulated over batches as
  :math:`\sum_c \mathrm{rows}_c \mathrel{+}= J_{:,c}^\top (M_{:,c,:} \odot J)`, O(N (Cd)^2)
  time and O((Cd)^2) memory; then ``eigvalsh`` / the Frobenius norm. For Cd <= ``dense_max``.
* ``"gram"`` (piecewise-linear heads): with the explicit square root
  :math:`R_n = \mathrm{diag}(\sqrt{p_n}) - p_n \sqrt{p_n}^\top` (:math:`R_n R_n^\top = A_n`,
  because :math:`\sum_k p_{nk} = 1`), :math:`H = ZZ^\top` with
  :math:`Z = [B_n R_n]_n / \sqrt N` of size Cd x NK. The nonzero eigenvalues of H are those
  of the NK x NK Gram matrix :math:`Z^\top Z`, whose entries are
  :math:`\frac1N \sum_c L_n[c,k] L_m[c,l] \langle J_{n,c}, J_{m,c}\rangle` with
  :math:`L_n = V^\top R_n`; and :math:`\|H\|_F = \|Z^\top Z\|_F`. For NK <= ``dense_max``.
* ``"gram_trace"`` (Frobenius, piecewise-linear heads):
  :math:`\|H\|_F^2 = \mathrm{tr}(H^2) = \frac1{N^2} \sum_{n,m}
  \mathrm{tr}(A_n Y_{nm} A_m Y_{nm})` with the K x K matrices
  :math:`Y_{nm} = B_n^\top B_m = \sum_c \Gamma_c[n,m]\, v_c v_c^\top`,
  :math:`\Gamma_c[n,m] = \langle J_{n,c}, J_{m,c}\rangle`, :math:`v_c` column c of V:
  O(N^2 C (d + K^2)) time in GEMMs, streamed over row blocks, no NK x NK matrix.
* ``"hvp"``: curvlinops' Hessian operator restricted to the kernel: ``eigsh`` for the top
  eigenvalue, the product with every basis vector for the Frobenius norm (Cd products; only
  for Cd <= ``hvp_max``). The fallback when the per-sample factors do not fit in memory.

``"auto"`` picks the cheapest applicable method and the result records it in ``params``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convflat.measures.base import Param, register
from convflat.measures.context import Context

__all__ = ["ConvFactors", "conv_factors"]


class FactorsTooLarge(MemoryError):
    """The per-sample factors would exceed the memory budget (``max_entries``)."""


@dataclass
class ConvFactors:
    """Per-sample factors of the conv Hessian block (float64, on the measurement device).

    Two storage forms, whichever is smaller (the matrix-free product is memory-bound):

    * ``"jacobian"``: ``J`` (C, N, d), filter-major so that every contraction over samples is
      one batched GEMM over filters without a copy (piecewise-linear heads only);
    * ``"patches"``: ``U`` (G, N P, d), the patches of each group of filters (sample-major,
      then position), with ``S`` (N, C, P) and, for smooth heads, ``W2`` (N, C, P) =
      q_n[c] T_n[c,p]. :math:`J_{n,c} = \\sum_p S_n[c,p]\\, u_{n,p}` is never formed: a
      product costs O(N P C d) in GEMMs against O(N C d) memory reads of J, and at the last
      conv P is small.

    ``probs`` (N, K) and ``V`` (K, C) in both.
    """

    probs: torch.Tensor
    V: torch.Tensor
    N: int
    C: int
    d: int
    P: int
    G: int
    J: torch.Tensor | None = None
    U: torch.Tensor | None = None
    S: torch.Tensor | None = None
    W2: torch.Tensor | None = None

    @property
    def form(self) -> str:
        """The cached form: "jacobian" (per-filter Jacobians) or "patches"."""
        return "jacobian" if self.J is not None else "patches"

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(N samples, C filters, d patch size, K classes)."""
        return self.N, self.C, self.d, self.V.shape[0]

    def M(self, sl: slice = slice(None)) -> torch.Tensor:
        """M_n = V^T diag(p_n) V - (V^T p_n)(V^T p_n)^T for the samples in ``sl``, (b, C, C)."""
        p, V = self.probs[sl], self.V
        Vp = p @ V
        return (V.T.unsqueeze(0) * p.unsqueeze(1)) @ V - Vp.unsqueeze(2) * Vp.unsqueeze(1)

    def _to_ncp(self, t: torch.Tensor) -> torch.Tensor:
        # (G, N P, C/G) -> (N, C, P)
        N, C, P, G = self.N, self.C, self.P, self.G
        return t.view(G, N, P, C // G).permute(1, 0, 3, 2).reshape(N, C, P)

    def _from_ncp(self, r: torch.Tensor) -> torch.Tensor:
        # (N, C, P) -> (G, N P, C/G)
        N, C, P, G = self.N, self.C, self.P, self.G
        return r.view(N, G, C // G, P).permute(1, 0, 3, 2).reshape(G, N * P, C // G)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for v of shape (C, d), exact: (1/N) sum_n B_n A_n B_n^T v (+ sigma'' term)."""
        N, C, d, G = self.N, self.C, self.d, self.G
        if self.J is not None:
            e = torch.bmm(self.J, v.unsqueeze(2)).squeeze(2).T  # (N, C): <J_{n,c}, v_c>
        else:
            # t[n,c,p] = <u_{n,p}, v_c> for the patches of c's group, one GEMM per group
            t = self._to_ncp(torch.bmm(self.U, v.view(G, C // G, d).transpose(1, 2)))
            e = (self.S * t).sum(2)
        z = e @ self.V.T  # (N, K): B_n^T v
        Az = self.probs * z - self.probs * (self.probs * z).sum(1, keepdim=True)
        w = Az @ self.V  # (N, C): M_n e_n
        if self.J is not None:
            out = torch.bmm(w.T.unsqueeze(1), self.J).squeeze(1)  # sum_n w[n,c] J_{n,c}
        else:
            r = w.unsqueeze(2) * self.S  # coefficient of u_{n,p} in row c
            if self.W2 is not None:
                r = r + self.W2 * t  # sigma'' term: q_n[c] T_n[c,p] u_{n,p} <u_{n,p}, v_c>
            out = torch.bmm(self._from_ncp(r).transpose(1, 2), self.U).reshape(C, d)
        return out / N

    def jacobians(self) -> torch.Tensor:
        """J (C, N, d), formed from the patches if needed."""
        if self.J is not None:
            return self.J
        N, C, d, P, G = self.N, self.C, self.d, self.P, self.G
        U = self.U.view(G, N, P, d)
        S = self.S.view(N, G, C // G, P)
        J = torch.empty(C, N, d, dtype=self.U.dtype, device=self.U.device)
        for g in range(G):
            # (N, C/G, P) @ (N, P, d) -> (N, C/G, d)
            J[g * (C // G):(g + 1) * (C // G)] = torch.bmm(S[:, g], U[g]).transpose(0, 1)
        return J


def _smooth(head) -> bool:
    """Whether the head may have sigma'' != 0 (unknown counts as smooth: always correct)."""
    return not getattr(head, "piecewise_linear", False)


def _batch_patches(hb) -> torch.Tensor:
    U = getattr(hb, "patches_grouped", None)  # (B, G, d, P) for grouped convs
    if U is None:
        U = hb.patches.transpose(1, 2).unsqueeze(1)  # (B, P, d) -> (B, 1, d, P)
    return U


def _factors_from_batch(hb, C: int) -> tuple[torch.Tensor, ...]:
    U = _batch_patches(hb)
    B, G, d, P = U.shape
    Sg = hb.S.view(B, G, C // G, P)
    J = (Sg @ U.transpose(2, 3)).reshape(B, C, d)  # J_{n,c} = sum_p S[c,p] u^{group(c)}_p
    return U, J


def conv_factors(ctx: Context, max_entries: float) -> ConvFactors:
    """Collect :class:`ConvFactors` over ``ctx``'s data with ``head_batch`` (shared).

    Raises :class:`FactorsTooLarge` before allocating more than ``max_entries`` float64s.
    """
    key = ("conv_factors", float(max_entries))

    def compute() -> ConvFactors:
        from convflat.curvature import head_batch

        head = ctx.head()
        smooth = _smooth(head)
        C = head.conv.out_channels
        parts: dict[str, list[torch.Tensor]] = {"J": [], "U": [], "S": [], "W2": [], "p": []}
        form, V, dims = None, None, None
        for x, y in ctx.batches:
            hb = head_batch(ctx.model, head, x, y, dtype=torch.float64)
            U = _batch_patches(hb)
            B, G, d, P = U.shape
            if form is None:
                per_jac = C * d
                per_patch = G * P * d + C * P * (2 if smooth else 1)
                form = "patches" if smooth or per_patch < per_jac else "jacobian"
                per = per_patch if form == "patches" else per_jac
                if per * ctx.n_samples > max_entries:
                    raise FactorsTooLarge(
                        f"per-sample factors need {per * ctx.n_samples:.3g} float64 entries "
                        f"> max_entries={max_entries:.3g}"
                    )
                dims = (C, d, P, G)
            V = hb.V.to(torch.float64)
            parts["p"].append(hb.probs)
            if form == "jacobian":
                parts["J"].append(_factors_from_batch(hb, C)[1].transpose(0, 1))
                continue
            parts["U"].append(U.permute(1, 0, 3, 2).reshape(G, B * P, d))
            parts["S"].append(hb.S)
            if smooth:
                q = (hb.probs - F.one_hot(hb.labels, V.shape[0]).to(hb.probs.dtype)) @ V
                parts["W2"].append(q.unsqueeze(2) * hb.T)
        C, d, P, G = dims
        cat = {k: (torch.cat(v, dim=1 if k in ("J", "U") else 0) if v else None)
               for k, v in parts.items()}
        return ConvFactors(probs=cat["p"], V=V, N=ctx.n_samples, C=C, d=d, P=P, G=G,
                           J=cat["J"], U=cat["U"], S=cat["S"], W2=cat["W2"])

    return ctx.shared(key, compute)


def _dense_block(ctx: Context) -> torch.Tensor:
    """The kernel Hessian H (Cd x Cd, float64), streamed over batches (shared)."""

    def compute() -> torch.Tensor:
        from convflat.curvature import head_batch

        head = ctx.head()
        C = head.conv.out_channels
        H = None
        for x, y in ctx.batches:
            hb = head_batch(ctx.model, head, x, y, dtype=torch.float64)
            U, J = _factors_from_batch(hb, C)
            B, G, d, P = U.shape
            if H is None:
                H = torch.zeros(C * d, C * d, dtype=torch.float64, device=J.device)
            M = ConvFactors(probs=hb.probs, V=hb.V, N=B, C=C, d=d, P=P, G=G).M()
            for c in range(C):
                # rows of filter c: sum_n sum_c' M_n[c,c'] J_{n,c} J_{n,c'}^T
                H[c * d:(c + 1) * d] += J[:, c, :].T @ (M[:, c, :, None] * J).reshape(B, C * d)
            if _smooth(head):
                q = (hb.probs - F.one_hot(hb.labels, hb.V.shape[0]).to(hb.probs.dtype)) @ hb.V
                w = q.unsqueeze(2) * hb.T  # (B, C, P)
                for c in range(C):
                    Ug = U[:, c // (C // G)]  # (B, d, P)
                    H[c * d:(c + 1) * d, c * d:(c + 1) * d] += torch.einsum(
                        "bdp,bp,bep->de", Ug, w[:, c], Ug)
        H /= ctx.n_samples
        return 0.5 * (H + H.T)

    return ctx.shared("conv_dense_hessian", compute)


def _gram(f: ConvFactors) -> torch.Tensor:
    """The NK x NK Gram matrix Z^T Z of the piecewise-linear block (see module docstring)."""
    N, C, _d, K = f.shape
    sp = f.probs.sqrt()
    Vp = f.probs @ f.V  # (N, C)
    L = sp.unsqueeze(1) * (f.V.T.unsqueeze(0) - Vp.unsqueeze(2))  # (N, C, K) = V^T R_n
    G = torch.zeros(N, K, N, K, dtype=torch.float64, device=f.V.device)
    J = f.jacobians()
    for c in range(C):
        Gc = J[c] @ J[c].T  # (N, N)
        G += torch.einsum("nk,nm,ml->nkml", L[:, c], Gc, L[:, c])
    return G.reshape(N * K, N * K) / N


def _fro_gram_trace(f: ConvFactors, block_entries: float = 2e7) -> float:
    """||H||_F^2 = (1/N^2) sum_{n,m} tr(A_n Y_nm A_m Y_nm), Y_nm = B_n^T B_m (K x K).

    With Gamma_c[n,m] = <J_{n,c}, J_{m,c}>, Y_nm = sum_c Gamma_c[n,m] v_c v_c^T (v_c column c
    of V). Rows n are processed in blocks: Gamma by one batched GEMM over filters, Y by one
    GEMM with the C x K^2 table v_c v_c^T, A Y elementwise (A Y = p o (Y - p^T Y)).
    """
    N, C, _d, K = f.shape
    Jc = f.jacobians()  # (C, N, d)
    VV = (f.V.T.unsqueeze(2) * f.V.T.unsqueeze(1)).reshape(C, K * K)  # v_c v_c^T, (C, K^2)
    p = f.probs
    rows = max(1, int(block_entries // max(1, N * max(C, K * K))))
    total = torch.zeros((), dtype=torch.float64, device=f.V.device)
    for a0 in range(0, N, rows):
        a = slice(a0, min(N, a0 + rows))
        G = torch.bmm(Jc[:, a], Jc.transpose(1, 2))  # (C, b, N)
        b = G.shape[1]
        Y = (G.permute(1, 2, 0).reshape(b * N, C) @ VV).view(b, N, K, K)
        pn = p[a].view(b, 1, K, 1)
        pm = p.view(1, N, K, 1)
        X = pn * (Y - (pn * Y).sum(2, keepdim=True))  # A_n Y_nm
        Z = pm * (Y - (pm * Y).sum(2, keepdim=True))  # A_m Y_nm
        total += (X * Z.transpose(2, 3)).sum()
    return float(total) / N**2


def _geometry(ctx: Context) -> dict[str, int]:
    """C filters, patch size d, P output positions, G groups, K classes of the head (shared)."""

    def compute() -> dict[str, int]:
        head = ctx.head()
        shapes = []
        hook = head.conv.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
        try:
            with torch.no_grad():
                ctx.model(ctx.example_input[:1])
        finally:
            hook.remove()
        conv = head.conv
        return {"C": conv.out_channels, "d": conv.weight[0].numel(),
                "P": int(shapes[0][2] * shapes[0][3]), "G": conv.groups,
                "K": head.linear.out_features}

    return ctx.shared("conv_geometry", compute)


def _auto_method(ctx: Context, what: str, dense_max: int, max_entries: float) -> str:
    """The cheapest exact method that fits the memory budget (see the module docstring)."""
    g = _geometry(ctx)
    C, d, P, G, K, N = g["C"], g["d"], g["P"], g["G"], g["K"], ctx.n_samples
    smooth = _smooth(ctx.head())
    per = min(C * d, G * P * d + 2 * C * P) if not smooth else G * P * d + 2 * C * P
    if what == "top":
        return "lanczos" if N * per <= max_entries else "hvp"
    if smooth:
        return "dense" if C * d <= dense_max else "hvp"
    options = {}
    if C * d <= dense_max:
        options["dense"] = N * (C * d) ** 2
    if N * C * d <= max_entries:  # gram_trace forms the Jacobians
        options["gram_trace"] = N * N * C * (d + K * K)
    return min(options, key=options.get) if options else "hvp"


# dense_max: largest Cd (dense H) or NK (Gram) formed; max_entries: budget of float64s for the
# per-sample factors (5e7 = 400 MB); hvp_max: most Hessian-vector products for "hvp"
_SIZES = {"dense_max": Param(4096, minimum=1), "max_entries": Param(5e7, above=0)}
_TOP = {"method": Param("auto", choices=("auto", "lanczos", "dense", "gram", "hvp")),
        "tol": Param(1e-10, above=0), **_SIZES}
_FRO = {"method": Param("auto", choices=("auto", "dense", "gram_trace", "gram", "hvp")),
        **_SIZES, "hvp_max": Param(4096, minimum=1)}


@register("conv_top_eigenvalue", defaults=dict(_TOP),
          source="exact; docs/math.md Eq. (5) (block structure); Keskar et al. 2017 (lambda_max)")
def conv_top_eigenvalue(ctx: Context, *, method: str, tol: float, dense_max: int,
                        max_entries: float) -> dict[str, Any]:
    r""":math:`\lambda_{\max}` of the Hessian block of the kernel of the conv that feeds GAP.

    ``method``: "lanczos" (exact matrix-free product from per-sample factors + ARPACK),
    "dense", "gram" (NK x NK Gram matrix, ReLU heads), "hvp" (curvlinops + ARPACK) or "auto"
    (lanczos when the factors fit in ``max_entries`` float64s, else hvp). See the module
    docstring for the formulas; ``params.method`` records the method used.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    head = ctx.head()
    used = _auto_method(ctx, "top", dense_max, max_entries) if method == "auto" else method
    C, d = head.conv.out_channels, head.conv.weight[0].numel()
    n = C * d
    if used == "lanczos":
        try:
            f = conv_factors(ctx, max_entries)
        except FactorsTooLarge:
            if method != "auto":
                raise
            used = "hvp"
    if used == "lanczos":
        def mv(v: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(v).reshape(C, d), device=f.V.device)
            return f.matvec(t).reshape(-1).cpu().numpy()

        op = LinearOperator((n, n), matvec=mv, dtype=np.float64)
        v0 = np.random.default_rng(ctx.seed).standard_normal(n)
        (lam,) = eigsh(op, k=1, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
        value = float(lam)
    elif used == "dense":
        if n > dense_max:
            raise ValueError(f"method='dense' needs C*d <= dense_max ({n} > {dense_max})")
        value = float(torch.linalg.eigvalsh(_dense_block(ctx))[-1])
    elif used == "gram":
        if _smooth(head):
            raise ValueError("method='gram' needs a piecewise-linear head (sigma'' = 0)")
        f = conv_factors(ctx, max_entries)
        N, _, _, K = f.shape
        if N * K > dense_max:
            raise ValueError(f"method='gram' needs N*K <= dense_max ({N * K} > {dense_max})")
        value = float(torch.linalg.eigvalsh(_gram(f))[-1])
    elif used == "hvp":
        from convflat.measures.hessian import hessian_operator, top_eigenvalue

        op = hessian_operator(ctx, [head.conv.weight])
        out = top_eigenvalue(op, method="eigsh", iterations=1000, tol=max(tol, 1e-8),
                             seed=ctx.seed, device=ctx.device)
        value = out["value"]
    else:
        raise ValueError(
            f"method must be 'auto', 'lanczos', 'dense', 'gram' or 'hvp', got {method!r}")
    return {"value": value, "params": {"method": used}, "layer": head.conv_name, "dim": n}


@register("conv_hessian_frobenius", defaults=dict(_FRO),
          source="exact; Granziol 2020 ('Flatness is a False Friend') studies ||H||_F")
def conv_hessian_frobenius(ctx: Context, *, method: str, dense_max: int, max_entries: float,
                           hvp_max: int) -> dict[str, Any]:
    r""":math:`\|H\|_F` of the Hessian block of the kernel of the conv that feeds GAP.

    ``method``: "dense" (H formed, O(N (Cd)^2)), "gram_trace" (:math:`\mathrm{tr}(H^2)` from
    per-sample Grams, O(N^2 C (d + K^2)), ReLU heads), "gram" (NK x NK Gram, ReLU heads),
    "hvp" (curvlinops products with all Cd basis vectors) or "auto" (the cheapest applicable;
    recorded in ``params.method``). All routes are direct (no iteration, no sampling).
    """
    head = ctx.head()
    C, d = head.conv.out_channels, head.conv.weight[0].numel()
    n = C * d
    used = _auto_method(ctx, "fro", dense_max, max_entries) if method == "auto" else method
    if used in ("gram", "gram_trace") and _smooth(head):
        raise ValueError(f"method='{used}' needs a piecewise-linear head (sigma'' = 0)")
    if used == "gram_trace":
        try:
            value = _fro_gram_trace(conv_factors(ctx, max_entries)) ** 0.5
        except FactorsTooLarge:
            if method != "auto":
                raise
            used = "dense" if n <= dense_max else "hvp"
    if used == "dense":
        if n > dense_max:
            raise ValueError(f"method='dense' needs C*d <= dense_max ({n} > {dense_max})")
        value = float(torch.linalg.matrix_norm(_dense_block(ctx)))
    elif used == "gram":
        f = conv_factors(ctx, max_entries)
        N, _, _, K = f.shape
        if N * K > dense_max:
            raise ValueError(f"method='gram' needs N*K <= dense_max ({N * K} > {dense_max})")
        value = float(torch.linalg.matrix_norm(_gram(f)))
    elif used == "hvp":
        if n > hvp_max:
            raise ValueError(
                f"method='hvp' needs C*d <= hvp_max ({n} > {hvp_max}): {n} Hessian-vector "
                "products over the data")
        from convflat.measures.hessian import hessian_operator

        op = hessian_operator(ctx, [head.conv.weight])
        total = 0.0
        for j0 in range(0, n, 64):
            E = torch.zeros(n, min(64, n - j0), dtype=op.dtype, device=op.device)
            E[j0:j0 + E.shape[1]] = torch.eye(E.shape[1], dtype=op.dtype, device=op.device)
            total += float((op @ E).double().pow(2).sum())
        value = total ** 0.5
    elif used != "gram_trace":
        raise ValueError(
            f"method must be 'auto', 'dense', 'gram_trace', 'gram' or 'hvp', got {method!r}")
    return {"value": value, "params": {"method": used}, "layer": head.conv_name, "dim": n}
