"""LLaVA-OneVision (``model_type`` ``llava_onevision``): a SigLIP tower, a
projector and a Qwen2 language model; how its images and videos reach the
DToMe tower and how their merged tokens are laid out (docs/design.md §2).

Images: every crop (the base image and the AnyRes grid; one crop per image in
multi-image prompts) is merged independently in one tower batch, projected,
and packed on maps by :func:`~.anyres.pack_image_maps` exactly as
``pack_image_features`` packs features. Videos: every frame is merged,
projected and pooled on maps by :func:`~.anyres.pool_video_maps` as
``get_video_features`` pools them. The rest — compact sequence, VTU in the
Qwen2 language model, the KV cache — is the shared core.
"""

from __future__ import annotations

import torch

from ..core.compact import MergedItems
from ..core.maps import pack_image_maps, pool_video_maps
from .llava import VISION_KWARGS
from .spec import Encoded, Family, Modality
from .towers import clip_like_encoder, clip_like_stages, merged_tower


def _crops_per_image(inner, image_sizes, batch_num_images):
    """Crops of each image, as ``LlavaOnevisionModel.get_image_features`` counts them."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    if batch_num_images is None:  # single-image prompts
        need_patching = [True] * len(image_sizes)
    else:
        need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
    return [image_size_to_num_patches(size, inner.config.image_grid_pinpoints, inner.config.vision_config.image_size)
            if patching else 1 for size, patching in zip(image_sizes, need_patching)]


def encode_images(inner, patch, pixel_values, dtype, vision_kwargs):
    """Merged AnyRes images: one packed item per image."""
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape

    image_sizes = vision_kwargs.get("image_sizes")
    if image_sizes is None:
        raise ValueError("LLaVA-OneVision images need image_sizes (as its processor returns them)")
    crops = _crops_per_image(inner, image_sizes, vision_kwargs.get("batch_num_images"))
    # [images, max crops, 3, H, W] or one [crops, 3, H, W] per image (vLLM): keep each image's real crops.
    if isinstance(pixel_values, (list, tuple)) or pixel_values.dim() == 5:
        pixel_values = torch.cat([pix[:n] for pix, n in zip(pixel_values, crops)])
    elif pixel_values.dim() != 4:
        raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected 4 or 5 dimensions")
    feats, counts, slots, tower = merged_tower(inner, patch, pixel_values, dtype, vision_kwargs=vision_kwargs)
    aspect = vision_kwargs.get("vision_aspect_ratio") or inner.config.vision_aspect_ratio
    max_num_patches = int(aspect.rsplit("_", 1)[-1])
    config = inner.config
    uniques, maps, start = [], [], 0
    for size, n in zip(image_sizes, crops):
        size = [int(v) for v in (size.tolist() if isinstance(size, torch.Tensor) else size)]
        grid = (get_anyres_image_grid_shape(size, config.image_grid_pinpoints, config.vision_config.image_size)
                if n > 1 else (1, 1))
        sl = slice(start, start + n)
        unique, slot_map = pack_image_maps(feats[sl], counts[sl], slots[sl], grid, size, inner.image_newline,
                                           max_num_patches)
        uniques.append(unique)
        maps.append(slot_map)
        start += n
    return Encoded(MergedItems.stack(uniques, maps), [m.shape[0] for m in maps], **tower)


def encode_videos(inner, patch, pixel_values_videos, dtype, vision_kwargs):
    """Merged videos (``[videos, frames, 3, H, W]``, or one ``[frames, 3, H, W]``
    per video as vLLM passes them): every frame merged, pooled on maps, one
    newline per video."""
    frames = [v.shape[0] for v in pixel_values_videos]
    feats, counts, slots, tower = merged_tower(inner, patch, torch.cat(list(pixel_values_videos)), dtype, "video",
                                               vision_kwargs)
    uniques, maps, start = [], [], 0
    for n in frames:
        sl = slice(start, start + n)
        start += n
        unique, slot_map = pool_video_maps(feats[sl], counts[sl], slots[sl], inner.image_newline)
        uniques.append(unique)
        maps.append(slot_map)
    return Encoded(MergedItems.stack(uniques, maps), [m.shape[0] for m in maps], **tower)


def _output_class():
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModelOutputWithPast

    return LlavaOnevisionModelOutputWithPast


FAMILY = Family(
    model_type="llava_onevision",
    class_name="LlavaOnevisionForConditionalGeneration",
    modalities=(Modality("image", "image_token_id", "pixel_values", "get_image_features", encode_images),
                Modality("video", "video_token_id", "pixel_values_videos", "get_video_features", encode_videos)),
    output_class=_output_class,
    default_thresholds=None,  # no published SigLIP thresholds: calibrate
    stages=clip_like_stages,
    build_encoder=clip_like_encoder,
    vision_kwargs=VISION_KWARGS,
)
