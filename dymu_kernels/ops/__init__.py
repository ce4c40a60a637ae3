"""Dispatching ops: each picks the fastest backend that can run its inputs.

Layering: ops know nothing of model integrations; the math they must match is
in :mod:`dymu_kernels.reference`.
"""

from .segment import segment_mean

__all__ = ["segment_mean"]
