"""DyMU for Hugging Face ``LlavaForConditionalGeneration``: one call patches a model.

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
import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch

from ..ops.vtu import vtu_attention, vtu_decode_attention
from ..reference.calibration import Thresholds, published_thresholds
from .clip import DToMeCLIPVisionEncoder, _vision_parts, resolve_thresholds

ATTN_NAME = "dymu_vtu"
SUPPORTED_TRANSFORMERS = ((4, 57), (6, 0))  # [min, max)


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


def dymu_vtu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, dymu_vtu=None, **kwargs):
    """transformers attention function: VTU attention when called from a DyMU
    forward (``dymu_vtu`` context given), plain SDPA otherwise."""
    if dymu_vtu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    ctx: VTUContext = dymu_vtu
    fn = vtu_decode_attention if ctx.decode else vtu_attention
    out = fn(query, key.to(query.dtype), value.to(query.dtype), ctx.merge_map, ctx.cos.to(query.dtype),
             ctx.sin.to(query.dtype), scale=scaling, backend=ctx.backend)
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, dymu_vtu_attention)
    try:  # masks are built by DyMU itself; tell transformers to build none
        from transformers.masking_utils import AttentionMaskInterface

        AttentionMaskInterface.register(ATTN_NAME, lambda *args, **kwargs: None)
    except ImportError:
        pass


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
    counts: Optional[_ImageCounts] = None

    def settings(self):
        """What :func:`apply_dymu` was asked for (to tell a repeat from a change)."""
        e = self.encoder
        return (e.thresholds, e.r, e.trim, self.vtu, self.backend)


@dataclass
class _CacheState:
    """VTU bookkeeping carried on the KV cache object between generate() steps."""

    merge_map: torch.Tensor  # [B, N]
    cos: torch.Tensor
    sin: torch.Tensor
    positions: torch.Tensor  # [B, N] full RoPE positions
    rows: int  # cache rows used so far (compact length)
    compact_mask: Optional[torch.Tensor] = None  # no-VTU ablation: mask over compact rows


def _check_transformers() -> None:
    import transformers

    parts = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    lo, hi = SUPPORTED_TRANSFORMERS
    if not (lo <= parts < hi):
        raise RuntimeError(
            f"dymu_kernels.apply_dymu supports transformers >= {lo[0]}.{lo[1]} and < {hi[0]}.{hi[1]}, "
            f"found {transformers.__version__}"
        )


@functools.lru_cache(maxsize=None)
def _cache_kwarg(layer_type: type) -> str:
    """The KV-cache argument of a decoder layer class: newer transformers
    (5.2x) call it ``cache``, older ones ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(layer_type.forward).parameters else "past_key_values"


def _cache_arg(lm, cache) -> Dict[str, object]:
    """``{name: cache}`` for the language model's layers, its forward and its
    output classes; a stale name would be swallowed by ``**kwargs`` silently."""
    return {_cache_kwarg(type(lm.layers[0])): cache}


def _llava_parts(model):
    inner = getattr(model, "model", None)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    ok = inner is not None and all(hasattr(inner, n) for n in ("vision_tower", "language_model", "multi_modal_projector"))
    if not ok or model_type != "llava":
        raise TypeError(
            f"apply_dymu supports transformers LlavaForConditionalGeneration models, got {type(model).__name__} "
            f"(model_type={model_type!r})"
        )
    lm = inner.language_model
    if not hasattr(lm, "rotary_emb") or not hasattr(lm, "layers"):
        raise TypeError(f"the language model {type(lm).__name__} has no rotary_emb/layers; VTU needs a RoPE decoder (Llama-like)")
    return inner, lm


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


def _vision_blocks(inner) -> int:
    layer = inner.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"DyMU needs a single vision_feature_layer, got {layer!r}: merged tokens differ between layers")
    n = len(_vision_parts(inner.vision_tower).encoder.layers)
    blocks = n + 1 + layer if layer < 0 else layer
    if not 1 <= blocks <= n:
        raise ValueError(f"vision_feature_layer={layer} selects no encoder block of {n}")
    return blocks


