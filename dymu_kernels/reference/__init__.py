"""Plain-PyTorch reference of every DyMU op: the readable spec.

Tests and benchmarks import these; every kernel backend must agree with them.
One reference per op:

- :mod:`.dtome` — one encoder block's DToMe / fixed-r ToMe merge on the merge state.
- :mod:`.attention` — proportional attention (log-size key bias) for merged ViTs.
- :mod:`.calibration` — the threshold calibration rule and merge schedules.
- :mod:`.vtu` — VTU attention, expanded form and the paper's decomposed form.
- :mod:`.segment` — segment mean and unmerge between unique tokens and positions.
"""

from .attention import proportional_attention, proportional_attention_bias
from .calibration import ThresholdCalibrator, batch_top_k_mask, merge_schedule
from .dtome import (
    FixedRPolicy,
    MergeState,
    ThresholdPolicy,
    bipartite_match,
    dtome_merge,
    fixed_r_mask,
    init_merge_state,
    merge_tokens,
    policy_merge,
    threshold_mask,
    trim_state,
)
from .segment import segment_mean, unmerge
from .vtu import (
    apply_rope,
    rope_cos_sin,
    rotate_half,
    vtu_attention_decomposed,
    vtu_attention_expand,
    vtu_decode_attention_ref,
)

__all__ = [
    "FixedRPolicy",
    "MergeState",
    "ThresholdCalibrator",
    "ThresholdPolicy",
    "apply_rope",
    "batch_top_k_mask",
    "bipartite_match",
    "dtome_merge",
    "fixed_r_mask",
    "init_merge_state",
    "merge_schedule",
    "merge_tokens",
    "policy_merge",
    "proportional_attention",
    "proportional_attention_bias",
    "rope_cos_sin",
    "rotate_half",
    "segment_mean",
    "threshold_mask",
    "trim_state",
    "unmerge",
    "vtu_attention_decomposed",
    "vtu_attention_expand",
    "vtu_decode_attention_ref",
]
