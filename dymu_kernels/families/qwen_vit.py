"""DToMe inside a Qwen2-VL-type vision tower, on 2×2 units.

The tower's ``PatchMerger`` concatenates the four patches of each 2×2 unit,
so merging inside the tower acts on whole units: the merge state holds, per
set (an image, or one video frame pair), its unique units as ``[P, 4·C]``
(four patch vectors each), a size per unit and a map from every original unit
to its unique unit. Each block then runs as

    h = norm1(units)                                  # unique units only
    q, k, v = qkv(h)                                  # unique units only
    q, k, v -> every patch position (window order)    # gathered through the map
    rotate q, k at each patch's own (h, w)            # the tower's 2-D RoPE
    o = attention per segment                         # the tower's own cu_seqlens
                                                      # (windows / full blocks)
    units += proj(mean of o over each unique unit's members)
    merge units (DToMe; keys averaged over a unit's four patches, pre-RoPE)
    units += mlp(norm2(units))                        # unique units only

— "expand → attend → average" (VTU inside the tower), so with nothing merged
it is the stock tower, and windows stay those of the original positions.
The merger then runs on unique units. transformers' own helpers give the
positions, segments and window order; the block's own modules do the rest.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.encoder import check_trim, per_block_r, trims_on
from ..core.thresholds import thresholds_argument
from ..ops.dtome import dtome_merge
from ..ops.segment import segment_mean
from ..reference.dtome import MergeState, init_merge_state, policy_merge, trim_state
from ..reference.vtu import rotate_half


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The tower's 2-D RoPE on ``x [L, H, Dh]`` (``cos``/``sin`` ``[L, Dh]``), in fp32 as the tower does."""
    cos, sin = cos[:, None].float(), sin[:, None].float()
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def segment_runs(cu_seqlens: torch.Tensor) -> List[Tuple[int, int, int]]:
    """The segments ``cu_seqlens[i] : cu_seqlens[i + 1]`` as runs of equal
    length, ``(start, end, length)`` (the windows mostly share one length);
    one host read, made once per forward for each kind of block."""
    bounds = cu_seqlens.tolist()
    runs, i = [], 0
    while i < len(bounds) - 1:
        length = bounds[i + 1] - bounds[i]
        j = i + 1
        while j < len(bounds) - 1 and bounds[j + 1] - bounds[j] == length:
            j += 1
        if length > 0:
            runs.append((bounds[i], bounds[j], length))
        i = j
    return runs


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: List[Tuple[int, int, int]],
                      scale: float) -> torch.Tensor:
    """Attention within each segment of ``q, k, v [L, H, Dh]`` -> ``[L, H, Dh]``,
    each as the tower's own per-segment ``scaled_dot_product_attention``
    computes it; a run of equal-length segments (:func:`segment_runs`) is one
    batched call on views of the inputs (no copies)."""
    out = torch.empty_like(q)
    for start, end, length in runs:
        count = (end - start) // length
        qs, ks, vs = (t[start:end].view(count, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)  # [count, H, length, Dh]
        out[start:end].view(count, length, *q.shape[1:]).copy_(o.transpose(1, 2))
    return out


def pad_sets(rows: torch.Tensor, grid: torch.Tensor, unit: int):
    """The rows of every set (an image, or one video frame pair) padded into
    one batch, a 2×2 unit per slot: ``rows`` holds, set after set, each
    unit's consecutive rows (its ``unit`` patches in the tower, its one token
    after the merger). Returns ``(padded [n, P0, rows per unit * C], units per
    set [n], the same as a list)`` — the list is one host read, as the
    unpatched model's own split."""
    set_units = (grid[:, 1] * grid[:, 2] // unit).repeat_interleave(grid[:, 0])
    sizes = set_units.tolist()
    total = sum(sizes)
    sets = torch.split(rows.reshape(total, rows.shape[0] // total * rows.shape[-1]), sizes)
    return torch.nn.utils.rnn.pad_sequence(list(sets), batch_first=True), set_units.to(rows.device), sizes


def set_mask(set_units: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[n, capacity]``: which slots of a padded batch of sets hold a unit."""
    return torch.arange(capacity, device=set_units.device)[None] < set_units[:, None]


class QwenUnitDToMe(nn.Module):
    """DToMe in every block of a Qwen2-VL / Qwen2.5-VL vision tower (module doc).

    Args:
        visual: the model's tower (shared, not modified).
        thresholds: per-block thresholds (list, file, :class:`Thresholds`).
        r: instead, merge exactly ``r`` units per set and block.
        backend, trim: as :class:`~dymu_kernels.core.encoder.DToMeVisionEncoder`.

    Neither thresholds nor r: no merging, unless a calibration ``policy`` is
    passed to the call (``policy.select(block, node_max)`` picks the merges,
    as :func:`dymu_kernels.calibrate_thresholds` drives it).
    """

    def __init__(self, visual, thresholds=None, *, r: Union[None, int, Sequence[int]] = None,
                 backend: str = "auto", trim: Union[str, bool] = "auto"):
        super().__init__()
        self.visual = visual
        self.num_layers = len(visual.blocks)
        if thresholds is not None and r is not None:
            raise ValueError("give thresholds (one per vision block) or r (units merged per block), not both")
        check_trim(trim)
        self.thresholds = None if thresholds is None else thresholds_argument(thresholds, self.num_layers)
        self.r = per_block_r(r, self.num_layers)
        self.backend, self.trim = backend, trim

    def trims_on(self, device: torch.device) -> bool:
        return trims_on(self.trim, device)

    def _layout(self, grid: torch.Tensor):
        """Positions, segments, window order and the sets of the tower's input."""
        from transformers import vision_utils as vu

        visual = self.visual
        position_ids = vu.get_vision_position_ids(grid, visual.spatial_merge_size)
        cu_full, _ = vu.get_vision_attention_seqlens(grid, visual.config)
        window_index, cu_window = None, None
        if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: windows, in window order throughout
            window_index, cu_window = vu.get_vision_window_index(
                grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
                patch_size=visual.patch_size)
        return position_ids, cu_full, window_index, cu_window

    def forward(self, pixels: torch.Tensor, grid: torch.Tensor, policy=None):
        """Merged unique units of every set after the merger, as a merge state
        ``(x [n, P, C_out], size, lengths, pos_map [n, P0])`` — ``pos_map`` over
        each set's original units in *raster* order (the placeholders') —
        plus the tower's last hidden state at every patch (window order, as
        the stock tower returns it) and the units left after each block."""
        visual = self.visual
        grid = grid.long()
        x = visual.patch_embed(pixels.type(visual.dtype))  # [L, C]
        L, C = x.shape
        unit = visual.spatial_merge_size ** 2
        position_ids, cu_full, window_index, cu_window = self._layout(grid)
        cos, sin = visual.rotary_pos_emb(x, position_ids)
        if window_index is not None:
            x = visual.permute_input_for_window_attn(x, window_index, seq_len=L)
            cos, sin = (visual.permute_input_for_window_attn(t, window_index, seq_len=L) for t in (cos, sin))
        # Sets are contiguous in window order (windows never cross a frame pair).
        units, set_units, sizes = pad_sets(x, grid, unit)
        state = init_merge_state(units, set_units)
        valid = set_mask(set_units, units.shape[1])
        per_block: List[torch.Tensor] = []
        trims = self.trims_on(x.device)
        fullatt = set(getattr(visual, "fullatt_block_indexes", range(self.num_layers)))
        runs_full = segment_runs(cu_full)
        runs_window = runs_full if cu_window is None else segment_runs(cu_window)
        for i, blk in enumerate(visual.blocks):
            runs = runs_full if (window_index is None or i in fullatt) else runs_window
            state = self._block(blk, state, valid, cos, sin, runs, i, unit, policy, trims)
            per_block.append(state.lengths)
        n, P = state.x.shape[:2]
        last = state.x.view(n, P, unit, C).gather(
            1, state.pos_map.clamp_min(0)[..., None, None].expand(-1, -1, unit, C))[valid].reshape(L, C)
        tokens = visual.merger(state.x.reshape(n * P * unit, C)).view(n, P, -1)
        pos_map = state.pos_map
        if window_index is not None:  # the map in raster unit order (the placeholders' order)
            flat = torch.empty_like(pos_map[valid])
            flat[window_index.to(x.device)] = pos_map[valid]
            pos_map = torch.full_like(pos_map, -1).masked_scatter(valid, flat)
        return MergeState(tokens, state.size, state.lengths, pos_map), last, per_block, sizes

    def _block(self, blk, state: MergeState, valid, cos, sin, runs, i: int, unit: int, policy=None,
               trims: bool = False) -> MergeState:
        attn = blk.attn
        n, P, _ = state.x.shape
        C = state.x.shape[-1] // unit
        H = attn.num_heads
        Dh = C // H
        qkv = attn.qkv(blk.norm1(state.x.view(-1, C))).view(n, P, unit, 3 * C)  # unique units only
        # Every original unit's unique row (window order): one gather to every patch position.
        rows = (torch.arange(n, device=qkv.device)[:, None] * P + state.pos_map.clamp_min(0))[valid]
        full = qkv.view(n * P, unit * 3 * C).index_select(0, rows)  # [U0, unit * 3C]
        q, k, v = full.view(-1, 3, H, Dh).unbind(1)  # [L, H, Dh] each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        o = segment_attention(q, k, v, runs, attn.scaling)  # [L, H, Dh]
        per_unit = o.new_zeros(n, valid.shape[1], unit * C).masked_scatter(valid[..., None], o.reshape(-1, unit * C))
        mean = segment_mean(per_unit, state.pos_map.masked_fill(~valid, -1), P)  # [n, P, unit * C]
        x = state.x + attn.proj(mean.view(-1, C)).view(n, P, unit * C)
        state = state._replace(x=x)
        keys = qkv[..., C:2 * C].reshape(n, P, unit, H, Dh).mean(2).transpose(1, 2)  # [n, H, P, Dh]: the metric
        if policy is not None:  # calibration: the policy chooses the merges (reference ops; not a hot path)
            state = policy_merge(state, keys, policy, i, cls_token=False)
        elif self.thresholds is not None or self.r is not None:
            threshold = None if self.thresholds is None else self.thresholds[i]
            r = None if self.r is None else self.r[i]
            state = dtome_merge(*state, keys, threshold, r=r, cls_token=False, backend=self.backend)
        if trims:  # the MLP runs on the units left after this block's merge
            state = trim_state(state)
        x = state.x.reshape(-1, C)  # every patch row of every unique unit
        return state._replace(x=(x + blk.mlp(blk.norm2(x))).view(state.x.shape))
