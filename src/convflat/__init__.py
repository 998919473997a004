"""convflat: exact flatness of the convolution that feeds global average pooling.

The closed-form Hessian trace, filter-by-filter block traces and conv-layer relative
flatness of arXiv 2603.09016, with the baselines and the statistics that judge them.
"""

__version__ = "0.1.0"

from convflat.curvature import CurvatureResult, exact_curvature, find_head  # noqa: E402

__all__ = ["__version__", "CurvatureResult", "exact_curvature", "find_head"]
