r"""Exact Hessian trace, block traces and relative flatness of the conv that feeds GAP.

Setting (docs/math.md gives the derivation and the equations cited here). For one sample
``n`` the network splits into a fixed trunk that produces the input map ``X_n`` of the chosen
convolution, the convolution itself, and a *head* that acts channel by channel and position
by position before a global average pool (GAP) and one linear classifier (Eq. (1))::

    X_n --conv(W, beta)--> a --(eval BN, residual add, sigma, ...)--> h --GAP--> g --(V, b)--> z

With patches ``u_{n,p}`` (im2col of ``X_n``), ``a_{n,c,p} = <w_c, u_{n,p}> + beta_c``. The
head being separable, the pooled feature ``g_{n,c}`` depends on the kernel only through its
own filter ``w_c``, and

* the softmax quantities ``p_n``, ``r_n``, ``A_n``, ``q_n = V^T r_n``, ``M_n = V^T A_n V``
  are those of Eq. (2);
* ``S_n = dg/da`` and ``T_n`` (the diagonal second derivatives) come out of one or two
  backward passes through the (tiny) head alone (Eq. (3));
* ``J_{n,c} = sum_p S_n[c,p] u_{n,p}`` is ``d g_{n,c} / d w_c``, and the patch Gram is
  ``Q_n = U_n^T U_n`` (Eq. (4));
* the Hessian block between filters ``c`` and ``c'`` of the mean cross-entropy (Eq. (5)) has
  the trace (Eq. (6))

  .. math::
     \mathrm{Tr}\,H_{c,c'} = \frac1N \sum_n \Big[ M_n[c,c'] (S_n Q_n S_n^\top)[c,c']
        + \delta_{cc'}\, q_n[c] \sum_p T_n[c,p]\, Q_n[p,p] \Big],

  using ``<J_{n,c}, J_{n,c'}> = (S_n Q_n S_n^T)[c,c']`` (Eq. (8)); ``Tr H`` is the sum of
  the diagonal blocks (Eq. (7));
* the conv-layer relative flatness is ``kappa = sum_{c,c'} <w_c, w_c'> Tr H_{c,c'}``
  (Eq. (9)), the trace of the Hessian in ``A`` of ``L(W (I + A))`` (Eq. (10)).

The second term of Eq. (6) is the ``sigma''`` part: zero almost everywhere for
piecewise-linear activations, kept for smooth ones, so the result is the exact Hessian trace
and not only its Gauss-Newton part. The patch Gram needs no patches: it is a sum of shifted
blocks of the Grams of the input's stride phases (Eq. (14)); the Gram or the direct route is
chosen by their costs (Eq. (15)). The classifier's own trace and relative flatness are
Eqs. (12), (13).

Nothing here is estimated: the numbers equal those of the dense autograd Hessian (tests check
this to 1e-9 in float64). The trunk runs once per batch without autograd; only the head after
the conv is differentiated; sums are accumulated in float64 and the data are streamed, so
peak memory does not grow with the number of samples.

Modules: :mod:`~convflat.curvature.head` (is the conv in the class: :func:`find_head`),
:mod:`~convflat.curvature.plan` (trunk and head of the model: :func:`head_batch`),
:mod:`~convflat.curvature.gram` (patches and patch Grams),
:mod:`~convflat.curvature.contract` (the routes' products and the sums of Eq. (6)),
:mod:`~convflat.curvature.driver` (:func:`exact_curvature`),
:mod:`~convflat.curvature.options` (:class:`CurvatureOptions`).
"""

from convflat.curvature.driver import (
    CurvatureResult,
    ZeroCurvatureWarning,
    classifier_curvature,
    exact_curvature,
)
from convflat.curvature.head import Head, OutOfClassError, find_head
from convflat.curvature.options import CurvatureOptions
from convflat.curvature.plan import HeadBatch, head_batch

__all__ = [
    "CurvatureOptions",
    "CurvatureResult",
    "Head",
    "HeadBatch",
    "OutOfClassError",
    "ZeroCurvatureWarning",
    "classifier_curvature",
    "exact_curvature",
    "find_head",
    "head_batch",
]
