"""Qwen3-VL-MoE (``model_type`` ``qwen3_vl_moe``): Qwen3-VL's tower, deepstack
and positions (:mod:`.qwen3_vl`) with a mixture-of-experts text model, whose
routing is per token and so runs on the unique rows like every other
token-wise layer; its ``router_logits`` come back at the full positions (the
load-balancing loss then counts each position, as without DyMU)."""

from __future__ import annotations

from dataclasses import replace

from .qwen3_vl import FAMILY as QWEN3_VL



def _output_class():
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeBaseModelOutputWithPast

    return Qwen3VLMoeBaseModelOutputWithPast  # with the text model's router_logits


def _feature_output():
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import BaseModelOutputWithDeepstackFeatures

    return BaseModelOutputWithDeepstackFeatures  # the module's own copy of Qwen3-VL's class


FAMILY = replace(QWEN3_VL, model_type="qwen3_vl_moe", class_name="Qwen3VLMoeForConditionalGeneration",
                 output_class=_output_class, feature_output=_feature_output)
