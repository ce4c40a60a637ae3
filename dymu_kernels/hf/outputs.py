"""The image features a DyMU-patched LLaVA hands to transformers (imports transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..core.compact import MergedItems
from ..families.spec import Encoded


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

    ``last_hidden_state`` and ``hidden_states`` are the vision tower's, in
    transformers' shapes (``[n, N0, C_vis]``: every crop / frame, all its
    tokens, CLS included), with each token carrying its merged token:

    - ``last_hidden_state``: the output of the tower DyMU runs, which ends at
      the block ``vision_feature_layer`` selects (SigLIP: after its
      ``post_layernorm``). With ``vision_feature_layer=-1`` (LLaVA-OneVision)
      that is transformers' value; LLaVA-1.5's ``-2`` stops one block before the
      last, which transformers computes and DyMU does not.
    - ``hidden_states``: ``L + 1`` entries (embeddings, then each block); by
      default only the selected block's, the others None — as transformers'
      ``get_image_features`` returns them; every entry with
      ``output_hidden_states=True`` (the blocks after the selected one then
      run on the merged tokens, without merging, for this call only).
    """

    merged_features: Optional[torch.Tensor] = None  # [n_img, U_cap, C] projected unique tokens
    merged_counts: Optional[torch.Tensor] = None  # [n_img] unique tokens per image
    merged_slots: Optional[torch.Tensor] = None  # [n_img, P] unique token of each placeholder
    merged_extra: Optional[torch.Tensor] = None  # [n_img, U_cap, E] more rows per unique token (MergedItems.extra)
    # Qwen3-VL: per deepstack tap, per item, one row per placeholder (its group's tap row), as transformers'
    # BaseModelOutputWithDeepstackFeatures holds them; None for families without deepstack.
    deepstack_features: Optional[list] = None
    image_rows: Optional[tuple] = None  # the pooler_output tensors as encoded, in image order

    def merged_items(self) -> MergedItems:
        """The merged images in ``pooler_output`` order (after any repetition)."""
        index = {id(t): i for i, t in enumerate(self.image_rows)}
        order = [index.get(id(t)) for t in self.pooler_output]
        if None in order:
            raise ValueError(
                "image features were changed after the DyMU-patched get_image_features encoded them (re-sliced, e.g. "
                "by prefill chunking, or rebuilt); pass pixel_values, or the unchanged output"
            )
        images = MergedItems(self.merged_features, self.merged_counts, self.merged_slots, self.merged_extra)
        return images if order == list(range(len(self.image_rows))) else images.select(order)


def image_outputs(encoded: Encoded) -> DyMUImageOutputs:
    """A family's :class:`~dymu_kernels.families.Encoded` in transformers'
    output type: ``pooler_output`` holds, per item, one row per placeholder
    (its unique token's features), as transformers expects; the tower's
    hidden states as the family gave them."""
    merged = encoded.items
    rows = tuple(encoded.rows())
    return DyMUImageOutputs(last_hidden_state=encoded.last_hidden_state, pooler_output=list(rows),
                            hidden_states=encoded.hidden_states, merged_features=merged.features,
                            merged_counts=merged.counts, merged_slots=merged.slots, merged_extra=merged.extra,
                            image_rows=rows, **encoded.outputs)
