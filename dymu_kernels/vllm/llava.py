"""vLLM's LLaVA-1.5 and LLaVA-OneVision classes with DyMU (see :mod:`.model`).

Each class is vLLM's own (its processor, weight names, language model) with
:class:`~.model.DyMUServing` mixed in; only ``embed_multimodal`` is
family-specific: it reads vLLM's parsed inputs and hands the pixels to the
family's encoding in the package (:mod:`dymu_kernels.integrations`).
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration

from .model import DyMUServing


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


class DyMULlavaOnevisionForConditionalGeneration(DyMUServing, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision (SigLIP tower, AnyRes images, pooled video frames,
    Qwen2) with DyMU when ``config.dymu`` asks for it. Every image is packed
    with AnyRes, as vLLM's processor counts its placeholders (transformers
    skips AnyRes in multi-image prompts; vLLM does not)."""

    dymu_family = "llava_onevision"
    dymu_tower = "SiglipVisionModel"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._dymu_setup(vllm_config)

    def embed_multimodal(self, **kwargs):
        if self.dymu is None:
            return super().embed_multimodal(**kwargs)
        items = ()
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if modality == "image":
                pixels = _pixels(inputs, "pixel_values")
                if isinstance(pixels, (list, tuple)):  # [crops_i, 3, H, W] per image
                    pixels = torch.cat(list(pixels))
                sizes = inputs.get("image_sizes")
                if sizes is None:
                    raise ValueError("LLaVA-OneVision images need image_sizes (vLLM's processor sends them)")
                items += tuple(self._dymu_encode("image", pixels, {"image_sizes": sizes}))
            elif modality == "video":
                videos = _pixels(inputs, "pixel_values_videos")
                if isinstance(videos, torch.Tensor):
                    items += tuple(self._dymu_encode("video", videos, {}))
                else:  # videos of different lengths: one at a time
                    for v in videos:
                        items += tuple(self._dymu_encode("video", v[None], {}))
        return items
