"""Dispatching ops: each picks the fastest backend that can run its inputs.

Layering: ops know nothing of model integrations; the math they must match is
in :mod:`dymu_kernels.reference`.
"""

from .dtome import dtome_merge
from .segment import segment_mean
from .vtu import vtu_attention, vtu_decode_attention

__all__ = ["dtome_merge", "segment_mean", "vtu_attention", "vtu_decode_attention"]
