"""DToMe reference: one encoder block's bipartite threshold merge.

This is the readable specification that every DToMe backend is tested
against (docs/design.md §1.1, §2). Everything is batched, padded and free of host
synchronisation: no ``.item()``, no shape that depends on tensor values.

Merge state (one batch of images, all on one device)::

    x        [B, N_cap, C]  token features; slots >= lengths[b] are padding
    size     [B, N_cap]     float, original patches per token (0 = empty slot)
    lengths  [B]            int32/int64, valid tokens are slots [0, lengths[b])
    pos_map  [B, N0]        int32/int64, original patch index -> current slot
                            (-1 for original positions that are padding)

One block's merge, per image, on its ``L = lengths[b]`` valid tokens:

1. Split alternately: A = slots 0, 2, 4, ... and B = slots 1, 3, 5, ... (< L).
2. Metric: attention keys averaged over heads (in fp32), L2-normalised; each A
   token finds its most similar B token (cosine score; ties go to the lowest
   B index). With ``cls_token=True`` slot 0 (the CLS token) never merges.
3. Selection: threshold mode merges every A token whose score is strictly
   greater than the threshold; fixed-r ToMe mode merges the r best-scoring A
   tokens (ties: lower A index first).
4. Size-weighted average into the destination:
   ``x_B <- sum(x_t * s_t) / sum(s_t)`` and ``s_B <- sum(s_t)`` over B and all
   its sources, accumulated in fp32 (fp64 for fp64 input). Tokens that receive
   no source are moved unchanged (bit-exact).
5. New order (the two order rules of the official release, docs/design.md §1.1;
   they decide which tokens are A and B in the next block):

   (a) an image that merges **no** token keeps its sequence unchanged, order
       included (the release returns its input as is when r = 0);
   (b) otherwise the unmerged A tokens come first, then all B tokens in their
       order. With ``cls_token=True`` the unmerged A tokens keep their
       previous order (CLS first); without a CLS token they follow in
       descending order of their score ``node_max`` (ties: lower A index
       first), as ToMe leaves them.

   Example with L = 7, CLS, and A2 -> B1, A3 -> B1 merged::

       before: [A0=CLS, B0, A1, B1, A2, B2, A3]
       after:  [A0, A1, B0, B1(+A2,A3), B2]          L' = 5

   Without CLS, scores A0 = 0.2, A1 = A2 = 0.7, and only A3 -> B1 merged::

       before: [A0, B0, A1, B1, A2, B2, A3]
       after:  [A1, A2, A0, B0, B1(+A3), B2]         L' = 6 (A1 before A2: tie)

   Nothing merged (threshold above every score, or r = 0): ``after == before``.

The capacity ``N_cap`` is kept, so output shapes never depend on the data;
:func:`trim_state` shrinks it when a host sync is acceptable.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_same_device,
    check_shape,
    check_tensor,
    values_checkable,
)
from .segment import accumulation_dtype

NORM_EPS = 1e-12


class MergeState(NamedTuple):
    """The batched state that flows between encoder blocks (see module doc)."""

    x: torch.Tensor
    size: torch.Tensor
    lengths: torch.Tensor
    pos_map: torch.Tensor


def init_merge_state(x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> MergeState:
    """State before any merge: every token stands for one patch.

    ``x`` is ``[B, N0, C]``; ``lengths`` (default: all ``N0``) marks padding.
    ``pos_map`` is the identity on valid slots and -1 on padding; ``size`` is
    1 on valid slots and 0 elsewhere.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N0, _ = x.shape
    if lengths is None:
        lengths = torch.full((B,), N0, dtype=torch.int32, device=x.device)
    check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES)
    check_shape("lengths", lengths, [B])
    check_same_device(x=x, lengths=lengths)
    check_index_range("lengths", lengths, 0, N0 + 1, "at most the sequence length")
    slots = torch.arange(N0, device=x.device)
    size = (slots[None, :] < lengths[:, None].long()).to(torch.float32)
    pos_map = torch.where(size > 0, slots[None, :], -1).to(torch.int32)
    return MergeState(x, size, lengths, pos_map)


