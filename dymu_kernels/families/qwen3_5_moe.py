"""Qwen3.5-MoE (``model_type`` ``qwen3_5_moe``): Qwen3.5's tower and hybrid
language model (:mod:`.qwen3_5`: Gated DeltaNet and gated full attention
under VTU) with mixture-of-experts MLPs, whose routing, experts and shared
expert are per token and so run on the unique rows like every other
token-wise layer; its ``router_logits`` come back at the full positions."""

from __future__ import annotations

from dataclasses import replace

from .qwen3_5 import FAMILY as QWEN3_5


def _output_class():
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeBaseModelOutputWithPast

    return Qwen3_5MoeBaseModelOutputWithPast  # with the text model's router_logits


FAMILY = replace(QWEN3_5, model_type="qwen3_5_moe", class_name="Qwen3_5MoeForConditionalGeneration",
                 output_class=_output_class)
