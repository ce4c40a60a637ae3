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

How it hooks in (:func:`install_vtu`): a DyMU forward calls the language
model's own forward with a :class:`VTUContext` (the merge map and the full
positions' cos/sin) as the ``dymu_vtu`` keyword, which transformers forwards to
the attention function — the per-call state. Forward hooks mark the calling
thread while such a call runs, for the two upstream places that cannot see the
keyword: the rotary module is the identity there (the cache stores un-rotated
keys), and the attention modules read ``"dymu_vtu"`` as their implementation
(through :class:`_AttentionConfig`). Everywhere else — plain calls of the
language model, other threads, ``config._attn_implementation`` — the model is
the user's, with the attention implementation they chose.
"""

from __future__ import annotations

import functools
import os
import threading
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
    """What attention needs for one forward: the map and the full positions' RoPE.

    It travels with the call as the ``dymu_vtu`` keyword argument, which
    transformers forwards from the language model down to the attention
    function: the per-call state of a VTU forward (two threads running one
    model each carry their own)."""

    merge_map: torch.Tensor  # [B, N] full position -> cache row (-1 padding or masked)
    cos: torch.Tensor  # [B, N, D]
    sin: torch.Tensor
    decode: bool
    backend: str
    deterministic: bool = True  # Triton: no fp32 atomics in the re-merge (bit-identical run to run)
    weights: bool = False  # also return attention probabilities at the full positions (output_attentions, eager)

    def to(self, device, non_blocking: bool = False) -> "VTUContext":
        """The context on ``device``: accelerate's hooks (``device_map`` over
        several GPUs) move arguments they do not know by calling ``.to``, so
        the map and tables follow each layer like its other inputs."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, merge_map=move(self.merge_map), cos=move(self.cos), sin=move(self.sin))


class DeferredMask:
    """What ``generate()`` builds as the attention mask of a patched model
    with a compileable (static) cache (``create_masks_for_generate``).

    VTU needs no mask of its own, only the 2-D padding mask — which
    ``generate()`` with a static cache turns into a 4-D mask object *before*
    calling the model; this keeps the padding mask for the patched forward.
    """

    def __init__(self, mask_kwargs: dict):
        self.padding = mask_kwargs.get("attention_mask")  # [B, L] or None


# Per thread: how many calls carrying a VTU context are running. The two
# upstream places that cannot see the call's keyword arguments read it: the
# rotary module (the identity inside VTU calls) and the attention modules'
# implementation name (``"dymu_vtu"`` inside VTU calls, the user's otherwise).
_ACTIVE = threading.local()


def _vtu_active() -> bool:
    return getattr(_ACTIVE, "depth", 0) > 0


def _enter_if_vtu(module, args, kwargs):
    """Forward pre-hook of the language model and its attention modules: a
    call carrying a VTU context marks this thread active until it returns
    (also when gradient checkpointing recomputes a layer in backward)."""
    if kwargs.get("dymu_vtu") is not None:
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1


def _leave_if_vtu(module, args, kwargs, output):
    if kwargs.get("dymu_vtu") is not None:
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 1) - 1


class _AttentionConfig:
    """The config the attention modules of a patched language model read.

    Every attribute is the model's own config's (reads and writes go through),
    except ``_attn_implementation``: ``"dymu_vtu"`` while a VTU call runs in
    this thread, the user's implementation otherwise. So the user's choice
    stays what transformers reports and what plain calls use, and
    ``set_attn_implementation`` keeps working on a patched model."""

    def __init__(self, config):
        object.__setattr__(self, "_dymu_config", config)

    @property
    def _attn_implementation(self):
        return ATTN_NAME if _vtu_active() else self._dymu_config._attn_implementation

    def __getattr__(self, name):
        if name.startswith("_dymu"):  # copy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self._dymu_config, name)

    def __setattr__(self, name, value):
        setattr(self._dymu_config, name, value)


