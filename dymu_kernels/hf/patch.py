"""DyMU in transformers: one call patches a model.

``apply_dymu(model, thresholds)`` patches *this instance* (no class is
modified). The model's family (:mod:`dymu_kernels.families`, by
``config.model_type``) says which visual modalities it has, how each is
encoded and laid out, and how its language model numbers positions;
everything in this module is the same for all families:

- the vision tower merges tokens (DToMe), and the projector runs on the
  merged tokens only;
- the language model runs on the *compact* sequence — text tokens plus the
  unique visual tokens — so norms, projections and MLPs do ``N_un`` tokens of
  work, while attention sees the virtual full sequence through VTU
  (:mod:`.attention`): ``dymu_kernels.vtu_attention`` with RoPE at the
  original positions; sequence mixers other than attention that the family
  declares (Qwen3.5's Gated DeltaNet, :mod:`.mixers`) mix the virtual
  sequence between projections that run on the unique rows;
- ``generate()`` works: the KV cache holds keys/values once per unique token
  (before RoPE; :mod:`.cache`), and every decode step runs
  ``vtu_decode_attention`` over the full virtual sequence.

The processor is unchanged: it still inserts one placeholder per original
patch, and outputs (hidden states, logits) come back at the full positions, so
callers see the shapes they expect. ``remove_dymu(model)`` restores the
original behaviour; applying twice is a no-op.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Dict, Optional, Sequence, Union

import torch

from ..core.compact import compact_extra_rows, to_full
from ..core.lm_features import check_full_attention, check_rotary
from ..core.positions import stored_positions
from ..core.thresholds import Thresholds
from ..families import DyMUStats, Modality, Patch, family_for, model_names
from .attention import DeferredMask, VTUContext, install_vtu
from .cache import VTUCacheState, cache_state, set_cache_state, static_length
from .mixers import install_mixers

SUPPORTED_TRANSFORMERS = ((5, 24), (6, 0))  # [min, max): the versions tested


def _check_transformers() -> None:
    import transformers

    parts = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
    lo, hi = SUPPORTED_TRANSFORMERS
    if not (lo <= parts < hi):
        raise RuntimeError(
            f"dymu_kernels.apply_dymu supports transformers >= {lo[0]}.{lo[1]} and < {hi[0]}.{hi[1]}, "
            f"found {transformers.__version__}"
        )


def _model_parts(model):
    """``(family, inner model, language model)`` of a supported model."""
    family = family_for(model)
    inner = getattr(model, "model", None)
    needed = (family.tower_attr, "language_model")
    if inner is None or not all(hasattr(inner, n) for n in needed):
        raise TypeError(f"{type(model).__name__} has no .model with {needed}: not the transformers "
                        f"{family.class_name} this package patches")
    lm = inner.language_model
    if not hasattr(lm, "rotary_emb") or not hasattr(lm, "layers"):
        raise TypeError(f"the language model {type(lm).__name__} has no rotary_emb/layers; VTU needs a RoPE decoder "
                        "(Llama-like)")
    return family, inner, lm


def apply_dymu(
    model,
    thresholds: Union[None, str, os.PathLike, Sequence[float], Thresholds] = "default",
    *,
    r: Union[None, int, Sequence[int]] = None,
    vtu: bool = True,
    backend: str = "auto",
    trim: Union[str, bool] = "auto",
    deterministic: bool = True,
):
    """Patch a supported transformers model instance with DyMU (see module
    doc): ``LlavaForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``,
    ``Qwen2_5_VLForConditionalGeneration``, ``Qwen2VLForConditionalGeneration``,
    ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
    ``Qwen3_5ForConditionalGeneration``, ``Qwen3_5MoeForConditionalGeneration``
    (:func:`dymu_kernels.families.families`).

    Args:
        model: the model; patched in place and returned.
        thresholds: where and how much the vision tower merges, read once
            against the stages the model's family declares
            (:attr:`dymu_kernels.families.Family.stages`; its module documents
            them): a list of numbers, a threshold JSON file, a
            :class:`Thresholds` or a preset ``"model:level"`` for the family's
            first stage, or a dict ``{stage: thresholds}``. LLaVA-1.5 /
            LLaVA-OneVision: one stage, ``"vit"``, one threshold per vision
            block the model reads (or per block of the whole tower);
            ``"default"`` is the family's published preset (LLaVA-1.5:
            ``"openai/clip-vit-large-patch14-336:low"``; SigLIP has none:
            calibrate with ``python3 -m dymu_kernels.calibrate``).
            Qwen2-VL / Qwen2.5-VL / Qwen3-VL(-MoE) / Qwen3.5(-MoE)
            (:mod:`dymu_kernels.families.qwen2_vl`, :mod:`~dymu_kernels.families.qwen3_vl`,
            :mod:`~dymu_kernels.families.qwen3_5`):
            ``"vit"``, one per tower block, merging 2×2 units inside the
            tower, and ``"merger"``, one per merge round on the patch
            merger's outputs; none are published. None: nothing merges.
        r: instead of thresholds, merge exactly ``r`` tokens per item and
            block (the paper's fixed-r ToMe ablation) in the stage that takes
            it (``"vit"``; Qwen: 2×2 units per image / frame pair): an int, or
            one per block. With ``r``, thresholds may be given only for
            another stage (Qwen: ``{"merger": ...}``).
        vtu: ``False`` is the "merging without VTU" ablation: merged tokens are
            fed with compressed positions ``0..N_un-1`` and ordinary attention.
        backend: merge and attention backend, ``"auto" | "triton" | "cpp" | "torch"``.
        trim: ``"auto" | True | False`` — whether the vision tower shrinks its
            padded sequence to the longest image after each block (see
            :class:`~dymu_kernels.core.encoder.DToMeVisionEncoder`).
            ``"auto"`` trims on the CPU, where it saves compute in proportion
            to the tokens merged, and not on CUDA, where it would cost one host
            sync per block (sync-free until a GPU measurement says otherwise);
            ``False`` keeps the tower capturable in a CUDA graph. Results are
            the same either way.
        deterministic: VTU attention gives bit-identical results run to run,
            as ``scaled_dot_product_attention`` does (default). ``False``
            lets the Triton kernel re-merge with fp32 atomics (GPU only;
            the C++ and torch backends are always deterministic): a little
            faster, but greedy decoding may then differ between runs.

    The user's attention implementation stays theirs:
    ``config._attn_implementation`` and ``set_attn_implementation`` work as
    on the unpatched model, plain calls of the language model use it, and
    DyMU forwards run VTU attention whatever it is.

    Applying again with the same settings is a no-op; with other settings
    the model is re-patched with the new ones (as after :func:`remove_dymu`).

    Raises:
        TypeError for an unsupported model; RuntimeError for an unsupported
        transformers version; ValueError naming the argument for bad
        thresholds (not numbers, not in ``[-1, 1]`` or ``inf``, another count
        than the stage takes, an unknown stage), a bad ``r``, thresholds and
        ``r`` for the same stage, an unknown ``backend`` or ``trim``. A
        threshold file recorded for another model gives a warning.
    """
    _check_transformers()
    family, inner, lm = _model_parts(model)
    encoder, strategy = family.encoder(inner.config, getattr(inner, family.tower_attr), thresholds, r, backend, trim,
                                       names=model_names(model.config))
    if vtu:
        check_full_attention(lm.config, mixers=[m.layer_type for m in family.mixers],
                             partial_rotary=family.partial_rotary)
        check_rotary(lm, partial_rotary=family.partial_rotary)
    current = getattr(model, "_dymu", None)
    if current is not None:
        if current.settings() == (encoder.thresholds, encoder.r, encoder.trim, vtu, backend, bool(deterministic)):
            return model  # the same patch again: a no-op
        remove_dymu(model)  # other settings replace the old ones
    patch = Patch(encoder, vtu, backend, strategy, family, bool(deterministic))
    model._dymu = patch
    # This instance only: generate() encodes images / videos through these methods first.
    inner.forward = functools.partial(_patched_forward, inner, patch)
    patch.undo.append(lambda: inner.__dict__.pop("forward", None))
    for m in family.modalities:
        setattr(inner, m.method, _feature_method(inner, patch, m))
        patch.undo.append(functools.partial(inner.__dict__.pop, m.method, None))
    if vtu:
        install_vtu(lm, patch.undo)
        install_mixers(lm, family.mixers, patch.undo)
        # generate() with a static cache builds its mask through this hook: keep the 2-D padding mask.
        model.create_masks_for_generate = lambda **kwargs: DeferredMask(kwargs)
        patch.undo.append(lambda: model.__dict__.pop("create_masks_for_generate", None))
    return model


def remove_dymu(model):
    """Undo :func:`apply_dymu` on this instance; a model never patched is returned unchanged."""
    patch = getattr(model, "_dymu", None)
    if patch is None:
        return model
    for step in reversed(patch.undo):
        step()
    del model._dymu
    return model


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
# The patched forward of the base model
# ----------------------------------------------------------------------------


def _padding_mask(attention_mask, preallocated: bool = False):
    """The 2-D ``[B, L]`` padding mask in what a patched forward may get: the
    mask itself, one mask per layer type (Qwen2: the same padding in each), or
    the :class:`DeferredMask` generate() made for a static cache — its mask
    padded to the cache's length when the cache's state is ``preallocated``
    (a compiled decode step then takes inputs of fixed shapes)."""
    if isinstance(attention_mask, dict):
        attention_mask = next(iter(attention_mask.values()))
    if isinstance(attention_mask, DeferredMask):
        attention_mask = attention_mask.static if preallocated and attention_mask.static is not None \
            else attention_mask.padding
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"a DyMU-patched model takes a 2-D [batch, sequence] padding attention_mask, got shape "
            f"{tuple(attention_mask.shape)}: custom 4-D masks cannot follow the merged sequence"
        )
    return attention_mask


def _visible_map(state: VTUCacheState, attention_mask):
    """The map a call attends through: positions its ``attention_mask`` hides
    (0) are -1, as masked keys are for the unpatched model. The mask covers
    every position — the cache's and this call's, as transformers expects (for
    a preallocated state: those, or the state's whole capacity)."""
    merge_map = state.merge_map
    if attention_mask is None:
        return merge_map
    attention_mask = attention_mask.to(merge_map.device)
    B, capacity = merge_map.shape
    if state.filled is not None and attention_mask.shape[1] != capacity and attention_mask.shape == (B, state.length):
        attention_mask = torch.nn.functional.pad(attention_mask, (0, capacity - state.length))
    if attention_mask.shape != merge_map.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; with the cache's positions and this call's "
            f"tokens it must be {(B, state.length)} (batch, cached + new positions)"
        )
    return merge_map.masked_fill(attention_mask == 0, -1)


def _feature_method(inner, patch: Patch, modality: Modality):
    """The encoding method of a patched instance (``get_image_features``, …):
    the stock method's parameters — ``generate()`` reads them to choose which
    inputs to hand over — and the modality's merged items in transformers'
    output type. Every argument reaches the family's encoder by name."""
    signature = inspect.signature(getattr(type(inner), modality.method))
    params = list(signature.parameters.values())[1:]  # without self
    signature = signature.replace(parameters=params)
    var_keyword = next((p.name for p in params if p.kind is p.VAR_KEYWORD), None)

    def method(*args, **kwargs):
        arguments = dict(signature.bind(*args, **kwargs).arguments)
        extra = arguments.pop(var_keyword, {}) if var_keyword else {}
        pixels = arguments.pop(modality.pixels)
        return_dict = extra.pop("return_dict", True)
        return merged_features(inner, patch, modality, pixels, {**arguments, **extra}, return_dict)

    method.__signature__ = signature
    method.__name__ = modality.method
    method.__doc__ = f"{modality.method} of a DyMU-patched model: the merged {modality.name}s (see apply_dymu)."
    return method


def merged_features(self, patch: Patch, modality: Modality, pixels, vision_kwargs, return_dict):
    """What a patched encoding method returns: the modality's merged items in
    transformers' output type, or its tuple. A tower output the DyMU tower
    does not compute (its attentions) raises by name."""
    from .outputs import image_outputs, stock_tuple

    if vision_kwargs.get("output_attentions"):
        raise ValueError(f"output_attentions=True: the DyMU vision tower does not return its attention weights "
                         f"({modality.method}); call the unpatched model's tower for them")
    proj = getattr(self, "multi_modal_projector", None)
    dtype = proj.linear_1.weight.dtype if hasattr(proj, "linear_1") else pixels.dtype
    out = image_outputs(modality.encode(self, patch, pixels, dtype, vision_kwargs), patch.family)
    return out if return_dict is not False else stock_tuple(out)


def _placeholder_mask(self, input_ids, embeds, token_id: int):
    """Placeholders of ``token_id`` as transformers finds them: by id, or
    (inputs_embeds only) as rows equal to that token's embedding."""
    if input_ids is not None:
        return input_ids == token_id
    token = torch.full((), token_id, dtype=torch.long, device=embeds.device)
    return (embeds == self.get_input_embeddings()(token)).all(-1)


def _prefill_state(self, patch: Patch, masks, embeds, attention_mask, position_ids, items, names, input_ids,
                   vision_kwargs, kwargs):
    """Prompt step: compact sequence, its map, full positions and RoPE tables;
    the family's extra language-model inputs (:attr:`Family.lm_inputs`) go
    into the language model's ``kwargs``."""
    B, T = embeds.shape[:2]
    compact, merge_map, n_unique, extra, visual = compact_extra_rows(masks, attention_mask, embeds, items, names=names)
    if extra is not None:  # rows the family hands the language model besides the embeddings (deepstack taps)
        kwargs.update(patch.family.lm_inputs(self, extra, visual))
    positions = patch.family.positions.prompt(self, position_ids, input_ids, embeds, attention_mask, vision_kwargs)
    cos, sin = self.language_model.rotary_emb(compact, positions)
    positions = stored_positions(positions)
    rows = torch.tensor(compact.shape[1], device=merge_map.device)  # a tensor: compiled steps do not guard on it
    state = VTUCacheState(merge_map, cos, sin, positions, rows=rows)
    if not torch.compiler.is_compiling():
        # Every call on the cache appends positions: a compiled decode step
        # (generate() with a static cache) treats their count as dynamic from
        # the first step on instead of recompiling when it grows.
        for t in (state.merge_map, state.cos, state.sin, state.positions):  # [B, N, ...]
            torch._dynamo.maybe_mark_dynamic(t, 1)
    return compact, state, n_unique


def _decode_state(self, patch: Patch, state: VTUCacheState, embeds, position_ids, attention_mask):
    """A call on a filled cache (generation step, new text): T new singleton
    tokens appended to the map, one cache row each, at the positions the
    family's provider gives (the caller's, else as the language model
    numbers them after the cache's)."""
    B, T, _ = embeds.shape
    device = state.merge_map.device
    new_pos = patch.family.positions.step(self, state.positions, state.seen, position_ids, embeds)
    rows = (state.rows + torch.arange(T, device=device)).expand(B, T)
    cos_new, sin_new = self.language_model.rotary_emb(embeds, new_pos)
    mask = None
    if state.compact_mask is not None:  # no-VTU ablation: the new rows' padding
        mask = state.compact_mask.new_ones(B, T) if attention_mask is None else attention_mask[:, -T:].to(state.compact_mask)
    return state.append(rows, cos_new, sin_new, stored_positions(new_pos), mask)


def _decode_view(state: VTUCacheState, old: VTUCacheState, visible: torch.Tensor, T: int):
    """``(merge_map, cos, sin, query_columns)`` decode attention takes for T
    new tokens, which it reads at the map's last T positions. A preallocated
    state holds them at its columns ``old.filled ..`` instead: there they are
    masked (-1) and their columns appended at the end — ``[B, capacity + T]``,
    the same shapes at every step; ``query_columns`` says where they came
    from (:class:`VTUContext`)."""
    if state.filled is None:
        return visible, state.cos, state.sin, None
    at = old.filled + torch.arange(T, device=visible.device)
    pick = lambda t: t.index_select(1, at)  # noqa: E731
    return (torch.cat([visible.index_fill(1, at, -1), pick(visible)], 1), torch.cat([state.cos, pick(state.cos)], 1),
            torch.cat([state.sin, pick(state.sin)], 1), at)


def _cache_form(cache, patch: Patch, state: VTUCacheState) -> VTUCacheState:
    """The prompt's state as the cache keeps it: preallocated to a static
    cache's length (VTU only), so compiled decode steps see fixed shapes."""
    capacity = static_length(cache)
    if patch.vtu and capacity is not None and capacity >= state.merge_map.shape[1]:
        return state.preallocated(capacity)
    return state


def _run_language_model(lm, patch: Patch, x, old: Optional[VTUCacheState], state: VTUCacheState, n_unique, cache,
                        use_cache, attention_mask, kwargs):
    """The language model's own forward on ``x`` — the compact prompt, or the
    new tokens of a call on a filled cache (``old`` is the cache's state
    before it; ``attention_mask`` that call's mask over all positions)."""
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
    merge_map, cos, sin, at = (state.merge_map, state.cos, state.sin, None) if old is None else \
        _decode_view(state, old, _visible_map(state, attention_mask), T)
    weights = bool(kwargs.get("output_attentions", lm.config.output_attentions)) and \
        lm.config._attn_implementation == "eager"
    ctx = VTUContext(merge_map, cos, sin, decode=old is not None, backend=patch.backend,
                     deterministic=patch.deterministic, weights=weights, query_columns=at,
                     rotary_dim=cos.shape[-1] if patch.family.partial_rotary else None)
    return lm(inputs_embeds=x, attention_mask=None, position_ids=rows, use_cache=use_cache, dymu_vtu=ctx,
              cache=cache, **kwargs)


@torch.compiler.disable
def _filled(cache) -> bool:
    """Whether ``cache`` holds positions (outside a compiled graph: a hybrid
    cache — Qwen3.5's linear layers — counts them in a tensor, and a branch
    on it would break the graph where a compiled prompt step runs)."""
    return bool(cache.get_seq_length() > 0)


def _patched_forward(
    self, patch: Patch, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
    inputs_embeds=None, use_cache=None, mm_encoder_outputs=None, cache=None, return_dict=None, **kwargs,
):
    """The base model's ``forward`` of a patched instance (``LlavaModel``,
    ``LlavaOnevisionModel``): same arguments and output type; the language
    model runs through its own forward (hidden states, gradient checkpointing,
    device hooks as usual) on the compact sequence. The KV cache comes as
    ``cache`` or ``past_key_values``."""
    from transformers.cache_utils import DynamicCache

    from .outputs import DyMUImageOutputs, image_outputs

    cache = cache if cache is not None else past_key_values
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    lm = self.language_model
    vision_kwargs = {n: kwargs.pop(n) for n in patch.family.vision_kwargs if n in kwargs}
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
    def placeholders(m):
        return _placeholder_mask(self, input_ids, embeds, getattr(self.config, m.token_attr))

    old = cache_state(cache)
    attention_mask = _padding_mask(attention_mask, preallocated=old is not None and old.filled is not None)
    if old is not None:  # a generation step, or new text on a filled cache
        for m in modalities:
            given = vision_kwargs.get(m.pixels) is not None or encoded[m.name] is not None
            if given and bool(placeholders(m).any()):
                raise ValueError(
                    f"new {m.name} placeholders on a DyMU KV cache that already holds a prompt: {m.name}s can only "
                    f"enter with the first forward on an empty cache; start a new generation (empty cache) with all "
                    f"{m.name}s"
                )
        state, n_unique, x = _decode_state(self, patch, old, embeds, position_ids, attention_mask), None, embeds
    else:
        if cache is not None and _filled(cache):
            raise ValueError("this KV cache was filled without DyMU; start generation from an empty cache")
        items = []
        for m in modalities:
            pixels = vision_kwargs.get(m.pixels)
            if encoded[m.name] is None and pixels is not None:
                encoded[m.name] = image_outputs(m.encode(self, patch, pixels, embeds.dtype, vision_kwargs),
                                                patch.family)
            if encoded[m.name] is not None and not isinstance(encoded[m.name], DyMUImageOutputs):
                raise ValueError(f"{m.name} features were encoded without DyMU; pass {m.pixels} to the patched model")
            items.append(encoded[m.name].merged_items() if encoded[m.name] is not None else None)
        T = embeds.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        x, state, n_unique = _prefill_state(self, patch, [placeholders(m) for m in modalities], embeds, mask,
                                            position_ids, items, tuple(m.name for m in modalities), input_ids,
                                            vision_kwargs, kwargs)
    out = _run_language_model(lm, patch, x, old, state, n_unique, cache, use_cache, attention_mask, kwargs)
    if use_cache:
        set_cache_state(cache, state if old is not None else _cache_form(cache, patch, state))
    full = (lambda h: h) if old is not None else functools.partial(to_full, merge_map=state.merge_map)
    # output_hidden_states may select some layers (an int or a list): the others come back as None
    hidden_states = None if out.hidden_states is None else tuple(None if h is None else full(h)
                                                                 for h in out.hidden_states)
    more = {}
    if getattr(out, "router_logits", None) is not None:  # MoE: per layer [B * rows, experts], at the full positions
        B = x.shape[0]
        more["router_logits"] = tuple(full(r.view(B, -1, r.shape[-1])).flatten(0, 1) for r in out.router_logits)
    result = patch.family.output_class()(
        last_hidden_state=full(out.last_hidden_state), hidden_states=hidden_states, attentions=out.attentions,
        cache=cache if use_cache else None, **{f"{m.name}_outputs": encoded[m.name] for m in modalities}, **more,
    )
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    return result if return_dict else result.to_tuple()  # as transformers' @can_return_tuple does
