"""DyMU for Hugging Face LLaVA models: one call patches a model.

The shared core for every supported family (``LlavaForConditionalGeneration``;
``LlavaOnevisionForConditionalGeneration`` through the adapter in
:mod:`.onevision`): :func:`apply_dymu` looks the family up by
``config.model_type`` (:func:`_families`); a family says which visual
modalities it has, which method encodes each and how its merged items are laid
out. Everything below is the same for all families.

``apply_dymu(model, thresholds)`` patches *this instance* (no class is
modified) so that

- the CLIP vision tower merges tokens in every block (DToMe, proportional
  attention; :class:`~dymu_kernels.integrations.clip.DToMeCLIPVisionEncoder`),
  and the projector runs on the merged tokens only;
- the language model runs on the *compact* sequence — text tokens plus the
  unique image tokens — so norms, projections and MLPs do ``N_un`` tokens of
  work, while attention sees the virtual full sequence through VTU:
  ``dymu_kernels.vtu_attention`` with RoPE at the original positions,
  registered as a transformers ``AttentionInterface`` ("dymu_vtu");
- ``generate()`` works: the KV cache holds keys/values once per unique token
  (before RoPE), and every decode step runs ``vtu_decode_attention`` over the
  full virtual sequence.

The processor is unchanged: it still inserts one placeholder per original
patch, and outputs (hidden states, logits) come back at the full positions, so
callers see the shapes they expect. ``remove_dymu(model)`` restores the
original behaviour; applying twice is a no-op.

How it hooks in: the language model's RoPE is made the identity for the
compact tokens (so the cache stores un-rotated keys), and the attention
function receives the merge map and the full positions' cos/sin through a
keyword argument that transformers forwards to attention implementations.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..ops.vtu import vtu_attention, vtu_decode_attention
from ..reference.calibration import Thresholds, published_thresholds
from .clip import DToMeCLIPVisionEncoder, _vision_parts, resolve_thresholds
from .compact import MergedImages, build_compact_sequence
from .vtu_cache import VTUCacheState, cache_state, set_cache_state

ATTN_NAME = "dymu_vtu"
SUPPORTED_TRANSFORMERS = ((5, 24), (6, 0))  # [min, max): the versions tested


# ----------------------------------------------------------------------------
# Attention implementation
# ----------------------------------------------------------------------------


@dataclass
class VTUContext:
    """What attention needs for one forward: the map and the full positions' RoPE."""

    merge_map: torch.Tensor  # [B, N] full position -> cache row (-1 padding)
    cos: torch.Tensor  # [B, N, D]
    sin: torch.Tensor
    decode: bool
    backend: str

    def to(self, device, non_blocking: bool = False) -> "VTUContext":
        """The context on ``device``: accelerate's hooks (``device_map`` over
        several GPUs) move arguments they do not know by calling ``.to``, so
        the map and tables follow each layer like its other inputs."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, merge_map=move(self.merge_map), cos=move(self.cos), sin=move(self.sin))


class DeferredMask:
    """What transformers' mask creation returns under ``"dymu_vtu"``.

    VTU needs no mask of its own, only the 2-D padding mask — which
    ``generate()`` with a compileable (static) cache turns into a mask object
    *before* calling the model. This keeps that padding mask for the patched
    forward, and the arguments to build transformers' ordinary SDPA mask when
    attention falls back to SDPA (a direct call of the language model).
    """

    def __init__(self, mask_kwargs: dict):
        self.mask_kwargs = mask_kwargs
        self.padding = mask_kwargs.get("attention_mask")  # [B, L] bool or None

    @functools.cached_property
    def sdpa(self):
        """transformers' SDPA mask for these arguments, built once for all layers."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**self.mask_kwargs)


def dymu_vtu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, dymu_vtu=None, **kwargs):
    """transformers attention function: VTU attention when called from a DyMU
    forward (``dymu_vtu`` context given), plain SDPA otherwise."""
    if dymu_vtu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if isinstance(attention_mask, DeferredMask):
            attention_mask = attention_mask.sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    ctx: VTUContext = dymu_vtu
    fn = vtu_decode_attention if ctx.decode else vtu_attention
    if not ctx.decode and key.shape[2] != query.shape[2]:
        # A static cache returns its whole buffer; a prompt (always on an empty
        # cache) wrote rows 0..N_un-1, the ones the map points into.
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    out = fn(query, key.to(query.dtype), value.to(query.dtype), ctx.merge_map, ctx.cos.to(query.dtype),
             ctx.sin.to(query.dtype), scale=scaling, backend=ctx.backend)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, dymu_vtu_attention)
    AttentionMaskInterface.register(ATTN_NAME, lambda **kwargs: DeferredMask(kwargs))


