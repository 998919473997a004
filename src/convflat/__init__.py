"""convflat: exact flatness of the convolution that feeds global average pooling.

The closed-form Hessian trace, filter-by-filter block traces and conv-layer relative
flatness of arXiv 2603.09016, with the baselines and the statistics that judge them.
"""

__version__ = "0.1.0"

__all__ = ["CurvatureResult", "FlatnessCallback", "__version__", "exact_curvature",
           "find_head"]


def __getattr__(name: str):
    # Lazy: `import convflat.analysis` (pandas only) should not pay for importing torch.
    if name in ("CurvatureResult", "exact_curvature", "find_head"):
        from convflat import curvature

        return getattr(curvature, name)
    if name == "FlatnessCallback":
        from convflat.callbacks import FlatnessCallback

        return FlatnessCallback
    if name == "FlatnessLightningCallback":  # needs the optional extra `lightning`
        from convflat.lightning import FlatnessLightningCallback

        return FlatnessLightningCallback
    raise AttributeError(f"module 'convflat' has no attribute {name!r}")
