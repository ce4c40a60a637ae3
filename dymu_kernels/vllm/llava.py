"""vLLM's LLaVA classes with DyMU (see :mod:`.model`).

LLaVA-1.5 is vLLM's own class (its processor, weight names, language model)
with :class:`~.model.DyMUServing` mixed in; only ``embed_multimodal`` is
family-specific: it reads vLLM's parsed inputs and hands the pixels to the
family's encoding in the package (:mod:`dymu_kernels.integrations`).
LLaVA-OneVision refuses DyMU for now (see its class).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

from .engine_checks import UNVERIFIED
from .model import DyMUServing
from .settings import settings_from_config


def _pixels(inputs, key: str):
    if inputs["type"] not in ("pixel_values", "pixel_values_videos"):
        raise ValueError("DyMU merges inside the vision tower: precomputed embeddings cannot be merged; send "
                         "pixels, or serve without the 'dymu' config entry")
    return inputs[key]


class DyMULlavaForConditionalGeneration(DyMUServing, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 (CLIP tower, Llama) with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "llava"
    dymu_tower = "CLIPVisionModel"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._dymu_setup(vllm_config)

    def embed_multimodal(self, **kwargs):
        if self.dymu is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        pixels = _pixels(image_input, "pixel_values")
        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack(list(pixels))
        return self._dymu_encode("image", pixels, {})


class DyMULlavaOnevisionForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision, which refuses a ``dymu`` config entry at load
    time instead of serving without DyMU: its serving path is not verified
    yet (vLLM builds OneVision's processor with transformers' video processor,
    which needs torchvision, absent from the CPU environment the plugin is
    tested in). Without the entry it is vLLM's class unchanged."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        if settings_from_config(vllm_config.model_config.hf_config) is not None:
            raise ValueError(UNVERIFIED["LlavaOnevisionForConditionalGeneration"])
        super().__init__(vllm_config=vllm_config, prefix=prefix)
