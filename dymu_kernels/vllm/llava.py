"""vLLM's LLaVA classes with DyMU (see :mod:`.model`).

LLaVA-1.5 and LLaVA-OneVision are vLLM's own classes (processors, weight
names, language models) with :class:`~.model.DyMUServing` mixed in; only
``embed_multimodal`` is family-specific: it reads vLLM's parsed inputs and
hands the pixels to the family's encoding in the package
(:mod:`dymu_kernels.families`) — for OneVision, AnyRes crops packed on maps
and video frames pooled on maps, as transformers' ``apply_dymu`` does.

What a client sends is checked while vLLM processes the request (an error
there is that request's 4xx), never in the engine step (where it would stop
the engine): vLLM's own parsing refuses image embeddings (the plugin refuses
``--enable-mm-embeds`` at load, :mod:`.engine_checks`), and the plugin's
processors (:mod:`.processors`) check the pixels the image processor made —
per-request ``mm_processor_kwargs`` can change their size and crops — with
the schemas vLLM's classes check them with in ``embed_multimodal``.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (LlavaForConditionalGeneration, LlavaImagePixelInputs,
                                              LlavaMultiModalProcessor)
from vllm.model_executor.models.llava_onevision import (LlavaOnevisionForConditionalGeneration,
                                                        LlavaOnevisionImagePixelInputs,
                                                        LlavaOnevisionMultiModalProcessor,
                                                        LlavaOnevisionVideoPixelInputs)

from .model import DyMUServing
from .processors import CheckedPixels, register_checked_processor

# vLLM sizes a OneVision image's placeholders, and packs its crops, at "anyres_max_9" whatever the
# config's vision_aspect_ratio says (its processing info and _merge_image_patch_embeddings both do).
VLLM_ONEVISION_ASPECT = "anyres_max_9"


def _pixels(inputs, key: str):
    # Runs in the engine step, where a raise kills the engine, so no client input may reach it: vLLM's
    # processors yield "image_embeds" only under enable_mm_embeds (refused at load by
    # engine_checks.unsupported_settings, and vLLM answers an image_embeds request 400 without it) and
    # "pixel_values_pixtral" only for a Pixtral tower (refused at load by DyMUServing._transformers_tower).
    if inputs["type"] != key:
        raise RuntimeError(f"DyMU got {inputs['type']!r} inputs, which the load-time checks exclude "
                           "(enable_mm_embeds / --enable-mm-embeds, non-CLIP towers): precomputed embeddings cannot "
                           "be merged")
    return inputs[key]


def _tower_size(config):
    size = config.vision_config.image_size
    return {"h": size, "w": size}


class DyMULlavaMultiModalProcessor(CheckedPixels, LlavaMultiModalProcessor):
    """vLLM's LLaVA-1.5 processor, checking the pixels of each request it processes."""

    def check_pixels(self, out, config, hf_kwargs) -> None:
        if out.get("pixel_values") is not None:
            LlavaImagePixelInputs(type="pixel_values", pixel_values=out["pixel_values"],
                                  resolve_bindings=_tower_size(config))


class DyMULlavaOnevisionMultiModalProcessor(CheckedPixels, LlavaOnevisionMultiModalProcessor):
    """vLLM's LLaVA-OneVision processor, checking the crop size of each
    request's images and video frames. (A request cannot change the AnyRes
    grid: vLLM refuses list-valued ``image_grid_pinpoints`` and transformers
    tuple-valued ones.)"""

    def check_pixels(self, out, config, hf_kwargs) -> None:
        if out.get("pixel_values") is not None:
            LlavaOnevisionImagePixelInputs(type="pixel_values", pixel_values=out["pixel_values"],
                                           image_sizes=out.get("image_sizes"), resolve_bindings=_tower_size(config))
        if out.get("pixel_values_videos") is not None:
            LlavaOnevisionVideoPixelInputs(type="pixel_values_videos", pixel_values_videos=out["pixel_values_videos"],
                                           resolve_bindings=_tower_size(config))


@register_checked_processor(LlavaForConditionalGeneration, DyMULlavaMultiModalProcessor)
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


@register_checked_processor(LlavaOnevisionForConditionalGeneration, DyMULlavaOnevisionMultiModalProcessor)
class DyMULlavaOnevisionForConditionalGeneration(DyMUServing, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision (SigLIP tower, AnyRes, Qwen2) with DyMU when
    ``config.dymu`` asks for it. Images are laid out as vLLM lays them out:
    every image with all its AnyRes crops (transformers gives each image of a
    multi-image prompt its base crop only), at ``anyres_max_9``."""

    dymu_family = "llava_onevision"
    dymu_tower = "SiglipVisionModel"

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._dymu_setup(vllm_config)

    def embed_multimodal(self, **kwargs):
        if self.dymu is None:
            return super().embed_multimodal(**kwargs)
        items = []
        for modality, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # vLLM's order
            if modality == "image":
                vision_kwargs = {"image_sizes": parsed.get("image_sizes"), "vision_aspect_ratio": VLLM_ONEVISION_ASPECT}
                items += self._dymu_encode("image", _pixels(parsed, "pixel_values"), vision_kwargs)
            else:
                items += self._dymu_encode("video", _pixels(parsed, "pixel_values_videos"), {})
        return items