def apply_dymu(
    model,
    thresholds: Union[None, str, os.PathLike, Sequence[float], Thresholds] = "openai/clip-vit-large-patch14-336:low",
    *,
    r: Union[None, int, Sequence[int]] = None,
    vtu: bool = True,
    backend: str = "auto",
    trim: Union[str, bool] = "auto",
):
    """Patch a ``LlavaForConditionalGeneration`` instance with DyMU (see module doc).

    Args:
        model: the model; patched in place and returned.
        thresholds: per-block DToMe thresholds — a preset ``"model:level"``
            (the published ``"openai/clip-vit-large-patch14-336:low"`` by
            default), a threshold JSON file, a :class:`Thresholds`, or a list.
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
    inner, lm = _llava_parts(model)
    strategy = inner.config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    blocks = _vision_blocks(inner)
    if r is not None:
        thresholds = None
    else:
        thresholds = _resolve_thresholds(thresholds, blocks)
    encoder = DToMeCLIPVisionEncoder(inner.vision_tower, thresholds, r=r, num_layers=blocks, backend=backend, trim=trim)
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
    patch = _Patch(encoder, vtu, backend, saved, strategy)
    model._dymu = patch
    # This instance only: generate() encodes images through get_image_features first.
    inner.forward = functools.partial(_patched_forward, inner, patch)
    inner.get_image_features = functools.partial(_patched_get_image_features, inner, patch)
    model.set_attn_implementation = functools.partial(_set_attn_implementation, model)
    return model


def remove_dymu(model):
    """Undo :func:`apply_dymu` on this instance; a model never patched is returned unchanged."""
    patch = getattr(model, "_dymu", None)
    if patch is None:
        return model
    inner, lm = _llava_parts(model)
    for name in ("forward", "get_image_features"):
        inner.__dict__.pop(name, None)
    model.__dict__.pop("set_attn_implementation", None)
    if patch.vtu:
        lm.config._attn_implementation = patch.saved_attn
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


def dymu_stats(model) -> Optional[DyMUStats]:
    """Tokens kept per image (and per vision block) in the last forward with
    images; None before one (or for a model not patched). Reads the counts
    back from the device (a host sync) — forwards themselves never do."""
    patch = getattr(model, "_dymu", None)
    return None if patch is None or patch.counts is None else patch.counts.stats()


def kv_cache_bytes(cache) -> Dict[str, int]:
    """KV-cache bytes as stored, and what the same cache would take without DyMU
    (one row per full position instead of one per unique token)."""
    total, rows = 0, None
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                rows = t.shape[-2]
    state: Optional[_CacheState] = getattr(cache, "_dymu_state", None)
    full = state.merge_map.shape[1] if state is not None else rows
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


@dataclass
class MergedImages:
    """Merged, projected image tokens; what the patched ``get_image_features``
    returns (generate() encodes images with it before the first forward).
    Deliberately has no ``pooler_output``: transformers must not treat these
    as one feature row per placeholder."""

    features: torch.Tensor  # [n_img, U_cap, C] projected unique tokens
    counts: torch.Tensor  # [n_img] unique tokens per image
    slots: torch.Tensor  # [n_img, P] unique token of each placeholder


@dataclass
class _Layout:
    """Where each token of a prompt batch goes in the compact sequence.

    Built with device ops and a single host read (``placeholders`` and
    ``n_max`` together); positions are flat, batch-major indices into [B, N].
    """

    is_text: torch.Tensor  # [B, N] valid positions that are not image placeholders
    image_pos: torch.Tensor  # [n_img, P] position of each image's placeholders
    start: torch.Tensor  # [B, N] compact index of the first token a position adds
    n_unique: torch.Tensor  # [B] compact length per sample
    placeholders: List[int]  # host: image placeholders per sample
    n_max: int  # host: compact capacity, max(n_unique) and at least 1


def _plan_layout(input_ids, attention_mask, image_token_id, images: Optional[MergedImages]) -> _Layout:
    """The :class:`_Layout` of a prompt batch; one host sync. Not yet checked
    against the images (a mismatch gives a meaningless layout, no error)."""
    B, N = input_ids.shape
    device = input_ids.device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    # Without images, placeholder ids are ordinary tokens, as in the unpatched
    # model (assisted decoding's first step runs text-only).
    is_img = (input_ids == image_token_id) & valid if images is not None else torch.zeros_like(valid)
    is_text = valid & ~is_img
    n_img, P = images.slots.shape if images is not None else (0, 0)
    # nonzero() would sync for its data-dependent shape; the placeholders the
    # images can fill are n_img * P, so find the j-th one as the position where
    # the running count first reaches j + 1. (With too few placeholders the
    # clamp keeps indices in range; the count check rejects the batch.)
    running = is_img.reshape(-1).long().cumsum(0)
    rank = torch.arange(1, n_img * P + 1, device=device)
    image_pos = torch.searchsorted(running, rank).clamp_max(B * N - 1).view(n_img, P)
    new = is_text.long()  # tokens each position adds to the compact sequence
    if n_img:  # an image's unique tokens enter at its first placeholder
        new.view(-1)[image_pos[:, 0]] = images.counts.to(device=device, dtype=torch.long)
    start = new.cumsum(-1) - new
    n_unique = new.sum(-1)
    # The one host read: placeholder counts (validation, beam expansion) and the compact length (a shape).
    host = torch.cat([is_img.sum(-1), n_unique.max().view(1)]).tolist()
    return _Layout(is_text, image_pos, start, n_unique, host[:-1], max(host[-1], 1))


def _check_placeholders(layout: _Layout, images: Optional[MergedImages]) -> None:
    """Raise unless the placeholders are the images' (``n_img * P`` in all) and
    each sample holds whole images (no image spans two samples)."""
    n_img, P = images.slots.shape if images is not None else (0, 0)
    found = sum(layout.placeholders)
    if found != n_img * P:
        raise ValueError(
            f"found {found} image placeholder tokens in input_ids but {n_img} image(s) x {P} patches "
            f"= {n_img * P} image tokens; the prompt and pixel_values do not match"
        )
    split = [b for b, n in enumerate(layout.placeholders) if P and n % P]
    if split:
        raise ValueError(
            f"sample {split[0]} has {layout.placeholders[split[0]]} image placeholder tokens, not a whole number "
            f"of images of {P} patches; the prompt and pixel_values do not match"
        )


def _expand_images_for_repeated_prompts(images: MergedImages, placeholders: List[int]) -> MergedImages:
    """generate() with beams or num_return_sequences repeats every prompt k times
    (``repeat_interleave``) but encodes each image once; give every copy its
    images. ``placeholders``: image placeholders per sample, read on the host
    already. Returns ``images`` itself when the counts fit no such repetition."""
    P, n_img, B = images.slots.shape[1], images.counts.shape[0], len(placeholders)
    per_sample = [n // P for n in placeholders]
    total = sum(per_sample)
    if total in (0, n_img) or n_img == 0 or total % n_img:
        return images
    k = total // n_img
    groups = [per_sample[i : i + k] for i in range(0, B, k)]
    if B % k or any(len(set(g)) != 1 for g in groups):
        return images
    index, start = [], 0
    for g in groups:
        index += list(range(start, start + g[0])) * k
        start += g[0]
    idx = torch.tensor(index, device=images.counts.device)
    return MergedImages(images.features[idx.to(images.features.device)], images.counts[idx], images.slots[idx.to(images.slots.device)])


def _assemble(layout: _Layout, text_embeds, images: Optional[MergedImages]):
    """The compact sequence and merge map of a checked layout (no host sync)."""
    B, N = layout.is_text.shape
    C, n_max, device = text_embeds.shape[-1], layout.n_max, text_embeds.device
    # Sample b's compact slot u is row b * n_max + u of a flat buffer, so one
    # index_copy_ places all tokens; the extra last row absorbs the copies of
    # positions with nothing to place (fixed shapes need a destination for them).
    dump = B * n_max
    row0 = torch.arange(B, device=device)[:, None] * n_max
    flat = text_embeds.new_zeros(dump + 1, C)
    flat.index_copy_(0, torch.where(layout.is_text, row0 + layout.start, dump).reshape(-1), text_embeds.reshape(-1, C))
    merge_map = torch.where(layout.is_text, layout.start, -1)
    if images is not None and images.counts.shape[0]:
        first = layout.image_pos[:, 0]
        base = layout.start.reshape(-1)[first]  # [n_img] compact index of each image's first unique token
        merge_map.view(-1)[layout.image_pos.reshape(-1)] = (base[:, None] + images.slots.to(device)).reshape(-1)
        k = torch.arange(images.features.shape[1], device=device)
        dest = torch.where(k < images.counts.to(device)[:, None], (first // N * n_max + base)[:, None] + k, dump)
        flat.index_copy_(0, dest.reshape(-1), images.features.to(flat).reshape(-1, C))
    return flat[:dump].view(B, n_max, C), merge_map.to(torch.int32)


def build_compact_sequence(input_ids, attention_mask, image_token_id, text_embeds, image_feats, image_counts,
                           image_slots, *, repeated_prompts: bool = False):
    """Lay out text tokens and unique image tokens, and the full -> compact map.

    Args:
        input_ids: ``[B, N]`` with ``image_token_id`` placeholders, one per patch.
        attention_mask: ``[B, N]`` (0 = padding) or None.
        text_embeds: ``[B, N, C]`` token embeddings of input_ids.
        image_feats: ``[n_img, U_cap, C]`` unique image tokens (projected) per
            image (any ``U_cap >= max(image_counts)``), or None without images
            (then placeholder ids are embedded as ordinary tokens, as the
            unpatched model does without pixel values).
        image_counts: ``[n_img]`` unique tokens per image.
        image_slots: ``[n_img, P]`` per placeholder (patch) of each image, its unique token.
        repeated_prompts: when the placeholders are k times the images' (k > 1)
            and every run of k samples has the same count — generate() with
            beams or num_return_sequences repeats each prompt k times but
            encodes its images once — give every copy of a prompt its images.

    Returns:
        ``(compact [B, N_un_max, C], merge_map [B, N] int32, n_unique [B])``;
        images are consumed in placeholder order (batch-major), like
        transformers does. Sample b's compact row holds, in the order of their
        positions, its text tokens and each image's ``image_counts[i]`` unique
        tokens (at the image's first placeholder); rows are zero-padded::

            input_ids  [t0, IMG, IMG, IMG, t1]   image: counts 2, slots [0, 1, 0]
            compact    [t0, u0, u1, t1]
            merge_map  [0, 1, 2, 1, 3]

    Host syncs: one (placeholder counts and ``N_un_max`` read together); one
    more when ``repeated_prompts`` expands the images.

    Raises:
        ValueError when the placeholders do not match the images (total, or an
        image split across samples).
    """
    images = MergedImages(image_feats, image_counts, image_slots) if image_slots is not None else None
    layout = _plan_layout(input_ids, attention_mask, image_token_id, images)
    if repeated_prompts and images is not None and sum(layout.placeholders) != images.slots.numel():
        expanded = _expand_images_for_repeated_prompts(images, layout.placeholders)
        if expanded is not images:
            images, layout = expanded, _plan_layout(input_ids, attention_mask, image_token_id, expanded)
    _check_placeholders(layout, images)
    compact, merge_map = _assemble(layout, text_embeds, images)
    return compact, merge_map, layout.n_unique


def _patched_get_image_features(self, patch: _Patch, pixel_values, vision_feature_layer=None,
                                vision_feature_select_strategy=None, image_sizes=None, **kwargs) -> MergedImages:
    dtype = self.multi_modal_projector.linear_1.weight.dtype if hasattr(self.multi_modal_projector, "linear_1") else pixel_values.dtype
    return _encode_images(self, patch, pixel_values, dtype)


def _encode_images(self, patch: _Patch, pixel_values, dtype) -> MergedImages:
    """Merge and project ``pixel_values``; features have as many slots as the
    tower kept (its capacity, trimmed or not), minus CLS for ``"default"``."""
    out = patch.encoder(pixel_values.to(dtype))
    if patch.select_strategy == "default":  # drop CLS (always slot 0: it never merges)
        feats, counts, slots = out.features[:, 1:], out.lengths.long() - 1, out.pos_map[:, 1:].long() - 1
    else:
        feats, counts, slots = out.features, out.lengths.long(), out.pos_map.long()
    patch.counts = _ImageCounts(counts, out.tokens_per_layer, slots.shape[1])
    return MergedImages(self.multi_modal_projector(feats), counts, slots)


def _run_decoder(lm, hidden, cache, use_cache, ctx: Optional[VTUContext]):
    """The language model's layers + final norm with RoPE as the identity (VTU
    rotates inside attention, at the full positions)."""
    B, T, _ = hidden.shape
    head_dim = ctx.cos.shape[-1]
    ones = hidden.new_ones(B, T, head_dim)
    zeros = hidden.new_zeros(B, T, head_dim)
    for layer in lm.layers[: lm.config.num_hidden_layers]:
        out = layer(hidden, attention_mask=None, position_embeddings=(ones, zeros), use_cache=use_cache, dymu_vtu=ctx,
                    **_cache_arg(lm, cache))
        hidden = out[0] if isinstance(out, tuple) else out
    return lm.norm(hidden)


def _prefill(self, patch: _Patch, input_ids, embeds, attention_mask, position_ids, images, cache, use_cache,
             repeated_prompts: bool):
    """Prompt step: compact sequence, merge map, full positions; runs the decoder.
    ``repeated_prompts``: the images were encoded by generate(), which may
    repeat prompts (beams, num_return_sequences) after encoding them."""
    lm = self.language_model
    B, T = input_ids.shape
    feats, counts, slots = (images.features, images.counts, images.slots) if images is not None else (None, None, None)
    compact, merge_map, n_unique = build_compact_sequence(
        input_ids, attention_mask, self.config.image_token_id, embeds, feats, counts, slots,
        repeated_prompts=repeated_prompts,
    )
    positions = _full_positions(attention_mask, position_ids, B, T, embeds.device)
    cos, sin = lm.rotary_emb(compact, positions)
    state = _CacheState(merge_map, cos, sin, positions, compact.shape[1])
    if patch.vtu:
        ctx = VTUContext(merge_map, cos, sin, decode=False, backend=patch.backend)
        hidden = _run_decoder(lm, compact, cache, use_cache, ctx)
    else:  # ablation: compressed positions, ordinary attention on the compact sequence
        rows = torch.arange(compact.shape[1], device=compact.device)
        state.compact_mask = (rows[None, :] < n_unique[:, None]).long()
        hidden = lm(inputs_embeds=compact, attention_mask=state.compact_mask, position_ids=rows.expand(B, -1),
                    use_cache=use_cache, **_cache_arg(lm, cache)).last_hidden_state
    # Back to the full positions the caller indexes (padding rows are 0).
    idx = merge_map.long().clamp_min(0)[..., None].expand(B, T, hidden.shape[-1])
    return hidden.gather(1, idx).masked_fill((merge_map < 0)[..., None], 0), state


def _decode(self, patch: _Patch, state: _CacheState, embeds, position_ids, cache, use_cache):
    """Generation step: T new singleton tokens appended to the cache and the map."""
    lm = self.language_model
    B, T, _ = embeds.shape
    last = state.positions[:, -1:]
    if position_ids is not None:
        new_pos = position_ids[:, -T:].to(last.device).expand(B, T).long()
    else:
        new_pos = last + 1 + torch.arange(T, device=last.device)
    rows = state.rows + torch.arange(T, device=embeds.device, dtype=torch.int32)
    merge_map = torch.cat([state.merge_map, rows.expand(B, T)], dim=1)
    cos_new, sin_new = lm.rotary_emb(embeds, new_pos)
    cos, sin = torch.cat([state.cos, cos_new], 1), torch.cat([state.sin, sin_new], 1)
    new_state = _CacheState(merge_map, cos, sin, torch.cat([state.positions, new_pos], 1), state.rows + T)
    if patch.vtu:
        ctx = VTUContext(merge_map, cos, sin, decode=True, backend=patch.backend)
        return _run_decoder(lm, embeds, cache, use_cache, ctx), new_state
    # Ablation: compressed positions continue after this sample's real tokens so far.
    compressed = state.compact_mask.sum(-1, keepdim=True) + torch.arange(T, device=embeds.device)
    new_state.compact_mask = torch.cat([state.compact_mask, state.compact_mask.new_ones(B, T)], 1)
    hidden = lm(inputs_embeds=embeds, attention_mask=new_state.compact_mask, position_ids=compressed,
                use_cache=use_cache, **_cache_arg(lm, cache)).last_hidden_state
    return hidden, new_state


def _patched_forward(
    self, patch: _Patch, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
    past_key_values=None, inputs_embeds=None, vision_feature_layer=None, vision_feature_select_strategy=None,
    image_sizes=None, use_cache=None, mm_encoder_outputs=None, cache=None, **kwargs,
):
    """``LlavaModel.forward`` of a patched instance (same arguments and output
    type); the KV cache comes as ``cache`` or ``past_key_values``, whichever
    this transformers version uses."""
    from transformers.cache_utils import DynamicCache
    from transformers.models.llava.modeling_llava import LlavaModelOutputWithPast

    past_key_values = cache if cache is not None else past_key_values

    if input_ids is None:
        raise ValueError("a DyMU-patched LLaVA needs input_ids (to find the image placeholders), not inputs_embeds")
    lm = self.language_model
    if patch.vtu and lm.config._attn_implementation != ATTN_NAME:
        raise RuntimeError(
            f"the language model's attention implementation was changed to {lm.config._attn_implementation!r} after "
            f"apply_dymu; VTU needs {ATTN_NAME!r}. Call remove_dymu(model) (or apply_dymu again) first"
        )
    embeds = self.get_input_embeddings()(input_ids)
    T = input_ids.shape[1]
    state: Optional[_CacheState] = getattr(past_key_values, "_dymu_state", None)
    if use_cache is None:
        use_cache = lm.config.use_cache
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=lm.config)
    if state is None and past_key_values is not None and past_key_values.get_seq_length() > 0:
        raise ValueError("this KV cache was filled without DyMU; start generation from an empty cache")

    if state is None:
        images = (mm_encoder_outputs or {}).get("image")
        if images is not None and not isinstance(images, MergedImages):
            raise ValueError("image features were encoded without DyMU; pass pixel_values to the patched model")
        from_generate = images is not None
        if images is None and pixel_values is not None:
            images = _encode_images(self, patch, pixel_values, embeds.dtype)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"a DyMU-patched LLaVA takes a 2-D [batch, sequence] padding attention_mask, got shape "
                f"{tuple(attention_mask.shape)}: custom 4-D masks cannot follow the merged sequence"
            )
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        hidden, new_state = _prefill(self, patch, input_ids, embeds, mask, position_ids, images, past_key_values,
                                     use_cache, repeated_prompts=from_generate)
    else:
        hidden, new_state = _decode(self, patch, state, embeds, position_ids, past_key_values, use_cache)
    if use_cache:
        past_key_values._dymu_state = new_state
    out = LlavaModelOutputWithPast(last_hidden_state=hidden, **_cache_arg(lm, past_key_values if use_cache else None))
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return out if return_dict else out.to_tuple()  # as transformers' @can_return_tuple does