# ----------------------------------------------------------------------------
# Patch state
# ----------------------------------------------------------------------------


@dataclass
class DyMUStats:
    """Per-image statistics of the last forward with images."""

    tokens_kept: List[int]  # image tokens passed to the language model, per image
    tokens_per_layer: List[List[int]]  # per image: tokens after each vision block
    num_patches: int  # image tokens per image without DyMU


@dataclass
class _ImageCounts:
    """Token counts of the last encoded images, kept on the device: a forward
    reads nothing back for statistics; :func:`dymu_stats` does, when asked."""

    kept: torch.Tensor  # [n_img] image tokens passed to the language model
    per_layer: List[torch.Tensor]  # one [n_img] tensor per vision block
    num_patches: int

    def stats(self) -> DyMUStats:
        return DyMUStats(tokens_kept=self.kept.tolist(), tokens_per_layer=torch.stack(self.per_layer, dim=1).tolist(),
                         num_patches=self.num_patches)


@dataclass
class _Patch:
    encoder: DToMeCLIPVisionEncoder
    vtu: bool
    backend: str
    saved_attn: Optional[str]
    select_strategy: str
    family: "Family"
    counts: Dict[str, _ImageCounts] = field(default_factory=dict)  # per modality, of its last tower batch

    def settings(self):
        """What :func:`apply_dymu` was asked for (to tell a repeat from a change)."""
        e = self.encoder
        return (e.thresholds, e.r, e.trim, self.vtu, self.backend)


def _check_transformers() -> None:
    import transformers

    parts = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    lo, hi = SUPPORTED_TRANSFORMERS
    if not (lo <= parts < hi):
        raise RuntimeError(
            f"dymu_kernels.apply_dymu supports transformers >= {lo[0]}.{lo[1]} and < {hi[0]}.{hi[1]}, "
            f"found {transformers.__version__}"
        )


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a model family."""

    name: str  # "image" / "video": the mm_encoder_outputs key and the output field prefix
    token_attr: str  # config attribute holding its placeholder id
    pixels: str  # forward argument with its pixels
    method: str  # the model's encoding method, patched to merge (generate() calls it first)
    encode: Callable  # encode(inner, patch, pixels, dtype, vision_kwargs) -> DyMUImageOutputs
    patched: Callable  # what replaces ``method``: the same parameter names, merged output


@dataclass(frozen=True)
class Family:
    """What the shared core needs to know about one model family."""

    model_type: str
    class_name: str
    modalities: Tuple[Modality, ...]
    output_class: Callable[[], type]  # the base model's output class (imported lazily)
    default_thresholds: Optional[str]  # preset used when apply_dymu gets none


# Arguments of a family's forward that only its vision side reads.
VISION_KWARGS = ("pixel_values", "pixel_values_videos", "image_sizes", "image_sizes_videos", "vision_feature_layer",
                 "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images")


def _families() -> Dict[str, Family]:
    """The supported model families by ``config.model_type``."""
    from . import onevision

    def llava_output():
        from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

        return LlavaModelOutputWithPast

    def onevision_output():
        from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModelOutputWithPast

        return LlavaOnevisionModelOutputWithPast

    return {
        "llava": Family("llava", "LlavaForConditionalGeneration",
                        (Modality("image", "image_token_id", "pixel_values", "get_image_features", _encode_images,
                                  _patched_image_features),),
                        llava_output, "openai/clip-vit-large-patch14-336:low"),
        "llava_onevision": Family(
            "llava_onevision", "LlavaOnevisionForConditionalGeneration",
            (Modality("image", "image_token_id", "pixel_values", "get_image_features", onevision.encode_images,
                      _patched_image_features),
             Modality("video", "video_token_id", "pixel_values_videos", "get_video_features", onevision.encode_videos,
                      _patched_video_features)),
            onevision_output, None),
    }


def _llava_parts(model):
    """``(family, inner model, language model)`` of a supported model."""
    inner = getattr(model, "model", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    families = _families()
    ok = inner is not None and all(hasattr(inner, n) for n in ("vision_tower", "language_model", "multi_modal_projector"))
    if not ok or model_type not in families:
        supported = ", ".join(f"{f.class_name} (model_type {t!r})" for t, f in families.items())
        raise TypeError(
            f"apply_dymu supports transformers {supported}; got {type(model).__name__} (model_type={model_type!r})"
        )
    lm = inner.language_model
    if not hasattr(lm, "rotary_emb") or not hasattr(lm, "layers"):
        raise TypeError(f"the language model {type(lm).__name__} has no rotary_emb/layers; VTU needs a RoPE decoder (Llama-like)")
    return families[model_type], inner, lm


def _resolve_thresholds(thresholds, num_layers: int):
    """A preset ``"model:level"`` resolved, then checked like the encoder's."""
    if isinstance(thresholds, str) and not os.path.exists(thresholds):
        model, _, level = thresholds.rpartition(":")
        if not model:
            raise ValueError(
                f"thresholds {thresholds!r} is neither a threshold file nor a preset 'model:level' "
                "(e.g. 'openai/clip-vit-large-patch14-336:low')"
            )
        thresholds = published_thresholds(model, level)
    return resolve_thresholds(thresholds, num_layers)


