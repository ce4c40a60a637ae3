"""Qwen2-VL (``model_type`` ``qwen2_vl``): a windowless ViT with a 2×2
``PatchMerger``, and a Qwen2 language model with M-RoPE. Qwen2.5-VL
(:mod:`.qwen2_5_vl`) differs only in its tower (windows, RMSNorm, SwiGLU),
which :mod:`.qwen_vit` reads from the tower itself.

Where DToMe merges: the merger concatenates each 2×2 unit of four patches,
so merging acts on whole units, per image and per video frame pair (one
temporal slice of the grid), in two stages (either or both,
:class:`QwenDToMe`): inside the tower (:mod:`.qwen_vit`: every block on
unique units, attention expanded to every patch; saves the tower and the
language model) and after the merger (DToMe rounds on its outputs,
:class:`~dymu_kernels.core.rounds.DToMeRounds`). Nothing merged is the
unpatched model.

Positions are the model's own (:class:`MRopePositions`): M-RoPE t/h/w
positions of the full (virtual) sequence from ``compute_3d_position_ids``,
or the caller's (``generate()`` passes ``[4, B, N]``: a text row, then t, h,
w). Placeholders per item are ``grid_thw.prod() // 4``, as the processor
inserts them.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..core.compact import MergedItems
from ..core.positions import MRopePositions
from ..core.rounds import ROUNDS, DToMeRounds
from ..core.thresholds import MergeArguments, Stage
from ..ops.segment import segment_mean
from ..reference.dtome import init_merge_state
from . import qwen_vit
from .qwen_vit import QwenUnitDToMe, pad_sets, set_mask, tower_match_sets
from .spec import Encoded, Family, ItemCounts, Modality, Patch

# Arguments of a Qwen2-VL-type forward that only its vision side (and its positions) read.
VISION_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                 "second_per_grid_ts")


class QwenDToMe:
    """The two DToMe stages of a Qwen2-VL-type model, either or both:
    ``vit`` (:class:`~.qwen_vit.QwenUnitDToMe`: inside the tower, on 2×2
    units; what saves the tower) and ``rounds``
    (:class:`~dymu_kernels.core.rounds.DToMeRounds`: on the merger's
    outputs, continuing from the tower's merge state). Both match within the
    same sets (:func:`~.qwen_vit.match_sets`: an image or frame pair, or its
    bands beyond ``match_units`` units)."""

    def __init__(self, vit, rounds, match_units: int):
        self.vit, self.rounds, self.match_units = vit, rounds, match_units
        self.thresholds = (None if vit is None else vit.thresholds, None if rounds is None else rounds.thresholds)
        self.r = None if vit is None else vit.r  # (fixed r merges inside the tower only)
        self.trim = (vit or rounds).trim

    def __call__(self, visual, pixels: torch.Tensor, grid: torch.Tensor, hidden_states: bool = False):
        """``(merge state over each set's original units in raster order,
        the tower's hidden states (:class:`~.qwen_vit.UnitOutput`), the
        tokens left after each block / round, the sets, the deepstack rows)``.
        Deepstack (Qwen3-VL; None for towers without taps): per final unique
        token, each tap's mean over the token's original units,
        ``[n, U_cap, taps · D]`` (tap after tap)."""
        sets = tower_match_sets(visual, grid, self.match_units)
        if self.vit is not None:
            state, tower, per_layer, _, taps = self.vit(pixels, grid, sets=sets, hidden_states=hidden_states)
        else:  # transformers' own tower, then the rounds on its outputs (raster order)
            out = visual(pixels.type(visual.dtype), grid_thw=grid, output_hidden_states=hidden_states)
            tokens, set_units = pad_sets(out.pooler_output, sets.units)
            tower = out.hidden_states if hidden_states else out.last_hidden_state
            state, per_layer = init_merge_state(tokens, set_units), []
            taps = [pad_sets(t, sets.units)[0] for t in getattr(out, "deepstack_features", None) or ()]
        if self.rounds is not None:
            state, per_round = self.rounds.merge(state)
            per_layer = per_layer + per_round
        extra = None
        if taps:  # a group's taps: the mean over its original units (the language model adds one row per group)
            groups = state.pos_map.long().masked_fill(~set_mask(state.lengths.new_tensor(sets.units),
                                                                 state.pos_map.shape[1]), -1)
            extra = torch.cat([segment_mean(t, groups, state.x.shape[1]) for t in taps], -1)
        return state, tower, per_layer, sets, extra


def stages(config, visual) -> Tuple[Stage, ...]:
    """``Family.stages``: ``vit`` — inside the tower, one threshold (or ``r``)
    per vision block, merging 2×2 units — and ``merger`` — rounds on the patch
    merger's outputs, one threshold per round, any number of rounds.
    ``thresholds`` as a list / file is the ``vit`` stage; ``{"vit": ...,
    "merger": ...}`` gives either or both."""
    return (qwen_vit.vit_stage(visual), ROUNDS)


def build_encoder(config, visual, merge: MergeArguments, backend: str, trim):
    """``Family.build_encoder``: the DToMe stages asked for (:func:`stages`)."""
    vit = None
    if merge.thresholds["vit"] is not None or merge.r is not None:
        vit = QwenUnitDToMe(visual, merge.thresholds["vit"], r=merge.r, backend=backend, trim=trim,
                            match_units=qwen_vit.MATCH_UNITS)
    rounds = None
    if merge.thresholds["merger"] is not None:
        rounds = DToMeRounds(merge.thresholds["merger"], backend=backend, trim=trim)
    if vit is None and rounds is None:  # thresholds=None: the tower as it is
        vit = QwenUnitDToMe(visual, None, backend=backend, trim=trim, match_units=qwen_vit.MATCH_UNITS)
    return QwenDToMe(vit, rounds, qwen_vit.MATCH_UNITS), None  # both stages match within the same sets


def _encode(inner, patch: Patch, pixels: torch.Tensor, grid: Optional[torch.Tensor], modality: str, vision_kwargs):
    """Every item's merged tokens (images; videos per frame pair):
    :class:`~.spec.Encoded` with one item per image / video, its
    placeholders in the processor's order; the tower's hidden states at
    every patch as the stock tower gives them (all of them with
    ``output_hidden_states``)."""
    if grid is None:
        raise ValueError(f"Qwen2-VL {modality}s need their {modality}_grid_thw (as the processor returns it)")
    visual = inner.visual
    grid = grid.long()
    wanted = vision_kwargs.get("output_hidden_states")
    wanted = bool(visual.config.output_hidden_states if wanted is None else wanted)
    merged, tower, per_layer, sets, extra = patch.encoder(visual, pixels, grid, hidden_states=wanted)
    counts = merged.lengths.long()
    patch.counts[modality] = ItemCounts(*_per_frame(sets, counts, per_layer), sets.frame_units)
    placeholders = (grid.prod(-1) // visual.spatial_merge_size ** 2).tolist()
    valid = set_mask(counts.new_tensor(sets.units), merged.pos_map.shape[1])
    C = merged.x.shape[-1]
    rows = merged.x if extra is None else torch.cat([merged.x, extra.to(merged.x)], -1)  # deepstack rows travel along
    if all(n == 1 for n in sets.items):  # one set per item (images below the band size)
        items = MergedItems(rows, counts, merged.pos_map.long().masked_fill(~valid, -1))
    else:  # an item joins its sets (frame pairs, bands): unique rows in order, maps offset (no per-set loop)
        per_item = counts.new_tensor(sets.items)
        first_set = torch.cumsum(per_item, 0) - per_item
        set_start = torch.cumsum(counts, 0) - counts  # over all sets
        item_of_set = torch.repeat_interleave(torch.arange(len(per_item), device=counts.device), per_item)
        offset = set_start - set_start[first_set][item_of_set]  # a set's first unique row within its item
        unique_rows = rows[torch.arange(rows.shape[1], device=counts.device)[None] < counts[:, None]]
        slot_maps = (merged.pos_map.long() + offset[:, None])[valid]
        per_row = torch.zeros(len(per_item), dtype=torch.long, device=counts.device).index_add_(0, item_of_set, counts)
        items = MergedItems.stack(torch.split(unique_rows, per_row.tolist()), torch.split(slot_maps, placeholders))
    if extra is not None:
        items = MergedItems(items.features[..., :C], items.counts, items.slots, items.features[..., C:])
    lengths = None if len(set(placeholders)) == 1 else placeholders
    hidden = dict(last_hidden_state=tower[-1], hidden_states=tower) if wanted else dict(last_hidden_state=tower)
    encoded = Encoded(items, lengths, **hidden)
    if extra is not None:  # transformers' deepstack_features: per tap, per item, each placeholder's group row
        taps = items.extra.chunk(len(visual.deepstack_visual_indexes), -1)
        encoded.outputs["deepstack_features"] = [tuple(encoded.rows(t)) for t in taps]
    return encoded


def _per_frame(sets, kept: torch.Tensor, per_layer):
    """Token counts per image / video frame pair (``dymu_stats``' items):
    the sums over its bands (:func:`~.qwen_vit.match_sets`)."""
    if len(sets.frames) == len(sets.units):
        return kept, per_layer
    frame = torch.repeat_interleave(torch.arange(len(sets.frames), device=kept.device), kept.new_tensor(sets.frames))

    def total(n: torch.Tensor) -> torch.Tensor:
        return n.new_zeros(len(sets.frames)).index_add_(0, frame, n)

    return total(kept), [total(n) for n in per_layer]


def encode_images(inner, patch: Patch, pixel_values, dtype, vision_kwargs):
    return _encode(inner, patch, pixel_values, vision_kwargs.get("image_grid_thw"), "image", vision_kwargs)


def encode_videos(inner, patch: Patch, pixel_values_videos, dtype, vision_kwargs):
    return _encode(inner, patch, pixel_values_videos, vision_kwargs.get("video_grid_thw"), "video", vision_kwargs)


def modalities():
    return (Modality("image", "image_token_id", "pixel_values", "get_image_features", encode_images),
            Modality("video", "video_token_id", "pixel_values_videos", "get_video_features", encode_videos))


def _output_class():
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

    return MultimodalBaseModelOutputWithPast


FAMILY = Family(
    model_type="qwen2_vl",
    class_name="Qwen2VLForConditionalGeneration",
    modalities=modalities(),
    output_class=_output_class,
    default_thresholds=None,  # none published: calibrate, or r=N
    stages=stages,
    build_encoder=build_encoder,
    vision_kwargs=VISION_KWARGS,
    tower_attr="visual",
    positions=MRopePositions(),
    feature_items=tuple,
)
