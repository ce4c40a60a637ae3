"""dymu_kernels: kernels for DyMU (arXiv 2504.17040) — dynamic token merging in
the vision encoder and virtual token unmerging in the language model.

Importing needs only torch. GPU kernels (Triton), the compiled extension
(``dymu_kernels._C``) and Hugging Face transformers are loaded when a feature
needs them, and a missing one is reported by that feature with what to do.

Public surface:

- :func:`dtome_merge` — one encoder block's threshold (or fixed-r) token merge
  (``backend="auto" | "cpp" | "torch"``).
- :func:`calibrate_thresholds`, :class:`Thresholds`, :func:`merge_schedule`,
  :func:`published_thresholds` — per-layer thresholds and their JSON file.
- :func:`vtu_attention`, :func:`vtu_decode_attention` — attention over the
  virtual full sequence from unique tokens (fused Triton kernel on CUDA;
  registered as ``torch.ops.dymu_kernels.vtu_attention``).
- :func:`segment_mean` — average positions back into unique tokens.
- :mod:`dymu_kernels.reference` — the plain-PyTorch spec of every op.
- :mod:`dymu_kernels.models` — a small DToMe ViT used by the demo.
"""

from . import reference
from ._validation import set_debug
from .ops import dtome_merge, segment_mean, vtu_attention, vtu_decode_attention
from .core.thresholds import Thresholds, calibrate_thresholds, published_thresholds
from .reference.calibration import merge_schedule
from .reference.dtome import MergeState, init_merge_state

__version__ = "0.1.0"

__all__ = [
    "MergeState",
    "Thresholds",
    "calibrate_thresholds",
    "dtome_merge",
    "init_merge_state",
    "merge_schedule",
    "published_thresholds",
    "reference",
    "segment_mean",
    "set_debug",
    "vtu_attention",
    "vtu_decode_attention",
]