def _vision_blocks(config, tower) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"DyMU needs a single vision_feature_layer, got {layer!r}: merged tokens differ between layers")
    n = len(_vision_parts(tower).encoder.layers)
    blocks = n + 1 + layer if layer < 0 else layer
    if not 1 <= blocks <= n:
        raise ValueError(f"vision_feature_layer={layer} selects no encoder block of {n}")
    return blocks


def check_full_attention(text_config) -> None:
    """Raise ValueError when a language model has layers other than full
    (causal) attention (sliding windows): VTU covers full attention only."""
    other = sorted(set(getattr(text_config, "layer_types", None) or []) - {"full_attention"})
    if other:
        raise ValueError(f"the language model has {other} layers; VTU attention covers full (causal) attention only")


def tower_encoder(family: "Family", config, tower, thresholds="default", r=None, backend: str = "auto",
                  trim: Union[str, bool] = "auto") -> DToMeCLIPVisionEncoder:
    """The DToMe encoder over a model's transformers vision ``tower``, with
    ``thresholds`` resolved as :func:`apply_dymu` documents (``"default"``:
    the family's preset) for the blocks ``config.vision_feature_layer``
    reads; checks the feature-select strategy. What :func:`apply_dymu` and
    the vLLM plugin (:mod:`dymu_kernels.vllm`) both build."""
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    blocks = _vision_blocks(config, tower)
    if r is not None:
        thresholds = None
    else:
        if isinstance(thresholds, str) and thresholds == "default":
            if family.default_thresholds is None:
                raise ValueError(
                    f"no published thresholds for {family.class_name}'s vision tower: pass thresholds calibrated on "
                    "your images (python3 -m dymu_kernels.calibrate --model ID --images DIR --r N --out t.json, then "
                    "apply_dymu(model, 't.json')) or r=N"
                )
            thresholds = family.default_thresholds
        thresholds = _resolve_thresholds(thresholds, blocks)
    encoder = DToMeCLIPVisionEncoder(tower, thresholds, r=r, num_layers=blocks, backend=backend, trim=trim)
    if strategy == "default" and not encoder.cls_token:
        raise ValueError("vision_feature_select_strategy='default' drops a CLS token this vision tower does not have")
    return encoder


