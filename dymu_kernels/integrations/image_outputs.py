"""The image features a DyMU-patched LLaVA hands to transformers (imports transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .compact import MergedImages


@dataclass
class DyMUImageOutputs(BaseModelOutputWithPooling):
    """What the patched ``get_image_features`` returns: transformers' own type.

    ``pooler_output`` is, as in the unpatched model, one ``[P, C]`` tensor per
    image with one row per placeholder — here each placeholder's merged token
    (the virtually unmerged image). The merged tokens themselves travel in
    the ``merged_*`` fields; when ``generate()`` repeats images for beams or
    ``num_return_sequences`` it repeats the ``pooler_output`` tensors
    themselves, and the patched forward finds each one's merged image by
    identity (``image_rows`` keeps the original order).
    """

    merged_features: Optional[torch.Tensor] = None  # [n_img, U_cap, C] projected unique tokens
    merged_counts: Optional[torch.Tensor] = None  # [n_img] unique tokens per image
    merged_slots: Optional[torch.Tensor] = None  # [n_img, P] unique token of each placeholder
    image_rows: Optional[tuple] = None  # the pooler_output tensors as encoded, in image order

    def merged_images(self) -> MergedImages:
        """The merged images in ``pooler_output`` order (after any repetition)."""
        index = {id(t): i for i, t in enumerate(self.image_rows)}
        order = [index.get(id(t)) for t in self.pooler_output]
        if None in order:
            raise ValueError(
                "image features were changed after the DyMU-patched get_image_features encoded them (re-sliced, e.g. "
                "by prefill chunking, or rebuilt); pass pixel_values, or the unchanged output"
            )
        images = MergedImages(self.merged_features, self.merged_counts, self.merged_slots)
        return images if order == list(range(len(self.image_rows))) else images.select(order)


def image_outputs(merged: MergedImages, lengths: Optional[List[int]] = None) -> DyMUImageOutputs:
    """The output for merged items: ``pooler_output`` holds, per item, one row
    per placeholder (its unique token's features), as transformers expects.
    ``lengths``: each item's placeholder count when they differ (None: all
    items fill the whole slot map — no host read needed)."""
    slots = merged.slots.clamp_min(0) if lengths is not None else merged.slots
    expanded = merged.features.gather(1, slots[..., None].expand(-1, -1, merged.features.shape[-1]))
    rows = tuple(expanded.unbind(0)) if lengths is None else tuple(expanded[i, :p] for i, p in enumerate(lengths))
    return DyMUImageOutputs(pooler_output=list(rows), merged_features=merged.features, merged_counts=merged.counts,
                            merged_slots=merged.slots, image_rows=rows)
