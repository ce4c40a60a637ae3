"""Qwen2.5-VL (``model_type`` ``qwen2_5_vl``): Qwen2-VL's layout, positions
and merge stages (:mod:`.qwen2_vl`) over a tower with 112-px windows and
full-attention blocks, which the in-tower stage (:mod:`.qwen_vit`) takes
from the tower itself (its window order and segments)."""

from __future__ import annotations

from dataclasses import replace

from .qwen2_vl import FAMILY as QWEN2_VL

FAMILY = replace(QWEN2_VL, model_type="qwen2_5_vl", class_name="Qwen2_5_VLForConditionalGeneration")