def apply_dymu(
    model,
    thresholds: Union[None, str, os.PathLike, Sequence[float], Thresholds] = "default",
    *,
    r: Union[None, int, Sequence[int]] = None,
    vtu: bool = True,
    backend: str = "auto",
    trim: Union[str, bool] = "auto",
):
    """Patch a ``LlavaForConditionalGeneration`` or ``LlavaOnevisionForConditionalGeneration``
    instance with DyMU (see module doc).

    Args:
        model: the model; patched in place and returned.
        thresholds: per-block DToMe thresholds — a preset ``"model:level"``,
            a threshold JSON file, a :class:`Thresholds`, or a list.
            ``"default"``: the family's published preset (LLaVA-1.5:
            ``"openai/clip-vit-large-patch14-336:low"``); LLaVA-OneVision's
            SigLIP has none — calibrate (``python3 -m dymu_kernels.calibrate``).
        r: instead of thresholds, merge exactly ``r`` tokens per image per
            block (the paper's fixed-r ToMe ablation).
        vtu: ``False`` is the "merging without VTU" ablation: merged tokens are
            fed with compressed positions ``0..N_un-1`` and ordinary attention.
        backend: merge and attention backend, ``"auto" | "triton" | "cpp" | "torch"``.
        trim: ``"auto" | True | False`` — whether the vision tower shrinks its
            padded sequence to the longest image after each block (see
            :class:`~dymu_kernels.integrations.clip.DToMeCLIPVisionEncoder`).
            ``"auto"`` trims on the CPU, where it saves compute in proportion
            to the tokens merged, and not on CUDA, where it would cost one host
            sync per block (sync-free until a GPU measurement says otherwise);
            ``False`` keeps the tower capturable in a CUDA graph. Results are
            the same either way.

    Applying again with the same settings is a no-op; with other settings
    the model is re-patched with the new ones (as after :func:`remove_dymu`).

    Raises:
        TypeError for an unsupported model; RuntimeError for an unsupported
        transformers version; ValueError for bad thresholds (not numbers, not
        in ``[-1, 1]`` or ``inf``, too few) / r.
    """
    _check_transformers()
    family, inner, lm = _llava_parts(model)
    encoder = tower_encoder(family, inner.config, inner.vision_tower, thresholds, r, backend, trim)
    strategy = inner.config.vision_feature_select_strategy
    if vtu:
        check_full_attention(lm.config)
    current = getattr(model, "_dymu", None)
    if current is not None:
        if current.settings() == (encoder.thresholds, encoder.r, encoder.trim, vtu, backend):
            return model  # the same patch again: a no-op
        remove_dymu(model)  # other settings replace the old ones
    saved = None
    if vtu:
        _register_attention()
        saved = lm.config._attn_implementation
        lm.config._attn_implementation = ATTN_NAME
    patch = _Patch(encoder, vtu, backend, saved, strategy, family)
    model._dymu = patch
    # This instance only: generate() encodes images / videos through these methods first.
    inner.forward = functools.partial(_patched_forward, inner, patch)
    for m in family.modalities:
        setattr(inner, m.method, functools.partial(m.patched, inner, patch, m))
    model.set_attn_implementation = functools.partial(_set_attn_implementation, model)
    if vtu:  # RoPE becomes the identity inside VTU forwards (see _rotary_forward)
        lm.rotary_emb.forward = functools.partial(_rotary_forward, lm.rotary_emb)
    return model


def remove_dymu(model):
    """Undo :func:`apply_dymu` on this instance; a model never patched is returned unchanged."""
    patch = getattr(model, "_dymu", None)
    if patch is None:
        return model
    family, inner, lm = _llava_parts(model)
    for name in ("forward",) + tuple(m.method for m in family.modalities):
        inner.__dict__.pop(name, None)
    model.__dict__.pop("set_attn_implementation", None)
    if patch.vtu:
        lm.config._attn_implementation = patch.saved_attn
        lm.rotary_emb.__dict__.pop("forward", None)
    del model._dymu
    return model


def _set_attn_implementation(model, attn_implementation, *args, **kwargs):
    """``set_attn_implementation`` of a patched instance: VTU needs its own
    attention function, so another implementation means no DyMU — the patch
    is removed first (with a warning), never left half applied."""
    warnings.warn(
        f"set_attn_implementation({attn_implementation!r}) on a DyMU-patched model removes DyMU (VTU attention needs "
        f"the {ATTN_NAME!r} implementation); call apply_dymu again to restore it",
        stacklevel=2,
    )
    remove_dymu(model)
    return model.set_attn_implementation(attn_implementation, *args, **kwargs)


def dymu_stats(model, modality: str = "image") -> Optional[DyMUStats]:
    """Tokens kept per tower item — image (LLaVA-1.5), crop (LLaVA-OneVision
    AnyRes: base image first, then the grid), or video frame
    (``modality="video"``) — and per vision block, in the last forward that
    encoded that modality; None before one (or for a model not patched).
    Reads the counts back from the device (a host sync) — forwards never do."""
    patch = getattr(model, "_dymu", None)
    counts = None if patch is None else patch.counts.get(modality)
    return None if counts is None else counts.stats()


