"""LLaVA-1.5 (``model_type`` ``llava``): a CLIP tower, a projector and a
Llama-type language model. One merged tower item per image (CLS dropped for
``vision_feature_select_strategy="default"``); placeholders are the item's
patches in order."""

from __future__ import annotations

from ..core.compact import MergedItems
from .spec import Encoded, Family, Modality, Patch
from .towers import clip_like_encoder, clip_like_stages, merged_tower

# Arguments of a LLaVA-type forward that only its vision side reads.
VISION_KWARGS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "vision_feature_layer",
                 "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images")


def encode_images(self, patch: Patch, pixel_values, dtype, vision_kwargs=None) -> Encoded:
    """LLaVA-1.5: one merged tower item per image."""
    feats, counts, slots, tower = merged_tower(self, patch, pixel_values, dtype, vision_kwargs=vision_kwargs)
    return Encoded(MergedItems(feats, counts, slots), **tower)


def _output_class():
    from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

    return LlavaModelOutputWithPast


FAMILY = Family(
    model_type="llava",
    class_name="LlavaForConditionalGeneration",
    modalities=(Modality("image", "image_token_id", "pixel_values", "get_image_features", encode_images),),
    output_class=_output_class,
    default_thresholds="openai/clip-vit-large-patch14-336:low",
    stages=clip_like_stages,
    build_encoder=clip_like_encoder,
    vision_kwargs=VISION_KWARGS,
)
