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

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..core.encoder import check_trim, trims_on
from ..core.thresholds import Stage, stage_r, stage_thresholds
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


# Sets (images, video frame pairs) of more units than this are matched in bands
# (:func:`match_sets`): DToMe's all-pairs scores cost O(P²) per set and block.
MATCH_UNITS = 4096


@dataclass(frozen=True)
class MatchSets:
    """The sets DToMe matches within, for a batch of items (:func:`match_sets`)."""

    units: List[int]  # units per matching set, in the tower's order
    frames: List[int]  # matching sets per image / video frame pair (1, or its bands)
    frame_units: List[int]  # units per image / video frame pair
    items: List[int]  # matching sets per item (image or video)


def match_sets(grid: torch.Tensor, merge_size: int, window_units: int = 1, max_units: int = MATCH_UNITS) -> MatchSets:
    """Split every image / video frame pair of ``grid [n, 3]`` (t, h, w in
    patches) into the sets DToMe matches within: the whole frame pair when it
    has at most ``max_units`` 2×2 units; otherwise bands of whole unit rows,
    each a multiple of ``window_units`` rows (the tower's attention windows,
    so a band is contiguous in raster and window order alike) and at most
    ``max_units`` units where a window row allows it. A merge never joins
    units of two bands; at most ``max_units`` units per set bound the scores
    to O(P · max_units) per block. One host read of the grid."""
    if max_units < 1:
        raise ValueError(f"max_units={max_units}: expected a positive number of units")
    units, frames, frame_units, items = [], [], [], []
    for t, h, w in grid.tolist():
        rows, cols = h // merge_size, w // merge_size
        if rows * cols <= max_units:
            bands = [rows * cols]
        else:
            band = max(1, max_units // cols // window_units) * window_units
            bands = [band * cols] * (rows // band) + ([rows % band * cols] if rows % band else [])
        units += bands * t
        frames += [len(bands)] * t
        frame_units += [rows * cols] * t
        items.append(len(bands) * t)
    return MatchSets(units, frames, frame_units, items)


def tower_match_sets(visual, grid: torch.Tensor, max_units: int = MATCH_UNITS) -> MatchSets:
    """:func:`match_sets` for a Qwen2-VL-type tower (its window height, if it has windows)."""
    merge = visual.spatial_merge_size
    window = visual.window_size // merge // visual.patch_size if hasattr(visual, "fullatt_block_indexes") else 1
    return match_sets(grid, merge, window, max_units)


def pad_sets(rows: torch.Tensor, sizes: List[int]):
    """The rows of every set padded into one batch, a 2×2 unit per slot:
    ``rows`` holds, set after set, each unit's consecutive rows (its four
    patches in the tower, its one token after the merger); ``sizes``: units
    per set (:attr:`MatchSets.units`). Returns ``(padded [n, P0, rows per
    unit * C], units per set [n])``."""
    total = sum(sizes)
    sets = torch.split(rows.reshape(total, rows.shape[0] // total * rows.shape[-1]), sizes)
    return (torch.nn.utils.rnn.pad_sequence(list(sets), batch_first=True),
            torch.tensor(sizes, device=rows.device))


def set_mask(set_units: torch.Tensor, capacity: int) -> torch.Tensor:
    """``[n, capacity]``: which slots of a padded batch of sets hold a unit."""
    return torch.arange(capacity, device=set_units.device)[None] < set_units[:, None]


def _every_patch(state: MergeState, valid: torch.Tensor, unit: int) -> torch.Tensor:
    """``[L, C]``: every patch's row of its unique unit (window order)."""
    n, P, D = state.x.shape
    C = D // unit
    # (int64 indices: torch 2.13's CPU gather misreads some expanded int32 indices)
    index = state.pos_map.long().clamp_min(0)[..., None, None].expand(-1, -1, unit, C)
    rows = state.x.view(n, P, unit, C).gather(1, index)
    return rows[valid].reshape(-1, C)


def vit_stage(visual) -> Stage:
    """The in-tower stage of a Qwen2-VL-type tower: one threshold (or ``r``) per block."""
    return Stage("vit", "vision block", len(visual.blocks), fixed_r=True)


class UnitOutput(NamedTuple):
    """What :class:`QwenUnitDToMe` returns."""

    # (x [n, P, C_out] after the merger, size, lengths, pos_map [n, P0]): pos_map over each set's original
    # units in *raster* order (the placeholders'), -1 past a set's units
    state: MergeState
    # the tower's hidden states at every patch (window order, as the stock tower returns them): the last one,
    # or with ``hidden_states`` the input of every block and the last, a tuple
    hidden: object
    per_block: List[torch.Tensor]  # units left after each block, one [n] tensor each
    sets: MatchSets
    # Qwen3-VL's deepstack taps, one [n, P0, D] per tap block: each original unit's row of its tap merger on
    # the unique unit it belonged to at that block (raster order); [] for towers without taps
    taps: List[torch.Tensor]


class QwenUnitDToMe(nn.Module):
    """DToMe in every block of a Qwen2-VL / Qwen2.5-VL vision tower (module doc).

    Args:
        visual: the model's tower (shared, not modified).
        thresholds: per-block thresholds (list, file, :class:`Thresholds`).
        r: instead, merge exactly ``r`` units per set and block.
        backend, trim: as :class:`~dymu_kernels.core.encoder.DToMeVisionEncoder`.
        match_units: images / frame pairs of more units match in bands
            (:func:`match_sets`).

    Neither thresholds nor r: no merging, unless a calibration ``policy`` is
    passed to the call (``policy.select(block, node_max)`` picks the merges,
    as :func:`dymu_kernels.calibrate_thresholds` drives it).
    """

    def __init__(self, visual, thresholds=None, *, r: Union[None, int, Sequence[int]] = None,
                 backend: str = "auto", trim: Union[str, bool] = "auto", match_units: int = MATCH_UNITS):
        super().__init__()
        self.visual = visual
        self.num_layers = len(visual.blocks)
        if thresholds is not None and r is not None:
            raise ValueError("give thresholds (one per vision block) or r (units merged per block), not both")
        check_trim(trim)
        stage = vit_stage(visual)
        self.thresholds = stage_thresholds(thresholds, stage)
        self.r = stage_r(r, stage)
        self.backend, self.trim, self.match_units = backend, trim, match_units

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

    def forward(self, pixels: torch.Tensor, grid: torch.Tensor, policy=None, sets: Optional[MatchSets] = None,
                hidden_states: bool = False) -> "UnitOutput":
        """The tower with DToMe in every block (:class:`UnitOutput`): merged
        unique units of every matching set (``sets``, by default
        :func:`tower_match_sets` with ``match_units``) after the merger, the
        tower's hidden states, the units left after each block, the sets,
        and the deepstack taps (Qwen3-VL)."""
        visual = self.visual
        grid = grid.long()
        x = self._embed(pixels, grid)  # [L, C]
        L, C = x.shape
        unit = visual.spatial_merge_size ** 2
        position_ids, cu_full, window_index, cu_window = self._layout(grid)
        cos, sin = visual.rotary_pos_emb(x, position_ids)
        if window_index is not None:
            x = visual.permute_input_for_window_attn(x, window_index, seq_len=L)
            cos, sin = (visual.permute_input_for_window_attn(t, window_index, seq_len=L) for t in (cos, sin))
        # Sets are contiguous in window order (windows never cross a frame pair or a band).
        if sets is None:
            sets = tower_match_sets(visual, grid, self.match_units)
        units, set_units = pad_sets(x, sets.units)
        state = init_merge_state(units, set_units)
        valid = set_mask(set_units, units.shape[1])
        per_block: List[torch.Tensor] = []
        trims = self.trims_on(x.device)
        fullatt = set(getattr(visual, "fullatt_block_indexes", range(self.num_layers)))
        runs_full = segment_runs(cu_full)
        runs_window = runs_full if cu_window is None else segment_runs(cu_window)
        every = [x] if hidden_states else None
        tap_mergers = dict(zip(getattr(visual, "deepstack_visual_indexes", ()),
                               getattr(visual, "deepstack_merger_list", ())))
        taps = []
        for i, blk in enumerate(visual.blocks):
            runs = runs_full if (window_index is None or i in fullatt) else runs_window
            state = self._block(blk, state, valid, cos, sin, runs, i, unit, policy, trims)
            per_block.append(state.lengths)
            if hidden_states and i < self.num_layers - 1:
                every.append(_every_patch(state, valid, unit))
            if i in tap_mergers:  # the tap merger on the unique units at this block (exact: it is per unit)
                n, P = state.x.shape[:2]
                rows = tap_mergers[i](state.x.reshape(n * P * unit, C)).view(n, P, -1)
                index = state.pos_map.long().clamp_min(0)[..., None].expand(-1, -1, rows.shape[-1])
                taps.append(rows.gather(1, index))
        n, P = state.x.shape[:2]
        last = _every_patch(state, valid, unit)
        if hidden_states:
            last = tuple(every) + (last,)
        tokens = visual.merger(state.x.reshape(n * P * unit, C)).view(n, P, -1)
        to_raster = lambda t: t  # noqa: E731
        if window_index is not None:  # maps in raster unit order (the placeholders' order)
            def to_raster(t):
                flat = torch.empty_like(t[valid])
                flat[window_index.to(x.device)] = t[valid]
                return torch.zeros_like(t).masked_scatter(valid[..., None] if t.dim() == 3 else valid, flat)
        pos_map = to_raster(state.pos_map).masked_fill(~valid, -1)
        taps = [to_raster(t) for t in taps]
        return UnitOutput(MergeState(tokens, state.size, state.lengths, pos_map), last, per_block, sets, taps)

    def _embed(self, pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Patch embeddings ``[L, C]`` as the stock tower makes them: its
        ``patch_embed``, plus (Qwen3-VL) its learned position embeddings
        resampled to each grid, by transformers' own helper."""
        visual = self.visual
        x = visual.patch_embed(pixels.type(visual.dtype))
        if getattr(visual, "pos_embed", None) is not None:
            from transformers import vision_utils as vu

            index, weight = vu.get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
                align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
            x = x + (visual.pos_embed(index) * weight[:, :, None]).sum(1).to(x.dtype)
        return x

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