def kv_cache_bytes(cache) -> Dict[str, int]:
    """KV-cache bytes as stored, and what the same cache would take without DyMU
    (one row per full position instead of one per unique token)."""
    total, rows = 0, None
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                rows = t.shape[-2]
    state = cache_state(cache)
    full = state.length if state is not None else rows
    without = total if not rows else total * full // rows
    return {"bytes": total, "bytes_without_dymu": without}


# ----------------------------------------------------------------------------
# The patched LlavaModel.forward
# ----------------------------------------------------------------------------


def _full_positions(attention_mask, position_ids, B, N, device):
    if position_ids is not None:
        return position_ids.to(device).expand(B, N).long()
    if attention_mask is not None:
        # Like generate(): positions count only real tokens (left padding friendly).
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return torch.arange(N, device=device).expand(B, N)


def _patched_image_features(self, patch: _Patch, modality: "Modality", pixel_values, image_sizes=None,
                            vision_feature_layer=None, vision_feature_select_strategy=None, vision_aspect_ratio=None,
                            batch_num_images=None, return_dict=True, **kwargs):
    """``get_image_features`` of a patched instance: the merged images in
    transformers' output type. The named parameters are what ``generate()``
    reads from the signature to decide which inputs to hand over."""
    vision_kwargs = {"image_sizes": image_sizes, "vision_aspect_ratio": vision_aspect_ratio,
                     "batch_num_images": batch_num_images}
    return _features(self, patch, modality, pixel_values, vision_kwargs, return_dict)


def _patched_video_features(self, patch: _Patch, modality: "Modality", pixel_values_videos, vision_feature_layer=None,
                            vision_feature_select_strategy=None, return_dict=True, **kwargs):
    """``get_video_features`` of a patched instance (see :func:`_patched_image_features`)."""
    return _features(self, patch, modality, pixel_values_videos, {}, return_dict)


def _features(self, patch: _Patch, modality: "Modality", pixels, vision_kwargs, return_dict):
    proj = self.multi_modal_projector
    dtype = proj.linear_1.weight.dtype if hasattr(proj, "linear_1") else pixels.dtype
    out = modality.encode(self, patch, pixels, dtype, vision_kwargs)
    return out if return_dict is not False else out.to_tuple()


def merged_tower(self, patch: _Patch, pixel_values, dtype, modality: str = "image"):
    """The tower's merged tokens of a batch of images (crops, frames), projected:
    ``(features [n, U_cap, C], counts [n], slots [n, P])``, minus CLS for
    ``"default"``; their counts become ``dymu_stats(model, modality)``."""
    feats, counts, slots, per_layer = tower_tokens(patch.encoder, patch.select_strategy, pixel_values.to(dtype))
    patch.counts[modality] = _ImageCounts(counts, per_layer, slots.shape[1])
    return self.multi_modal_projector(feats), counts, slots


def tower_tokens(encoder: DToMeCLIPVisionEncoder, select_strategy: str, pixel_values):
    """The merged tower tokens the projector reads: ``(features [n, U_cap, C_vis],
    counts [n], slots [n, P], tokens per block)`` — minus CLS for ``"default"``;
    ``slots`` maps each of the ``P`` placeholders to its unique token."""
    out = encoder(pixel_values)
    if select_strategy == "default":  # drop CLS (always slot 0: it never merges)
        return out.features[:, 1:], out.lengths.long() - 1, out.pos_map[:, 1:].long() - 1, out.tokens_per_layer
    return out.features, out.lengths.long(), out.pos_map.long(), out.tokens_per_layer


def _encode_images(self, patch: _Patch, pixel_values, dtype, vision_kwargs=None):
    """LLaVA-1.5: one merged tower item per image."""
    from .image_outputs import image_outputs

    return image_outputs(MergedImages(*merged_tower(self, patch, pixel_values, dtype)))


def _rotary_forward(rot, x, position_ids, *args, **kwargs):
    """``forward`` of the language model's rotary module while patched: the
    identity (cos 1, sin 0) while a VTU forward runs — VTU rotates inside
    attention, at the full positions, and the cache keeps keys un-rotated —
    and the original rotation otherwise (a direct call of the language model).
    The identity tables are made directly, shaped like the module's
    (``[*position_ids.shape, 2 * len(inv_freq)]`` in ``x``'s dtype)."""
    inv_freq = getattr(rot, "inv_freq", None)
    if not getattr(rot, "_dymu_identity", False) or inv_freq is None:
        cos, sin = type(rot).forward(rot, x, position_ids, *args, **kwargs)
        if getattr(rot, "_dymu_identity", False):
            return torch.ones_like(cos), torch.zeros_like(sin)
        return cos, sin
    shape = (*position_ids.shape, 2 * inv_freq.numel())
    return x.new_ones(shape), x.new_zeros(shape)