# Attention keyword arguments that carry no attention feature (transformers
# passes the forward's kwargs down to the attention function).
_BENIGN_KWARGS = frozenset({"position_ids", "cache_position", "output_attentions", "output_hidden_states",
                            "output_router_logits", "use_cache", "return_dict", "is_causal", "layer_idx",
                            "logits_to_keep", "num_items_in_batch"})
# Features VTU does not compute: accepted only when off (None / 0 / False).
_FEATURE_KWARGS = {"sliding_window": "a sliding window", "softcap": "logit soft-capping",
                   "s_aux": "attention sinks", "sinks": "attention sinks"}


def _check_attention_kwargs(module, dropout, kwargs) -> None:
    if dropout:
        raise ValueError(f"attention dropout ({dropout}) is not computed by VTU attention: call model.eval(), or "
                         "set the language model's attention_dropout to 0 for training with DyMU")
    for name, value in kwargs.items():
        if value is None or value is False or name in _BENIGN_KWARGS:
            continue
        feature = _FEATURE_KWARGS.get(name)
        if feature is not None:
            raise ValueError(f"{type(module).__name__} asks for {feature} ({name}={value!r}); VTU attention computes "
                             "full causal attention only")
        raise TypeError(f"VTU attention got an attention argument it does not implement: {name}={value!r} (from "
                        f"{type(module).__name__}); DyMU refuses rather than ignore it")


def _attention_probs(query, key, ctx: "VTUContext", scale: float):
    """Attention probabilities at the full positions, as eager attention returns
    them (``output_attentions``): ``[B, H, N, N]`` for a prompt, ``[B, H, T, N]``
    for T new tokens. Computed through the expanded sequence (slow: O(N²) memory,
    on request only); masked (future, padding) keys get probability 0."""
    from ..reference.segment import unmerge
    from ..reference.vtu import apply_rope

    B, N = ctx.merge_map.shape
    cos, sin = (t.to(torch.float32)[:, None] for t in (ctx.cos, ctx.sin))
    rows = ctx.merge_map.clamp_min(0)
    n_rep = query.shape[1] // key.shape[1]
    k = apply_rope(unmerge(key.float(), rows), cos, sin).repeat_interleave(n_rep, 1)
    if ctx.decode:
        T = query.shape[2]
        q = apply_rope(query.float(), cos[:, :, N - T:], sin[:, :, N - T:])
        qpos = torch.arange(N - T, N, device=query.device)
    else:
        q = apply_rope(unmerge(query.float(), rows), cos, sin)
        qpos = torch.arange(N, device=query.device)
    allowed = (torch.arange(N, device=query.device)[None, :] <= qpos[:, None])[None, None]
    allowed = allowed & (ctx.merge_map >= 0)[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a query with no key at all: zeros
    return probs.to(query.dtype)


def dymu_vtu_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, dymu_vtu=None, **kwargs):
    """transformers attention function of the ``"dymu_vtu"`` implementation:
    VTU attention over the call's :class:`VTUContext` (``dymu_vtu``). Any
    attention feature VTU does not compute raises (see
    :func:`_check_attention_kwargs`), never silently ignored."""
    if dymu_vtu is None:
        raise RuntimeError("the dymu_vtu attention function was called without a VTU context (dymu_vtu=...); it "
                           "only runs inside a DyMU forward")
    _check_attention_kwargs(module, dropout, kwargs)
    ctx: VTUContext = dymu_vtu
    if not ctx.decode and key.shape[2] != query.shape[2]:
        # A static cache returns its whole buffer; a prompt (always on an empty
        # cache) wrote rows 0..N_un-1, the ones the map points into.
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    key, value = key.to(query.dtype), value.to(query.dtype)
    cos, sin = ctx.cos.to(query.dtype), ctx.sin.to(query.dtype)
    if ctx.decode:
        out = vtu_decode_attention(query, key, value, ctx.merge_map, cos, sin, scale=scaling, backend=ctx.backend)
    else:
        out = vtu_attention(query, key, value, ctx.merge_map, cos, sin, scale=scaling, backend=ctx.backend,
                            deterministic=ctx.deterministic)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    probs = _attention_probs(query, key, ctx, scale) if ctx.weights else None
    return out.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, dymu_vtu_attention)


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
    select_strategy: str
    family: "Family"
    deterministic: bool = True  # VTU attention without fp32 atomics (Triton)
    counts: Dict[str, _ImageCounts] = field(default_factory=dict)  # per modality, of its last tower batch
    undo: List[Callable[[], None]] = field(default_factory=list)  # what remove_dymu runs, newest first

    def settings(self):
        """What :func:`apply_dymu` was asked for (to tell a repeat from a change)."""
        e = self.encoder
        return (e.thresholds, e.r, e.trim, self.vtu, self.backend, self.deterministic)


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


