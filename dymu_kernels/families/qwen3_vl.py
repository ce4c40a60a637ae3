"""Qwen3-VL (``model_type`` ``qwen3_vl``): a windowless ViT with learned
position embeddings and **deepstack** taps, a 2×2 patch merger, and a Qwen3
language model with interleaved M-RoPE.

Everything but deepstack is Qwen2-VL's (:mod:`.qwen2_vl`): DToMe on 2×2 units
inside the tower (:mod:`.qwen_vit`, which adds the tower's ``pos_embed`` as
the stock tower does) and/or rounds after the merger, per image and video
frame pair; the model's own M-RoPE positions (``compute_3d_position_ids``:
interleaved sections, videos as timestamped frames) and its own rotary tables.

**Deepstack.** After blocks ``deepstack_visual_indexes`` a tap merger turns
each unit into a language-model row, which the text model adds to the hidden
states after its decoder layers ``0 .. taps-1`` at the visual positions.
Under merging a tap sees the units as merged up to its block: its merger runs
on those unique units (exact: it is per unit), and each *final* unique token
gets, per tap, the mean over its original units
(:class:`~.qwen2_vl.QwenDToMe`). Those rows travel with the unique tokens
into the compact sequence (:attr:`~dymu_kernels.core.compact.MergedItems.extra`)
and reach the text model as its own ``visual_pos_masks`` /
``deepstack_visual_embeds`` (:func:`deepstack_inputs`). Nothing merged is
the unpatched model; the taps are never dropped.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .qwen2_vl import FAMILY as QWEN2_VL


def deepstack_inputs(inner, extra: torch.Tensor, visual: torch.Tensor) -> dict:
    """``Family.lm_inputs``: the deepstack rows of the compact sequence's
    visual rows (``extra [B, N_un, taps · D]``, ``visual [B, N_un]``) as the
    Qwen3-VL text model takes them: ``visual_pos_masks`` and one ``[V, D]``
    tensor per tap, rows in compact order (batch-major), as its
    ``_deepstack_process`` indexes them."""
    taps = len(inner.visual.deepstack_visual_indexes)
    return {"visual_pos_masks": visual, "deepstack_visual_embeds": list(extra[visual].chunk(taps, -1))}


def _feature_output():
    from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

    return BaseModelOutputWithDeepstackFeatures


FAMILY = replace(QWEN2_VL, model_type="qwen3_vl", class_name="Qwen3VLForConditionalGeneration",
                 lm_inputs=deepstack_inputs, feature_output=_feature_output)