def _placeholder_mask(self, input_ids, embeds, token_id: int):
    """Placeholders of ``token_id`` as transformers finds them: by id, or
    (inputs_embeds only) as rows equal to that token's embedding."""
    if input_ids is not None:
        return input_ids == token_id
    token = torch.full((), token_id, dtype=torch.long, device=embeds.device)
    return (embeds == self.get_input_embeddings()(token)).all(-1)


def _to_full(hidden, merge_map):
    """Compact rows -> the full positions the caller indexes (padding rows are 0)."""
    B, N = merge_map.shape
    idx = merge_map.long().clamp_min(0)[..., None].expand(B, N, hidden.shape[-1])
    return hidden.gather(1, idx.to(hidden.device)).masked_fill((merge_map < 0)[..., None].to(hidden.device), 0)


def _prefill_state(self, masks, embeds, attention_mask, position_ids, items, names):
    """Prompt step: compact sequence, its map, full positions and RoPE tables."""
    B, T = embeds.shape[:2]
    compact, merge_map, n_unique = build_compact_sequence(masks, attention_mask, embeds, items, names=names)
    positions = _full_positions(attention_mask, position_ids, B, T, embeds.device)
    cos, sin = self.language_model.rotary_emb(compact, positions)
    state = VTUCacheState(merge_map, cos, sin, positions, rows=compact.shape[1])
    return compact, state, n_unique


def _decode_state(self, state: VTUCacheState, embeds, position_ids):
    """Generation step: T new singleton tokens appended to the map, one row each."""
    B, T, _ = embeds.shape
    last = state.positions[:, -1:]
    if position_ids is not None:
        new_pos = position_ids[:, -T:].to(last.device).expand(B, T).long()
    else:
        new_pos = last + 1 + torch.arange(T, device=last.device)
    rows = state.rows + torch.arange(T, device=state.merge_map.device, dtype=torch.int32)
    cos_new, sin_new = self.language_model.rotary_emb(embeds, new_pos)
    mask = None if state.compact_mask is None else torch.cat([state.compact_mask, state.compact_mask.new_ones(B, T)], 1)
    return replace(state, merge_map=torch.cat([state.merge_map, rows.expand(B, T)], 1),
                   cos=torch.cat([state.cos, cos_new], 1), sin=torch.cat([state.sin, sin_new], 1),
                   positions=torch.cat([state.positions, new_pos], 1), rows=state.rows + T, compact_mask=mask)


def _run_language_model(lm, patch: _Patch, x, old: Optional[VTUCacheState], state: VTUCacheState, n_unique, cache,
                        use_cache, kwargs):
    """The language model's own forward on ``x`` — the compact prompt, or the
    new tokens of a generation step (``old`` is the cache's state before it)."""
    B, T, _ = x.shape
    first_row = 0 if old is None else old.rows
    rows = (first_row + torch.arange(T, device=x.device)).expand(B, T)
    if not patch.vtu:  # ablation: compressed positions, ordinary attention over the compact rows
        if old is None:
            state.compact_mask = (rows < n_unique[:, None].to(x.device)).long()
            positions = rows
        else:  # compressed positions continue after this sample's real tokens so far
            positions = old.compact_mask.sum(-1, keepdim=True) + torch.arange(T, device=x.device)
        return lm(inputs_embeds=x, attention_mask=state.compact_mask, position_ids=positions, use_cache=use_cache,
                  cache=cache, **kwargs)
    ctx = VTUContext(state.merge_map, state.cos, state.sin, decode=old is not None, backend=patch.backend)
    lm.rotary_emb._dymu_identity = True
    try:
        return lm(inputs_embeds=x, attention_mask=None, position_ids=rows, use_cache=use_cache, dymu_vtu=ctx,
                  cache=cache, **kwargs)
    finally:
        lm.rotary_emb._dymu_identity = False