def check_merge_state(x, size, lengths, pos_map) -> None:
    """Validate a merge state's types, shapes, devices and (when cheap) values."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    B, N, _ = x.shape
    check_tensor("size", size, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("size", size, [B, N], "one entry per slot of x")
    check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES)
    check_shape("lengths", lengths, [B])
    check_tensor("pos_map", pos_map, ndim=2, dtypes=INDEX_DTYPES)
    if pos_map.shape[0] != B:
        raise ValueError(f"pos_map must have batch size {B} like x, got shape {tuple(pos_map.shape)}")
    check_same_device(x=x, size=size, lengths=lengths, pos_map=pos_map)
    check_index_range("lengths", lengths, 0, N + 1, "at most x.shape[1]")
    check_index_range("pos_map", pos_map, -1, N, "slots of x, -1 = padding")


def _valid_slots(lengths: torch.Tensor, n_a: int, n_b: int):
    """Masks of valid A (even) and B (odd) slots, ``[B, n_a]`` and ``[B, n_b]``."""
    dev = lengths.device
    L = lengths.long()[:, None]
    a_valid = torch.arange(n_a, device=dev)[None, :] * 2 < L
    b_valid = torch.arange(n_b, device=dev)[None, :] * 2 + 1 < L
    return a_valid, b_valid


def bipartite_match(metric: torch.Tensor, lengths: torch.Tensor, *, cls_token: bool = True):
    """Best B match of every A token.

    Args:
        metric: ``[B, N, Dm]`` or ``[B, H, N, Dh]`` (averaged over heads).
        lengths: ``[B]`` valid tokens per image.
        cls_token: slot 0 never merges.

    Returns:
        ``node_max [B, ceil(N/2)]`` (score, fp32 or fp64; ``-inf`` for padding,
        CLS, or when no B token exists) and ``node_idx [B, ceil(N/2)]`` int64
        (index into B, i.e. slot ``2*idx+1``; ties go to the lowest index).
    """
    acc = accumulation_dtype(metric.dtype)
    m = metric.to(acc)
    if m.dim() == 4:
        m = m.mean(dim=1)
    m = F.normalize(m, dim=-1, eps=NORM_EPS)
    B, N, _ = m.shape
    n_a, n_b = (N + 1) // 2, N // 2
    a_valid, b_valid = _valid_slots(lengths, n_a, n_b)
    if n_b == 0:
        node_max = torch.full((B, n_a), float("-inf"), dtype=acc, device=m.device)
        return node_max, torch.zeros((B, n_a), dtype=torch.long, device=m.device)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
    scores = scores.masked_fill(~b_valid[:, None, :], float("-inf"))
    row_ok = a_valid.clone()
    if cls_token:
        row_ok[:, 0] = False
    scores = scores.masked_fill(~row_ok[:, :, None], float("-inf"))
    # torch.max returns the first maximal index on ties (documented behaviour).
    node_max, node_idx = scores.max(dim=-1)
    return node_max, node_idx


def threshold_mask(node_max: torch.Tensor, threshold: Union[float, torch.Tensor]) -> torch.Tensor:
    """DyMU selection: merge every A token scoring strictly above the threshold."""
    return node_max > threshold


def score_order(node_max: torch.Tensor) -> torch.Tensor:
    """A indices of every image by descending score, ties by A index ``[B, n_a]``
    (a stable sort: the order rule (b) ranks unmerged A tokens with it)."""
    return node_max.argsort(dim=-1, descending=True, stable=True)


def rank_descending(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its row, best first; ties keep index order."""
    order = score_order(scores)
    ranks = torch.arange(scores.shape[-1], device=scores.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def fixed_r_mask(node_max: torch.Tensor, r: Union[int, torch.Tensor]) -> torch.Tensor:
    """ToMe selection: merge the ``r`` best-scoring A tokens of each image.

    ``r`` is an int or an int tensor ``[B]``; fewer merge when fewer A tokens
    can merge (CLS and padding never do).
    """
    if isinstance(r, torch.Tensor):
        r = r.to(node_max.device).long()[:, None]
    return (rank_descending(node_max) < r) & (node_max > float("-inf"))


class ThresholdPolicy:
    """Inference selection: layer i merges scores ``> thresholds[i]``."""

    def __init__(self, thresholds: Sequence[float]):
        self.thresholds = [float(t) for t in thresholds]

    def select(self, layer: int, node_max: torch.Tensor) -> torch.Tensor:
        return node_max > self.thresholds[layer]


class FixedRPolicy:
    """ToMe baseline: layer i merges exactly ``r[i]`` tokens per image."""

    def __init__(self, r: Sequence[int]):
        self.r = [int(v) for v in r]

    def select(self, layer: int, node_max: torch.Tensor) -> torch.Tensor:
        return fixed_r_mask(node_max, self.r[layer])


def _kept_a_slots(kept_a: torch.Tensor, node_max: Optional[torch.Tensor], cls_token: bool) -> torch.Tensor:
    """New slot of every kept A token (rule (b)); values at other A tokens are
    meaningless. A prefix sum over the kept flags compacts them: in position
    order with a CLS token, in :func:`score_order` without one."""
    if cls_token:
        return kept_a.cumsum(dim=1) - 1
    order = score_order(node_max)
    slot_in_order = kept_a.gather(1, order).cumsum(dim=1) - 1
    return torch.empty_like(order).scatter_(1, order, slot_in_order)


def check_order_args(node_max: Optional[torch.Tensor], cls_token: bool) -> None:
    """Rule (b) needs the scores when there is no CLS token (every backend's
    ``merge_tokens`` checks this first)."""
    if not cls_token and node_max is None:
        raise ValueError("merge_tokens without a CLS token needs node_max: unmerged A tokens are ordered by score")


def merge_tokens(
    state: MergeState,
    node_idx: torch.Tensor,
    merge_mask: torch.Tensor,
    node_max: Optional[torch.Tensor] = None,
    *,
    cls_token: bool = True,
) -> MergeState:
    """Apply a chosen set of A -> B merges to a merge state.

    ``node_idx``/``merge_mask``/``node_max`` are ``[B, ceil(N_cap/2)]`` as
    produced by :func:`bipartite_match` and a selection; entries for padding
    slots are ignored. The new order follows rules (a) and (b) of the module
    doc: ``node_max`` orders the unmerged A tokens when ``cls_token=False``
    (required then, unused with a CLS token). Returns the new state with the
    same capacity.

    Raises:
        ValueError: ``cls_token=False`` without ``node_max``.
    """
    check_order_args(node_max, cls_token)
    x, size, lengths, pos_map = state
    B, N, C = x.shape
    n_a, n_b = (N + 1) // 2, N // 2
    dev = x.device
    a_valid, b_valid = _valid_slots(lengths, n_a, n_b)
    merged = merge_mask & a_valid
    kept_a = a_valid & ~merged
    n_kept = kept_a.sum(dim=1, keepdim=True)
    dump = N  # padding is routed to an extra slot that is dropped at the end

    # Destination slot of every old slot after the merge.
    home_a = torch.where(kept_a, _kept_a_slots(kept_a, node_max, cls_token), dump)
    dest_a = torch.where(merged, n_kept + node_idx, home_a)
    home_b = torch.where(b_valid, n_kept + torch.arange(n_b, device=dev)[None, :], dump)
    home = torch.empty((B, N), dtype=torch.long, device=dev)
    dest = torch.empty((B, N), dtype=torch.long, device=dev)
    home[:, 0::2], home[:, 1::2] = home_a, home_b
    dest[:, 0::2], dest[:, 1::2] = dest_a, home_b
    # Rule (a): an image that merges nothing keeps every token where it is.
    slots = torch.arange(N, device=dev)[None, :]
    unchanged = torch.where(slots < lengths.long()[:, None], slots, dump)
    untouched = ~merged.any(dim=1, keepdim=True)
    home = torch.where(untouched, unchanged, home)
    dest = torch.where(untouched, unchanged, dest)

    acc = accumulation_dtype(x.dtype)
    w = size.to(acc)
    sums = torch.zeros((B, N + 1, C), dtype=acc, device=dev)
    sums.scatter_add_(1, dest[:, :, None].expand(B, N, C), x.to(acc) * w[:, :, None])
    new_size = torch.zeros((B, N + 1), dtype=acc, device=dev).scatter_add_(1, dest, w)
    members = torch.zeros((B, N + 1), dtype=torch.int32, device=dev)
    members.scatter_add_(1, dest, torch.ones_like(dest, dtype=torch.int32))
    # Each live slot has exactly one home token; only the dump slot collides.
    moved = torch.zeros((B, N + 1, C), dtype=x.dtype, device=dev)
    moved.scatter_(1, home[:, :, None].expand(B, N, C), x)

    average = (sums / new_size[:, :, None].clamp_min(torch.finfo(acc).tiny)).to(x.dtype)
    new_x = torch.where(members[:, :, None] > 1, average, moved)[:, :N]
    new_pos = torch.where(pos_map >= 0, dest.gather(1, pos_map.long().clamp_min(0)), -1).to(pos_map.dtype)
    new_lengths = (lengths - merged.sum(dim=1)).to(lengths.dtype)
    return MergeState(new_x, new_size[:, :N].to(size.dtype), new_lengths, new_pos)


def policy_merge(state: MergeState, metric: torch.Tensor, policy, layer: int, *, cls_token: bool = True) -> MergeState:
    """One block's merge chosen by a *policy* (``policy.select(layer, node_max)``
    returns the merge mask), as encoders run it for calibration
    (:func:`dymu_kernels.calibrate_thresholds`)."""
    node_max, node_idx = bipartite_match(metric, state.lengths, cls_token=cls_token)
    return merge_tokens(state, node_idx, policy.select(layer, node_max), node_max, cls_token=cls_token)


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
) -> MergeState:
    """One encoder block's DToMe merge (threshold mode) or ToMe merge (fixed r).

    Args:
        x, size, lengths, pos_map: the merge state (module doc), capacity N.
        metric: ``[B, N, Dm]`` or ``[B, H, N, Dh]`` attention keys of this block.
        threshold: merge A tokens whose cosine score is ``> threshold``
            (a float or 0-d tensor; ``inf`` merges nothing).
        r: instead of ``threshold``, merge exactly ``min(r, mergeable)`` tokens
            per image (int or int tensor ``[B]``) — the ToMe baseline.
        cls_token: protect slot 0 (set False for encoders without CLS; the
            unmerged A tokens are then ordered by score, rule (b)).

    Returns:
        :class:`MergeState` ``(x, size, lengths, pos_map)`` with the same
        shapes and dtypes as the inputs, tokens in the order of rules (a)
        and (b) of the module doc.

    Raises:
        TypeError/ValueError naming the argument for wrong ranks, shapes,
        dtypes, devices, both or neither of ``threshold``/``r``, NaN
        thresholds, negative ``r``; and (on CPU, or on GPU in debug mode) for
        ``lengths``/``pos_map`` out of range or a non-finite metric.
    """
    threshold, r = check_dtome_args(x, size, lengths, pos_map, metric, threshold, r)
    node_max, node_idx = bipartite_match(metric, lengths, cls_token=cls_token)
    node_max = check_scores(node_max)
    mask = select_merges(node_max, threshold, r)
    return merge_tokens(MergeState(x, size, lengths, pos_map), node_idx, mask, node_max, cls_token=cls_token)


