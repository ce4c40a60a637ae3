"""vLLM's Qwen3.5, Qwen3-VL (dense and MoE each), Qwen2.5-VL and Qwen2-VL classes with DyMU (see :mod:`.model`).

vLLM's own classes (processor, M-RoPE positions, weight names, Qwen2
language model) with :class:`~.model.DyMUServing` mixed in. The tower is
transformers' Qwen vision tower over the checkpoint's ``visual.*`` weights,
run by the family's DToMe stages (:mod:`dymu_kernels.families.qwen2_vl`:
inside the tower on 2×2 units and/or rounds after the patch merger) — the
same code :func:`~dymu_kernels.hf.apply_dymu` runs. vLLM computes the M-RoPE
positions of every placeholder itself (the placeholder count is fixed before
the tower runs), and its rotary embedding rotates each expanded row at its
own position (:mod:`.layers`).

Qwen3-VL's deepstack: the family's encoder gives each unique token one row
per tap (the mean over its original units, :mod:`dymu_kernels.families.qwen3_vl`);
they travel beside the features as vLLM's tower output does (``[merger |
taps]`` per placeholder), vLLM's ``embed_input_ids`` puts them in its
per-level buffers at the step's positions, and a merged step passes the
buffers' unique rows to the language model and clears the buffers, as
vLLM's own forward does after its call (else the next step adds stale rows).

Qwen3.5: Qwen3-VL's serving class without deepstack, over vLLM's hybrid
language model — Gated DeltaNet layers hooked as the family's sequence mixer
(:func:`~.layers.install_mixer_hooks`: projections on unique rows, vLLM's
mixing op over every position, the average per group before ``out_proj``),
gated attention as every family's. vLLM compiles this class's whole forward:
merged steps run it eagerly, the others compiled (:meth:`~.model.DyMUServing.__call__`).
Its CPU build runs Gated DeltaNet in bfloat16 only.

What a client sends is checked while vLLM processes the request: vLLM's
processor makes the pixels and grids (any size its ``min_pixels`` /
``max_pixels`` allow, which the DToMe stages take: large images match in
bands), and the plugin's processors (:mod:`.processors`) refuse a request
whose ``mm_processor_kwargs`` change the patch, temporal-patch or merge size
the tower was built with; image and video embeddings are refused at load
(``--enable-mm-embeds``, :mod:`.engine_checks`).
"""

from __future__ import annotations

from typing import Dict, List

from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLMultiModalProcessor
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration, Qwen2VLMultiModalProcessor
from vllm.model_executor.models.qwen3_5 import Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration
from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration, Qwen3VLMultiModalProcessor
from vllm.model_executor.models.qwen3_vl_moe import Qwen3VLMoeForConditionalGeneration
from vllm.sequence import IntermediateTensors

from ..families import model_names
from .model import DyMUServing
from .processors import CheckedPixels, register_checked_processor

# vLLM's parsed inputs per modality key (Qwen2-VL names them "images" / "videos", Qwen2.5-VL "image" / "video").
_INPUTS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


class QwenCheckedPixels(CheckedPixels):
    """The Qwen processors' check: each item's pixels are ``grid_t·grid_h·grid_w``
    patches of the tower's channels × temporal patch × patch² values, its
    grid divisible by the tower's merge size, and vLLM counts placeholders
    (``grid.prod() // merge_size²`` of the request's image processor) with
    the tower's merge size."""

    def check_pixels(self, out, config, hf_kwargs) -> None:
        v = config.vision_config
        merge = self.info.get_image_processor(**hf_kwargs).merge_size
        if merge != v.spatial_merge_size:
            raise ValueError(f"merge_size {merge}: the vision tower merges {v.spatial_merge_size} x "
                             f"{v.spatial_merge_size} patches")
        values = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        for pixels_key, grid_key in _INPUTS.values():
            pixels, grid = out.get(pixels_key), out.get(grid_key)
            if pixels is None:
                continue
            if pixels.dim() != 2 or pixels.shape[1] != values:
                raise ValueError(f"{pixels_key} of shape {tuple(pixels.shape)}: the vision tower takes [patches, "
                                 f"{values}] (patch_size {v.patch_size}, temporal_patch_size "
                                 f"{v.temporal_patch_size})")
            if pixels.shape[0] != int(grid.prod(-1).sum()) or bool((grid[:, 1:] % merge).any()):
                raise ValueError(f"{pixels_key} has {pixels.shape[0]} patches for grids {grid.tolist()} (each "
                                 f"grid's product, height and width divisible by {merge})")


