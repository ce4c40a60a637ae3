"""The image features a DyMU-patched LLaVA hands to transformers (imports transformers)."""

from __future__ import annotations

import functools
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


# DyMU's own fields: attributes after transformers' keys, never in the tuple of return_dict=False.
_DYMU_FIELDS = ("merged_features", "merged_counts", "merged_slots", "merged_extra", "image_rows")


@functools.lru_cache(maxsize=None)
def output_type(stock: type) -> type:
    """The output class of a patched encoding method whose unpatched one
    returns ``stock``: a subclass of both ``stock`` and
    :class:`DyMUImageOutputs` (``isinstance`` holds for either), with
    ``stock``'s fields first (Qwen3-VL: ``deepstack_features``)."""
    if issubclass(DyMUImageOutputs, stock):
        return DyMUImageOutputs
    cls = dataclass(type(f"DyMU{stock.__name__}", (DyMUImageOutputs, stock),
                         {"__module__": __name__, "__qualname__": f"DyMU{stock.__name__}",
                          "__doc__": f"{stock.__name__} with DyMU's merged items (see DyMUImageOutputs)."}))
    globals()[cls.__name__] = cls  # picklable by name
    return cls


def image_outputs(encoded: Encoded, family) -> DyMUImageOutputs:
    """A family's :class:`~dymu_kernels.families.Encoded` in transformers'
    output type (``family.feature_output``'s, with DyMU's fields):
    ``pooler_output`` holds, per item, one row per placeholder (its unique
    token's features) in the family's sequence type; the tower's hidden
    states as the family gave them. Keys come in the unpatched method's
    order — its constructor's fields, then ``hidden_states``, which
    transformers' towers record after building their output — and DyMU's
    own fields last."""
    stock = family.feature_output() if family.feature_output is not None else BaseModelOutputWithPooling
    merged = encoded.items
    rows = tuple(encoded.rows())
    out = output_type(stock)(last_hidden_state=encoded.last_hidden_state, pooler_output=family.feature_items(rows),
                             **encoded.outputs)
    if encoded.hidden_states is not None:
        out.hidden_states = encoded.hidden_states
    for name, value in zip(_DYMU_FIELDS, (merged.features, merged.counts, merged.slots, merged.extra, rows)):
        setattr(out, name, value)
    return out


def stock_tuple(out: DyMUImageOutputs) -> tuple:
    """``return_dict=False``: the unpatched method's tuple (transformers' keys only, in order)."""
    return tuple(value for key, value in out.items() if key not in _DYMU_FIELDS)