def _text_attr(text_config, name):
    """A config attribute, also where transformers 5 keeps RoPE settings (``rope_parameters``)."""
    value = getattr(text_config, name, None)
    if value is None:
        value = (getattr(text_config, "rope_parameters", None) or {}).get(name)
    return value


def check_full_attention(text_config) -> None:
    """Raise ValueError naming every language-model attention feature VTU does
    not compute — sliding windows (``layer_types``, ``sliding_window``,
    ``attention_chunk_size``), logit soft-capping, attention sinks, partial
    rotary embeddings: VTU is full causal attention with RoPE over the whole
    head, and a feature it ignored would give plausible wrong answers."""
    found = []
    layer_types = getattr(text_config, "layer_types", None)
    other = sorted(set(layer_types or []) - {"full_attention"})
    if other:
        found.append(f"layer_types {other}")
    elif getattr(text_config, "sliding_window", None) is not None and getattr(text_config, "use_sliding_window", True) \
            and layer_types is None:
        found.append(f"sliding_window={text_config.sliding_window}")
    for name in ("attention_chunk_size", "attn_logit_softcapping"):
        if getattr(text_config, name, None) is not None:
            found.append(f"{name}={getattr(text_config, name)}")
    if getattr(text_config, "use_sinks", False) or getattr(text_config, "attention_sinks", None):
        found.append("attention sinks")
    for name in ("partial_rotary_factor", "rotary_pct"):
        value = _text_attr(text_config, name)
        if value is not None and value != 1:
            found.append(f"{name}={value}")
    if found:
        raise ValueError(f"the language model uses {', '.join(found)}; VTU attention computes full causal attention "
                         "with RoPE over the whole head only, so DyMU cannot run this model exactly")