class DyMUQwen2_5_VLMultiModalProcessor(QwenCheckedPixels, Qwen2_5_VLMultiModalProcessor):
    """vLLM's Qwen2.5-VL processor, checking each request's pixels."""


class DyMUQwen2VLMultiModalProcessor(QwenCheckedPixels, Qwen2VLMultiModalProcessor):
    """vLLM's Qwen2-VL processor, checking each request's pixels."""


class DyMUQwenServing(DyMUServing):
    """The Qwen-specific part: the tower in place of vLLM's ``self.visual``, and ``embed_multimodal``."""

    dymu_tower_attr = "visual"

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
        return family.encoder(self.config, self.visual, s.thresholds, s.r, s.backend, names=model_names(self.config))

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


@register_checked_processor(Qwen2_5_VLForConditionalGeneration, DyMUQwen2_5_VLMultiModalProcessor)
class DyMUQwen2_5_VLForConditionalGeneration(DyMUQwenServing, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen2_5_vl"
    dymu_tower = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel"


@register_checked_processor(Qwen2VLForConditionalGeneration, DyMUQwen2VLMultiModalProcessor)
class DyMUQwen2VLForConditionalGeneration(DyMUQwenServing, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen2_vl"
    dymu_tower = "transformers.models.qwen2_vl.modeling_qwen2_vl.Qwen2VisionTransformerPretrainedModel"


class DyMUQwen3VLMultiModalProcessor(QwenCheckedPixels, Qwen3VLMultiModalProcessor):
    """vLLM's Qwen3-VL processor (also the MoE model's), checking each request's pixels."""


class DyMUQwen3Serving(DyMUQwenServing):
    """Qwen3-VL: deepstack rows of a merged step (see module doc)."""

    def _dymu_lm_inputs(self, step, num_tokens):
        embeds = self._get_deepstack_input_embeds(num_tokens) if self.use_deepstack else None
        if embeds is None:
            return {}
        return {"deepstack_input_embeds": IntermediateTensors({k: step.compact(v) for k, v in embeds.items()})}

    def _dymu_lm_inputs_done(self, num_tokens):
        if self.use_deepstack:
            self._clear_deepstack_input_embeds(num_tokens)


@register_checked_processor(Qwen3VLForConditionalGeneration, DyMUQwen3VLMultiModalProcessor)
class DyMUQwen3VLForConditionalGeneration(DyMUQwen3Serving, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen3_vl"
    dymu_tower = "transformers.models.qwen3_vl.modeling_qwen3_vl.Qwen3VLVisionModel"


@register_checked_processor(Qwen3VLMoeForConditionalGeneration, DyMUQwen3VLMultiModalProcessor)
class DyMUQwen3VLMoeForConditionalGeneration(DyMUQwen3Serving, Qwen3VLMoeForConditionalGeneration):
    """vLLM's Qwen3-VL-MoE with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen3_vl_moe"
    dymu_tower = "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe.Qwen3VLMoeVisionModel"


@register_checked_processor(Qwen3_5ForConditionalGeneration, DyMUQwen3VLMultiModalProcessor)
class DyMUQwen3_5ForConditionalGeneration(DyMUQwen3Serving, Qwen3_5ForConditionalGeneration):
    """vLLM's Qwen3.5 with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen3_5"
    dymu_tower = "transformers.models.qwen3_5.modeling_qwen3_5.Qwen3_5VisionModel"


@register_checked_processor(Qwen3_5MoeForConditionalGeneration, DyMUQwen3VLMultiModalProcessor)
class DyMUQwen3_5MoeForConditionalGeneration(DyMUQwen3Serving, Qwen3_5MoeForConditionalGeneration):
    """vLLM's Qwen3.5-MoE with DyMU when ``config.dymu`` asks for it."""

    dymu_family = "qwen3_5_moe"
    dymu_tower = "transformers.models.qwen3_5_moe.modeling_qwen3_5_moe.Qwen3_5MoeVisionModel"
