"""vLLM's Qwen2.5-VL and Qwen2-VL classes with DyMU (see :mod:`.model`).

vLLM's own classes (processor, M-RoPE positions, weight names, Qwen2
language model) with :class:`~.model.DyMUServing` mixed in. The tower is
transformers' Qwen vision tower over the checkpoint's ``visual.*`` weights,
run by the family's DToMe stages (:mod:`dymu_kernels.families.qwen2_vl`:
inside the tower on 2×2 units and/or rounds after the patch merger) — the
same code :func:`~dymu_kernels.hf.apply_dymu` runs. vLLM computes the M-RoPE
positions of every placeholder itself (the placeholder count is fixed before
the tower runs), and its rotary embedding rotates each expanded row at its
own position (:mod:`.layers`).

What a client sends is checked while vLLM processes the request: vLLM's
processor makes the pixels and grids (any size its ``min_pixels`` /
``max_pixels`` allow, which the DToMe stages take: large images match in
bands); image and video embeddings are refused at load
(``--enable-mm-embeds``, :mod:`.engine_checks`).
"""

from __future__ import annotations

from typing import Dict, List

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

from .model import DyMUServing

# vLLM's parsed inputs per modality key (Qwen2-VL names them "images" / "videos", Qwen2.5-VL "image" / "video").
_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class DyMUQwenServing(DyMUServing):
    """The Qwen-specific part: the tower in place of vLLM's ``self.visual``, and ``embed_multimodal``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._dymu_setup(vllm_config)

    def _dymu_tower(self, family):
        # vLLM's processor may leave rescaling / normalising to the tower (mm_device_do_normalize, on by
        # default): keep vLLM's own input norm of the pixels (not a submodule: it has no checkpoint weights).
        object.__setattr__(self, "_dymu_input_norm", getattr(self.visual, "input_norm", None))
        # Checkpoints name the tower's weights visual.* (vLLM maps model.visual.* there): the same names.
        self.visual = self._transformers_tower(family)
        s = self.dymu
        encoder, _ = family.build_encoder(family, self, s.thresholds, s.r, s.backend, "auto")
        return encoder, None

    def embed_multimodal(self, **kwargs):
        if self.dymu is None:
            return super().embed_multimodal(**kwargs)
        items: List = []
        for key, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            modality = key.rstrip("s")
            pixels_key, grid_key = _INPUTS[modality]
            # Engine step: embeddings inputs exist only under enable_mm_embeds, refused at load.
            if parsed is None or parsed["type"] != pixels_key:
                raise RuntimeError(f"DyMU got {None if parsed is None else parsed['type']!r} {modality} inputs, "
                                   "which the load-time checks exclude (enable_mm_embeds): precomputed embeddings "
                                   "cannot be merged")
            pixels = parsed[pixels_key]
            if self._dymu_input_norm is not None:
                pixels = self._dymu_input_norm(pixels, self.visual.dtype)
            vision_kwargs: Dict = {grid_key: parsed[grid_key]}
            items += self._dymu_encode(modality, pixels, vision_kwargs)
        return items


class DyMUQwen2_5_VLForConditionalGeneration(DyMUQwenServing, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen2_5_vl"
    dymu_tower = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel"


class DyMUQwen2VLForConditionalGeneration(DyMUQwenServing, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen2_vl"
    dymu_tower = "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel"
