"""One encoder block's DToMe merge, dispatched to the fastest backend.

Same contract as :func:`dymu_kernels.reference.dtome_merge`: every backend
makes the same merges (same sizes, lengths and pos_map) in the same new order
(the order rules (a) and (b) of the official release, docs/design.md §1.1) and
features within rounding.

- ``triton`` (CUDA): fused match + threshold kernel, prefix-sum compaction and
  a deterministic gather merge; no host sync (see :mod:`.dtome_triton`).
- ``cpp`` (CPU): matching as torch ops (a batched matmul), the merge step —
  which dominates the reference's time — in the C++ extension, gathered per
  destination in a fixed order (deterministic).
- ``torch``: the reference.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .. import _ext
from ..backends import CPP, TORCH, TRITON, select_backend
from ..reference import dtome as ref
from ..reference.dtome import MergeState

BACKENDS = (TRITON, CPP, TORCH)


@torch.library.custom_op("dymu_kernels::merge_tokens_cpp", mutates_args=())
def _merge_tokens_cpp(
    x: torch.Tensor, size: torch.Tensor, lengths: torch.Tensor, pos_map: torch.Tensor, node_idx: torch.Tensor,
    mask: torch.Tensor, node_max: torch.Tensor, cls_token: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ merge step as an op torch.compile traces (no graph break)."""
    return tuple(_ext.extension().merge_tokens(x, size, lengths, pos_map, node_idx, mask, node_max, cls_token))


@_merge_tokens_cpp.register_fake
def _(x, size, lengths, pos_map, node_idx, mask, node_max, cls_token):
    # The kernel keeps the capacity: new, contiguous tensors shaped like the state.
    return tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (x, size, lengths, pos_map))



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

    ``backend``: ``"auto"`` (Triton on CUDA, C++ on CPU when built, else
    torch; torch whenever ``x`` needs gradients — only the reference merge
    has a backward), ``"triton"``, ``"cpp"`` or ``"torch"``; one that cannot
    run raises ``ValueError`` listing why.
    """
    # Argument errors first (they name the argument); backend errors after.
    threshold, r = ref.check_dtome_args(x, size, lengths, pos_map, metric, threshold, r)
    if torch.is_grad_enabled() and x.requires_grad:
        # Training: only the reference merge is differentiable (the kernels have no backward).
        if backend not in ("auto", "torch"):
            raise ValueError(
                f"dtome_merge backend {backend!r} has no backward; x requires grad: use backend='torch' or 'auto' "
                "(which picks it when gradients are needed), or run under torch.no_grad()"
            )
        backend = "torch"
    name = select_backend("dtome_merge", backend, BACKENDS, x.device, x.dtype)
    state = MergeState(x, size, lengths, pos_map)
    if name == "triton":
        from . import dtome_triton

        node_max, node_idx, merge = dtome_triton.match(metric, lengths, threshold, cls_token=cls_token)
        checked = ref.check_scores(node_max, metric)  # (the kernel's maximum skips NaN scores)
        if checked is not node_max and merge is not None:  # rows left unmerged: select again, as the kernel does
            merge = (checked > threshold).to(merge.dtype)
        node_max = checked
        if merge is None:
            merge = ref.fixed_r_mask(node_max, r)
        return dtome_triton.merge_tokens(state, node_idx, merge, node_max, cls_token=cls_token)
    node_max, node_idx = ref.bipartite_match(metric, lengths, cls_token=cls_token)
    node_max = ref.check_scores(node_max)
    mask = ref.select_merges(node_max, threshold, r)
    if name == "torch":
        return ref.merge_tokens(state, node_idx, mask, node_max, cls_token=cls_token)
    return MergeState(*_merge_tokens_cpp(x, size, lengths, pos_map, node_idx, mask, node_max, bool(cls_token)))
