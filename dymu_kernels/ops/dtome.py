"""One encoder block's DToMe merge, dispatched to the fastest backend.

Same contract as :func:`dymu_kernels.reference.dtome_merge`. Matching and
selection run as torch ops (a batched matmul and a row max); the merge step —
the size-weighted averaging and compaction that dominates the reference's
time — runs in the C++ extension on the CPU. The C++ merge gathers each
output row from its members in a fixed order, so it is deterministic; its
features equal the reference's within rounding (same merges, same sizes,
lengths and pos_map exactly).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _ext
from ..backends import CPP, TORCH, select_backend
from ..reference import dtome as ref
from ..reference.dtome import MergeState

BACKENDS = (CPP, TORCH)


def dtome_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    lengths: torch.Tensor,
    pos_map: torch.Tensor,
    metric: torch.Tensor,
    threshold: Optional[Union[float, torch.Tensor]] = None,
    *,
    r: Optional[Union[int, torch.Tensor]] = None,
    cls_token: bool = True,
    backend: str = "auto",
) -> MergeState:
    """DToMe (threshold) or ToMe (fixed ``r``) merge of one block; see the reference.

    ``backend``: ``"auto"`` (C++ on CPU when built, else torch), ``"cpp"`` or
    ``"torch"``; a backend that cannot run raises ``ValueError`` saying why.
    """
    # Argument errors first (they name the argument); backend errors after.
    node_idx, mask = ref.match_and_select(x, size, lengths, pos_map, metric, threshold, r=r, cls_token=cls_token)
    name = select_backend("dtome_merge", backend, BACKENDS, x.device, x.dtype)
    if name == "torch":
        return ref.merge_tokens(MergeState(x, size, lengths, pos_map), node_idx, mask)
    return MergeState(*_ext.extension().merge_tokens(x, size, lengths, pos_map, node_idx, mask))