def check_rotary(lm) -> None:
    """Raise ValueError when the language model's rotary tables do not cover
    the whole head (partial rotary in any config spelling) or its attention
    modules carry sinks: what :func:`check_full_attention` reads from the
    config, checked on the modules themselves."""
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    inv_freq = getattr(lm.rotary_emb, "inv_freq", None)
    if inv_freq is not None and 2 * inv_freq.numel() != head_dim:
        raise ValueError(f"the language model rotates {2 * inv_freq.numel()} of {head_dim} head dims (partial "
                         "rotary, partial_rotary_factor < 1); VTU attention rotates the whole head, so DyMU cannot "
                         "run this model exactly")
    for layer in lm.layers:
        if getattr(getattr(layer, "self_attn", None), "sinks", None) is not None:
            raise ValueError("the language model's attention has sinks; VTU attention does not compute them")


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
    deterministic: bool = True,
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
        transformers version; ValueError for bad thresholds (not numbers, not
        in ``[-1, 1]`` or ``inf``, too few) / r.
    """
    _check_transformers()
    family, inner, lm = _llava_parts(model)
    encoder = tower_encoder(family, inner.config, inner.vision_tower, thresholds, r, backend, trim)
    strategy = inner.config.vision_feature_select_strategy
    if vtu:
        check_full_attention(lm.config)
        check_rotary(lm)
    current = getattr(model, "_dymu", None)
    if current is not None:
        if current.settings() == (encoder.thresholds, encoder.r, encoder.trim, vtu, backend, bool(deterministic)):
            return model  # the same patch again: a no-op
        remove_dymu(model)  # other settings replace the old ones
    patch = _Patch(encoder, vtu, backend, strategy, family, bool(deterministic))
    model._dymu = patch
    # This instance only: generate() encodes images / videos through these methods first.
    inner.forward = functools.partial(_patched_forward, inner, patch)
    patch.undo.append(lambda: inner.__dict__.pop("forward", None))
    for m in family.modalities:
        setattr(inner, m.method, functools.partial(m.patched, inner, patch, m))
        patch.undo.append(functools.partial(inner.__dict__.pop, m.method, None))
    if vtu:
        install_vtu(lm, patch.undo)
        # generate() with a static cache builds its mask through this hook: keep the 2-D padding mask.
        model.create_masks_for_generate = lambda **kwargs: DeferredMask(kwargs)
        patch.undo.append(lambda: model.__dict__.pop("create_masks_for_generate", None))
    return model


def install_vtu(lm, undo: List[Callable[[], None]]) -> None:
    """Make this language model instance run VTU attention in calls that carry
    a :class:`VTUContext` (``dymu_vtu=``), and exactly as before in every other
    call: forward hooks on the model and its attention modules mark the
    thread's VTU calls, the attention modules read the implementation name
    through :class:`_AttentionConfig`, and the rotary module is the identity
    inside VTU calls (:func:`_rotary_forward`). Appends its undo steps."""
    _register_attention()
    config = lm.config
    view = _AttentionConfig(config)
    for module in lm.modules():
        if module is lm or getattr(module, "config", None) is not config:
            continue
        module.config = view
        undo.append(functools.partial(setattr, module, "config", config))
    for module in [lm] + [m for m in lm.modules() if m is not lm and getattr(m, "config", None) is view]:
        pre = module.register_forward_pre_hook(_enter_if_vtu, with_kwargs=True)
        post = module.register_forward_hook(_leave_if_vtu, with_kwargs=True, always_call=True)
        undo.extend([pre.remove, post.remove])
    lm.rotary_emb.forward = functools.partial(_rotary_forward, lm.rotary_emb)
    undo.append(lambda: lm.rotary_emb.__dict__.pop("forward", None))


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
# The patched LlavaModel.forward
# ----------------------------------------------------------------------------


def _full_positions(position_ids, B, N, device):
    """Positions of a prompt: the caller's, else ``0..N-1`` as the language
    model itself numbers them (``generate()`` passes positions that skip padding)."""
    # Materialised (no view of the caller's tensor): the cache keeps them, and a
    # compiled decode step guards on whether its inputs are views.
    if position_ids is not None:
        return position_ids.to(device).long().expand(B, N).clone()
    return torch.arange(N, device=device).expand(B, N).clone()


def _padding_mask(attention_mask):
    """The 2-D ``[B, L]`` padding mask in what a patched forward may get: the
    mask itself, one mask per layer type (Qwen2: the same padding in each), or
    the :class:`DeferredMask` generate() made for a static cache."""
    if isinstance(attention_mask, dict):
        attention_mask = next(iter(attention_mask.values()))
    if isinstance(attention_mask, DeferredMask):
        attention_mask = attention_mask.padding
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"a DyMU-patched model takes a 2-D [batch, sequence] padding attention_mask, got shape "
            f"{tuple(attention_mask.shape)}: custom 4-D masks cannot follow the merged sequence"
        )
    return attention_mask


def _visible_map(merge_map, attention_mask):
    """The map a call attends through: positions its ``attention_mask`` hides
    (0) are -1, as masked keys are for the unpatched model. The mask covers
    every position — the cache's and this call's, as transformers expects."""
    if attention_mask is None:
        return merge_map
    if attention_mask.shape != merge_map.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; with the cache's positions and this call's "
            f"tokens it must be {tuple(merge_map.shape)} (batch, cached + new positions)"
        )
    return merge_map.masked_fill(attention_mask.to(merge_map.device) == 0, -1)


def _patched_image_features(self, patch: _Patch, modality: "Modality", pixel_values, image_sizes=None,
                            vision_feature_layer=None, vision_feature_select_strategy=None, vision_aspect_ratio=None,
                            batch_num_images=None, return_dict=True, **kwargs):
    """``get_image_features`` of a patched instance: the merged images in
    transformers' output type. The named parameters are what ``generate()``
    reads from the signature to decide which inputs to hand over."""
    vision_kwargs = {"image_sizes": image_sizes, "vision_aspect_ratio": vision_aspect_ratio,
                     "batch_num_images": batch_num_images, "output_hidden_states": kwargs.get("output_hidden_states")}
    return _features(self, patch, modality, pixel_values, vision_kwargs, return_dict)


def _patched_video_features(self, patch: _Patch, modality: "Modality", pixel_values_videos, vision_feature_layer=None,
                            vision_feature_select_strategy=None, return_dict=True, **kwargs):
    """``get_video_features`` of a patched instance (see :func:`_patched_image_features`)."""
    vision_kwargs = {"output_hidden_states": kwargs.get("output_hidden_states")}
    return _features(self, patch, modality, pixel_values_videos, vision_kwargs, return_dict)


def _features(self, patch: _Patch, modality: "Modality", pixels, vision_kwargs, return_dict):
    proj = self.multi_modal_projector
    dtype = proj.linear_1.weight.dtype if hasattr(proj, "linear_1") else pixels.dtype
    out = modality.encode(self, patch, pixels, dtype, vision_kwargs)
    return out if return_dict is not False else out.to_tuple()


def merged_tower(self, patch: _Patch, pixel_values, dtype, modality: str = "image", vision_kwargs=None):
    """The tower's merged tokens of a batch of images (crops, frames), projected:
    ``(features [n, U_cap, C], counts [n], slots [n, P], tower)``, minus CLS for
    ``"default"``; their counts become ``dymu_stats(model, modality)``.
    ``tower``: the tower's ``last_hidden_state`` / ``hidden_states`` at every
    token, in transformers' shapes (:func:`.image_outputs.tower_outputs`) —
    by default only the block ``vision_feature_layer`` selects, as
    transformers returns them; all with ``output_hidden_states=True``."""
    from .image_outputs import tower_outputs

    wanted = (vision_kwargs or {}).get("output_hidden_states")
    if wanted is None or wanted is False:
        wanted = patch.encoder.num_layers
    out = patch.encoder(pixel_values.to(dtype), output_hidden_states=wanted)
    feats, counts, slots = tower_tokens(out, patch.select_strategy)
    patch.counts[modality] = _ImageCounts(counts, out.tokens_per_layer, slots.shape[1])
    return self.multi_modal_projector(feats), counts, slots, tower_outputs(patch.encoder, out)


def tower_tokens(out, select_strategy: str):
    """The merged tower tokens the projector reads from an encoder output:
    ``(features [n, U_cap, C_vis], counts [n], slots [n, P])`` — minus CLS for
    ``"default"``; ``slots`` maps each of the ``P`` placeholders to its unique token."""
    if select_strategy == "default":  # drop CLS (always slot 0: it never merges)
        return out.features[:, 1:], out.lengths.long() - 1, out.pos_map[:, 1:].long() - 1
    return out.features, out.lengths.long(), out.pos_map.long()


def _encode_images(self, patch: _Patch, pixel_values, dtype, vision_kwargs=None):
    """LLaVA-1.5: one merged tower item per image."""
    from .image_outputs import image_outputs

    feats, counts, slots, tower = merged_tower(self, patch, pixel_values, dtype, vision_kwargs=vision_kwargs)
    return image_outputs(MergedImages(feats, counts, slots), **tower)


def _rotary_forward(rot, x, position_ids, *args, **kwargs):
    """``forward`` of the language model's rotary module while patched: the
    identity (cos 1, sin 0) inside a VTU call in this thread — VTU rotates
    inside attention, at the full positions, and the cache keeps keys
    un-rotated — and the original rotation otherwise (a plain call of the
    language model, another thread). The identity tables are made directly,
    shaped like the module's (``[*position_ids.shape, 2 * len(inv_freq)]`` in
    ``x``'s dtype)."""
    inv_freq = getattr(rot, "inv_freq", None)
    if not _vtu_active() or inv_freq is None:
        cos, sin = type(rot).forward(rot, x, position_ids, *args, **kwargs)
        if _vtu_active():
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
    positions = _full_positions(position_ids, B, T, embeds.device)
    cos, sin = self.language_model.rotary_emb(compact, positions)
    rows = torch.tensor(compact.shape[1], device=merge_map.device)  # a tensor: compiled steps do not guard on it
    state = VTUCacheState(merge_map, cos, sin, positions, rows=rows)
    if not torch.compiler.is_compiling():
        # Every call on the cache appends positions: a compiled decode step
        # (generate() with a static cache) treats their count as dynamic from
        # the first step on instead of recompiling when it grows.
        for t in (state.merge_map, state.cos, state.sin, state.positions):  # [B, N, ...]
            torch._dynamo.maybe_mark_dynamic(t, 1)
    return compact, state, n_unique


