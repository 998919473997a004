"""Baseline flatness and generalization measures, next to the exact ones of the core.

Floor 1: imports only :mod:`convflat.io` and :mod:`convflat.curvature`. Every measure is a
function of (model, training data[, initial model]), registered by name in :data:`MEASURES`
with its default parameters, its source, and what theory predicts under function-preserving
filter rescaling. :func:`compute_measures` runs a set of them on one model (a failing measure is
recorded, the others still run) and :func:`write_measures_json` writes the artifact.
``docs/measures.md`` lists every measure with its formula, defaults and cost.

Modules: :mod:`~convflat.measures.hessian` (Hutchinson / Hutch++ traces, top eigenvalue,
ours), :mod:`~convflat.measures.convblock` (exact top eigenvalue and Frobenius norm of the conv
block), :mod:`~convflat.measures.fisher_rao`, :mod:`~convflat.measures.pacbayes`,
:mod:`~convflat.measures.sharpness`, :mod:`~convflat.measures.norms`, and
:mod:`~convflat.measures.validation` (invariance, estimator convergence and cost tables).
"""

from convflat.measures.base import Measure, register
from convflat.measures.context import Context
from convflat.measures.registry import (
    DEFAULT_MEASURES,
    MEASURES,
    MEASURES_FORMAT,
    compute_measures,
    resolve_names,
    write_measures_json,
)
from convflat.measures.validation import (
    cost_table,
    hutchinson_convergence,
    invariance_table,
    rescale_filters,
)

__all__ = [
    "DEFAULT_MEASURES",
    "MEASURES",
    "MEASURES_FORMAT",
    "Context",
    "Measure",
    "compute_measures",
    "cost_table",
    "hutchinson_convergence",
    "invariance_table",
    "register",
    "rescale_filters",
    "resolve_names",
    "write_measures_json",
]
