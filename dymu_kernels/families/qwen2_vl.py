"""Qwen2-VL (``model_type`` ``qwen2_vl``): a windowless ViT with a 2×2
``PatchMerger``, and a Qwen2 language model with M-RoPE. Qwen2.5-VL
(:mod:`.qwen2_5_vl`) differs only in its tower (windows, RMSNorm, SwiGLU),
which this stage does not look into.

Where DToMe merges: the merger concatenates each 2×2 unit of four patches,
so merging acts on its *outputs* — the language model's visual tokens —
in DToMe rounds (:class:`~dymu_kernels.core.rounds.DToMeRounds`): per image,
and per video frame pair (one temporal slice of the grid). transformers' own
tower runs unchanged, so nothing merged is the unpatched model exactly.

Positions are the model's own (:class:`MRopePositions`): M-RoPE t/h/w
positions of the full (virtual) sequence from ``compute_3d_position_ids``,
or the caller's (``generate()`` passes ``[4, B, N]``: a text row, then t, h,
w). Placeholders per item are ``grid_thw.prod() // 4``, as the processor
inserts them.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..core.compact import MergedImages
from ..core.rounds import DToMeRounds
from .spec import Family, ItemCounts, Modality, Patch

# Arguments of a Qwen2-VL-type forward that only its vision side (and its positions) read.
VISION_KWARGS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "mm_token_type_ids",
                 "second_per_grid_ts")


def _three_axes(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The caller's positions as M-RoPE's ``[3, B, N]``: ``[B, N]`` (text
    positions on every axis), ``[3, B, N]``, or ``[4, B, N]`` (generate():
    a text row first)."""
    if position_ids.dim() == 2:
        return position_ids[None].expand(3, batch, -1)
    if position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4):
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: expected [B, N], [3, B, N] or "
                         "[4, B, N] (M-RoPE)")
    return position_ids[1:] if position_ids.shape[0] == 4 else position_ids


class MRopePositions:
    """M-RoPE positions ``[3, B, N]`` as the Qwen2-VL-type model makes them
    (:mod:`dymu_kernels.core.positions` protocol)."""

    def prompt(self, inner, position_ids: Optional[torch.Tensor], input_ids, embeds: torch.Tensor, attention_mask,
               vision_kwargs) -> torch.Tensor:
        B, N = embeds.shape[:2]
        if position_ids is not None:
            return _three_axes(position_ids, B)[..., -N:].to(embeds.device).long().clone()
        # The model's own rules (and its rope_deltas bookkeeping), over the full sequence.
        # (Qwen2-VL's takes no second_per_grid_ts; its processor makes none.)
        timing = {} if vision_kwargs.get("second_per_grid_ts") is None else \
            {"second_per_grid_ts": vision_kwargs["second_per_grid_ts"]}
        positions = inner.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=vision_kwargs.get("image_grid_thw"),
            video_grid_thw=vision_kwargs.get("video_grid_thw"), inputs_embeds=embeds, attention_mask=attention_mask,
            cache=None, mm_token_type_ids=vision_kwargs.get("mm_token_type_ids"), **timing)
        if positions is None:  # what the language model does without positions: 0..N-1 on every axis
            positions = torch.arange(N, device=embeds.device).expand(3, B, N)
        return positions.to(embeds.device).long().clone()

    def step(self, inner, previous: torch.Tensor, position_ids: Optional[torch.Tensor],
             embeds: torch.Tensor) -> torch.Tensor:
        B, T = embeds.shape[:2]
        if position_ids is not None:
            return _three_axes(position_ids, B)[..., -T:].to(previous.device).long()
        # As the model continues without positions (its rope_deltas): text after the largest position so far.
        start = previous.flatten(1).amax(1) + 1
        return (start[:, None] + torch.arange(T, device=previous.device)).expand(3, B, T)


def build_encoder(family, inner, thresholds, r, backend, trim):
    """``Family.build_encoder``: DToMe rounds on the merger's outputs.
    ``thresholds``: one per round; ``r``: merges per set (int: one round, or
    one per round)."""
    if r is None and isinstance(thresholds, str) and thresholds == "default":
        raise ValueError(
            f"no published thresholds for {family.class_name}: pass thresholds calibrated on your images, one per "
            "merge round after the patch merger (e.g. apply_dymu(model, [0.9, 0.85])), or r=N"
        )
    rounds = DToMeRounds(None if r is not None else thresholds, r=r, backend=backend, trim=trim)
    return rounds, None