def check_dtome_args(x, size, lengths, pos_map, metric, threshold=None, r=None):
    """Validate :func:`dtome_merge` arguments; returns ``(threshold, r)`` normalised
    (one of them None). Shared by every backend."""
    check_merge_state(x, size, lengths, pos_map)
    B, N, _ = x.shape
    check_tensor("metric", metric, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    if metric.shape[0] != B or metric.shape[-2] != N:
        raise ValueError(
            f"metric must be [B, N, Dm] or [B, H, N, Dh] with B={B}, N={N} like x, "
            f"got shape {tuple(metric.shape)}"
        )
    check_same_device(x=x, metric=metric)
    if (threshold is None) == (r is None):
        raise ValueError("give exactly one of threshold (DyMU) or r (fixed-r ToMe)")
    if threshold is not None:
        return _check_threshold(threshold, x.device), None
    return None, _check_r(r, B, x.device)


class _NonFinite(threading.local):
    """The policy for a metric that is not finite, per thread (see :func:`unmerged_if_nonfinite`)."""

    depth = 0  # > 0: inside unmerged_if_nonfinite
    rows = 0  # images (batch rows) left unmerged in a block since the outermost one began


_NONFINITE = _NonFinite()


@contextmanager
def unmerged_if_nonfinite():
    """Within this block an image (batch row) whose metric is not finite in a
    block merges nothing there — as if its threshold were above every score —
    instead of raising; the other images of the batch merge as they would
    alone. For serving (dymu_kernels.vllm): one request's overflowing tower
    (fp16) must not stop the engine's step for every request; its features
    stay what the stock tower gives. Yields a function returning how many
    rows were left unmerged so far (counted where values are readable: CPU, or
    debug mode)."""
    _NONFINITE.depth += 1
    if _NONFINITE.depth == 1:
        _NONFINITE.rows = 0
    try:
        yield lambda: _NONFINITE.rows
    finally:
        _NONFINITE.depth -= 1


def check_scores(node_max: torch.Tensor, metric: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A NaN/inf in the metric makes its scores NaN; checking the ``[B, N/2]``
    scores is far cheaper than scanning the whole metric — unless ``metric``
    is given: a kernel whose maximum skips NaN scores (Triton's) has to be
    checked on the metric itself. Raises ValueError naming the metric (where
    values are readable: CPU, or debug mode), or — inside
    :func:`unmerged_if_nonfinite` — returns the scores with each such row's
    set to -inf (a row that merges nothing, order kept: rule (a)); else
    ``node_max`` itself."""

    def nonfinite_rows() -> torch.Tensor:  # [B, 1] bool
        bad = torch.isnan(node_max) if metric is None else ~torch.isfinite(metric)
        return bad.flatten(1).any(-1)[:, None]

    if _NONFINITE.depth == 0:
        if values_checkable(node_max) and bool(nonfinite_rows().any()):
            raise ValueError("metric must be finite: it contains NaN or inf")
        return node_max
    bad = nonfinite_rows()  # no host read: also on a GPU, also while compiling
    if values_checkable(node_max):
        _NONFINITE.rows += int(bad.sum())
    return node_max.masked_fill(bad, float("-inf"))


def select_merges(node_max: torch.Tensor, threshold=None, r=None) -> torch.Tensor:
    """Threshold (DyMU) or fixed-r (ToMe) selection, whichever is given."""
    return threshold_mask(node_max, threshold) if threshold is not None else fixed_r_mask(node_max, r)


def _check_threshold(threshold, device) -> Union[float, torch.Tensor]:
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() != 0:
            raise ValueError(f"threshold must be a scalar, got shape {tuple(threshold.shape)}")
        if not threshold.is_floating_point():
            raise TypeError(f"threshold must be a float tensor, got {threshold.dtype}")
        if values_checkable(threshold) and bool(torch.isnan(threshold)):
            raise ValueError("threshold must not be NaN")
        return threshold.to(device)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    if threshold != threshold:
        raise ValueError("threshold must not be NaN")
    return float(threshold)


def _check_r(r, batch: int, device) -> Union[int, torch.Tensor]:
    if isinstance(r, torch.Tensor):
        check_tensor("r", r, ndim=1, dtypes=INDEX_DTYPES)
        check_shape("r", r, [batch], "one count per image")
        check_index_range("r", r, 0, 2**62, "non-negative merge counts")
        return r.to(device)
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int or an int tensor [B], got {type(r).__name__}")
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    return r


def trim_state(state: MergeState) -> MergeState:
    """Shrink the capacity to the longest image (reads ``lengths``: a host sync)."""
    n = max(int(state.lengths.max()), 1) if state.lengths.numel() else 1
    return MergeState(state.x[:, :n], state.size[:, :n], state.lengths, state.pos_map)