def _decode_state(self, state: VTUCacheState, embeds, position_ids, attention_mask):
    """A call on a filled cache (generation step, new text): T new singleton
    tokens appended to the map, one cache row each. Positions are the
    caller's, else they follow every position the cache has seen (as the
    language model numbers them)."""
    B, T, _ = embeds.shape
    device = state.merge_map.device
    if position_ids is not None:
        new_pos = position_ids[..., -T:].to(device).expand(B, T).long()
    else:
        new_pos = (state.length + torch.arange(T, device=device)).expand(B, T)
    rows = (state.rows + torch.arange(T, device=device)).to(torch.int32)
    cos_new, sin_new = self.language_model.rotary_emb(embeds, new_pos)
    mask = state.compact_mask
    if mask is not None:  # no-VTU ablation: the new rows' padding
        new = mask.new_ones(B, T) if attention_mask is None else attention_mask[:, -T:].to(mask)
        mask = torch.cat([mask, new], 1)
    return replace(state, merge_map=torch.cat([state.merge_map, rows.expand(B, T)], 1),
                   cos=torch.cat([state.cos, cos_new], 1), sin=torch.cat([state.sin, sin_new], 1),
                   positions=torch.cat([state.positions, new_pos], 1), rows=state.rows + T, compact_mask=mask)


def _run_language_model(lm, patch: _Patch, x, old: Optional[VTUCacheState], state: VTUCacheState, n_unique, cache,
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
    merge_map = state.merge_map if old is None else _visible_map(state.merge_map, attention_mask)
    weights = bool(kwargs.get("output_attentions", lm.config.output_attentions)) and \
        lm.config._attn_implementation == "eager"
    ctx = VTUContext(merge_map, state.cos, state.sin, decode=old is not None, backend=patch.backend,
                     deterministic=patch.deterministic, weights=weights)
    return lm(inputs_embeds=x, attention_mask=None, position_ids=rows, use_cache=use_cache, dymu_vtu=ctx,
              cache=cache, **kwargs)


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
    attention_mask = _padding_mask(attention_mask)
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
        state, n_unique, x = _decode_state(self, old, embeds, position_ids, attention_mask), None, embeds
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
        T = embeds.shape[1]
        mask = attention_mask[:, -T:] if attention_mask is not None else None
        x, state, n_unique = _prefill_state(self, [placeholders(m) for m in modalities], embeds, mask, position_ids,
                                            items, tuple(m.name for m in modalities))
    out = _run_language_model(lm, patch, x, old, state, n_unique, cache, use_cache, attention_mask, kwargs)
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