def _patched_forward(
    self, patch: _Patch, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
    inputs_embeds=None, use_cache=None, mm_encoder_outputs=None, cache=None, return_dict=None, **kwargs,
):
    """The base model's ``forward`` of a patched instance (``LlavaModel``,
    ``LlavaOnevisionModel``): same arguments and output type; the language
    model runs through its own forward (hidden states, gradient checkpointing,
    device hooks as usual) on the compact sequence. The KV cache comes as
    ``cache`` or ``past_key_values``."""
    from transformers.cache_utils import DynamicCache

    from .image_outputs import DyMUImageOutputs

    cache = cache if cache is not None else past_key_values
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    lm = self.language_model
    if patch.vtu and lm.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(
            f"the language model's attention implementation was changed to {lm.config._attn_implementation!r} after "
            f"apply_dymu; VTU needs {ATTN_NAME!r}. Call remove_dymu(model) (or apply_dymu again) first"
        )
    vision_kwargs = {n: kwargs.pop(n) for n in VISION_KWARGS if n in kwargs}
    modalities = patch.family.modalities
    encoded = {m.name: (mm_encoder_outputs or {}).get(m.name) for m in modalities}
    for m in modalities:
        if vision_kwargs.get(m.pixels) is not None and encoded[m.name] is not None:
            raise ValueError(f"You cannot specify both {m.pixels} and mm_encoder_outputs at the same time")
    embeds = inputs_embeds if inputs_embeds is not None else self.get_input_embeddings()(input_ids)
    if use_cache is None:
        use_cache = lm.config.use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=lm.config)
    if kwargs.get("output_attentions", lm.config.output_attentions) and patch.vtu:
        warnings.warn(
            "output_attentions: VTU attention never forms the attention matrix over the full sequence (that is what "
            "makes it cheap), so attentions are None, as with transformers' sdpa attention; remove_dymu(model) for them",
            stacklevel=3,
        )
    def placeholders(m):
        return _placeholder_mask(self, input_ids, embeds, getattr(self.config, m.token_attr))

    old = cache_state(cache)
    if old is not None:  # a generation step, or new text on a filled cache
        for m in modalities:
            given = vision_kwargs.get(m.pixels) is not None or encoded[m.name] is not None
            if given and bool(placeholders(m).any()):
                raise ValueError(
                    f"new {m.name} placeholders on a DyMU KV cache that already holds a prompt: {m.name}s can only "
                    f"enter with the first forward on an empty cache; start a new generation (empty cache) with all "
                    f"{m.name}s"
                )
        state, n_unique, x = _decode_state(self, old, embeds, position_ids), None, embeds
    else:
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("this KV cache was filled without DyMU; start generation from an empty cache")
        items = []
        for m in modalities:
            pixels = vision_kwargs.get(m.pixels)
            if encoded[m.name] is None and pixels is not None:
                encoded[m.name] = m.encode(self, patch, pixels, embeds.dtype, vision_kwargs)
            if encoded[m.name] is not None and not isinstance(encoded[m.name], DyMUImageOutputs):
                raise ValueError(f"{m.name} features were encoded without DyMU; pass {m.pixels} to the patched model")
            items.append(encoded[m.name].merged_images() if encoded[m.name] is not None else None)
        if isinstance(attention_mask, dict):  # one mask per layer type (Qwen2): the same padding in each
            attention_mask = next(iter(attention_mask.values()))
        if isinstance(attention_mask, DeferredMask):  # generate() with a static cache made it
            attention_mask = attention_mask.padding
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"a DyMU-patched model takes a 2-D [batch, sequence] padding attention_mask, got shape "
                f"{tuple(attention_mask.shape)}: custom 4-D masks cannot follow the merged sequence"
            )
        T = embeds.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        x, state, n_unique = _prefill_state(self, [placeholders(m) for m in modalities], embeds, mask, position_ids,
                                            items, tuple(m.name for m in modalities))
    out = _run_language_model(lm, patch, x, old, state, n_unique, cache, use_cache, kwargs)
    if use_cache:
        set_cache_state(cache, state)
    full = (lambda h: h) if old is not None else functools.partial(_to_full, merge_map=state.merge_map)
    hidden_states = None if out.hidden_states is None else tuple(full(h) for h in out.hidden_states)
    result = patch.family.output_class()(
        last_hidden_state=full(out.last_hidden_state), hidden_states=hidden_states, attentions=out.attentions,
        cache=cache if use_cache else None, **{f"{m.name}_outputs": encoded[m.name] for m in modalities},
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict else result.to_tuple()  # as transformers' @can_return_tuple does
