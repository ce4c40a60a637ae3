"""vLLM's LLaVA classes with DyMU (see :mod:`.model`).

LLaVA-1.5 is vLLM's own class (its processor, weight names, language model)
with :class:`~.model.DyMUServing` mixed in; only ``embed_multimodal`` is
family-specific: it reads vLLM's parsed inputs and hands the pixels to the
family's encoding in the package (:mod:`dymu_kernels.families`).
LLaVA-OneVision refuses DyMU for now (see its class).

What a client sends is checked while vLLM processes the request (an error
there is that request's 4xx), never in the engine step (where it would stop
the engine): vLLM's own parsing refuses image embeddings (the plugin refuses
``--enable-mm-embeds`` at load, :mod:`.engine_checks`), and
:class:`DyMULlavaMultiModalProcessor` checks the pixels its image processor
made — per-request ``mm_processor_kwargs`` can change their size — with the
schema vLLM's LLaVA checks them with in ``embed_multimodal``.
"""

from __future__ import annotations

import torch
from vllm.model_executor.models.llava import (LlavaForConditionalGeneration, LlavaImagePixelInputs,
                                              LlavaMultiModalProcessor)
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.multimodal import MULTIMODAL_REGISTRY

from .engine_checks import UNVERIFIED
from .model import DyMUServing
from .settings import settings_from_config


def _pixels(inputs, key: str):
    # Runs in the engine step, where a raise kills the engine, so no client input may reach it: vLLM's
    # processor yields "image_embeds" only under enable_mm_embeds (refused at load by
    # engine_checks.unsupported_settings, and vLLM answers an image_embeds request 400 without it) and
    # "pixel_values_pixtral" only for a Pixtral tower (refused at load by DyMUServing._dymu_setup).
    if inputs["type"] not in ("pixel_values", "pixel_values_videos"):
        raise RuntimeError(f"DyMU got {inputs['type']!r} inputs, which the load-time checks exclude "
                           "(enable_mm_embeds / --enable-mm-embeds, non-CLIP towers): precomputed embeddings cannot "
                           "be merged")
    return inputs[key]


class DyMULlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """vLLM's LLaVA-1.5 processor, checking the pixels of each request it processes."""

    def _call_hf_processor(self, hf_data, hf_kwargs):
        out = super()._call_hf_processor(hf_data, hf_kwargs)
        pixels = out.get("pixel_values")
        if pixels is not None:
            size = self.info.get_hf_config().vision_config.image_size
            try:
                LlavaImagePixelInputs(type="pixel_values", pixel_values=pixels, resolve_bindings={"h": size, "w": size})
            except ValueError as e:
                raise ValueError(f"the image processor made pixels the vision tower cannot take (check the "
                                 f"request's mm_processor_kwargs): {e}") from None
        return out


_STOCK = LlavaForConditionalGeneration._processor_factory  # vLLM's processor factories for its LLaVA class


def _processor(info, dummy_inputs):
    """vLLM's processor for the checkpoint; LLaVA-1.5's checked one when DyMU is on."""
    processor = _STOCK.processor(info, dummy_inputs)
    if type(processor) is LlavaMultiModalProcessor and settings_from_config(info.ctx.model_config.hf_config):
        return DyMULlavaMultiModalProcessor(info, dummy_inputs)
    return processor


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_STOCK.info, dummy_inputs=_STOCK.dummy_inputs)
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