def _encode(inner, patch: Patch, pixels: torch.Tensor, grid: Optional[torch.Tensor], modality: str):
    """The tower's tokens of every item, merged per frame pair, as
    :class:`~dymu_kernels.hf.outputs.DyMUImageOutputs` (one item per image /
    video, its placeholders in the processor's order)."""
    from ..hf.outputs import image_outputs

    if grid is None:
        raise ValueError(f"Qwen2-VL {modality}s need their {modality}_grid_thw (as the processor returns it)")
    visual = inner.visual
    out = visual(pixels.type(visual.dtype), grid_thw=grid)
    unit = visual.spatial_merge_size ** 2
    grid = grid.long()
    per_set = grid[:, 1] * grid[:, 2] // unit  # tokens per frame pair (images: one "pair")
    set_sizes = per_set.repeat_interleave(grid[:, 0]).tolist()  # one host read, as the unpatched split
    sets = torch.split(out.pooler_output, set_sizes)
    x = torch.nn.utils.rnn.pad_sequence(list(sets), batch_first=True)
    merged = patch.encoder(x, torch.tensor(set_sizes, device=x.device))
    patch.counts[modality] = ItemCounts(merged.lengths, merged.tokens_per_layer, set_sizes)
    sets_per_item = grid[:, 0].tolist()
    placeholders = (grid.prod(-1) // unit).tolist()
    if all(t == 1 for t in sets_per_item):  # images: one set per item
        slots = merged.pos_map.long().masked_fill(~_valid(set_sizes, merged.pos_map.shape[1], x.device), -1)
        items = MergedImages(merged.features, merged.lengths.long(), slots)
    else:  # a video item joins its frame pairs: unique rows in order, maps offset
        uniques, maps, s = [], [], 0
        for t in sets_per_item:
            counts = merged.lengths[s:s + t].long()
            offsets = torch.cumsum(counts, 0) - counts
            uniques.append(torch.cat([merged.features[s + j, : int(counts[j])] for j in range(t)]))
            maps.append(torch.cat([merged.pos_map[s + j, : set_sizes[s + j]].long() + offsets[j] for j in range(t)]))
            s += t
        items = MergedImages.stack(uniques, maps)
    lengths = None if len(set(placeholders)) == 1 else placeholders
    return image_outputs(items, lengths, last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states)


def _valid(sizes, capacity: int, device) -> torch.Tensor:
    return torch.arange(capacity, device=device)[None] < torch.tensor(sizes, device=device)[:, None]


def encode_images(inner, patch: Patch, pixel_values, dtype, vision_kwargs):
    return _encode(inner, patch, pixel_values, vision_kwargs.get("image_grid_thw"), "image")


def encode_videos(inner, patch: Patch, pixel_values_videos, dtype, vision_kwargs):
    return _encode(inner, patch, pixel_values_videos, vision_kwargs.get("video_grid_thw"), "video")


def patched_image_features(self, patch: Patch, modality: Modality, pixel_values, image_grid_thw=None,
                           return_dict=True, **kwargs):
    """``get_image_features`` of a patched instance: the merged images in
    transformers' output type (``generate()`` hands over the parameters it
    finds by name: ``pixel_values``, ``image_grid_thw``)."""
    from ..hf.patch import merged_features

    return merged_features(self, patch, modality, pixel_values, {"image_grid_thw": image_grid_thw}, return_dict)


def patched_video_features(self, patch: Patch, modality: Modality, pixel_values_videos, video_grid_thw=None,
                           return_dict=True, **kwargs):
    """``get_video_features`` of a patched instance (see :func:`patched_image_features`)."""
    from ..hf.patch import merged_features

    return merged_features(self, patch, modality, pixel_values_videos, {"video_grid_thw": video_grid_thw},
                           return_dict)


def modalities():
    return (Modality("image", "image_token_id", "pixel_values", "get_image_features", encode_images,
                     patched_image_features),
            Modality("video", "video_token_id", "pixel_values_videos", "get_video_features", encode_videos,
                     patched_video_features))


def _output_class():
    from transformers.modeling_outputs import MultimodalBaseModelOutputWithPast

    return MultimodalBaseModelOutputWithPast


FAMILY = Family(
    model_type="qwen2_vl",
    class_name="Qwen2VLForConditionalGeneration",
    modalities=modalities(),
    output_class=_output_class,
    default_thresholds=None,  # none published: calibrate, or r=N
    build_encoder=build_encoder,
    vision_kwargs=VISION_KWARGS,
    tower_attr="visual",
    positions=MRopePositions(),
)
