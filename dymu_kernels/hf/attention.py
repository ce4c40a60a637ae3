"""VTU attention inside a transformers language model, per call.

A DyMU forward calls the language model's own forward with a
:class:`VTUContext` (the merge map and the full positions' cos/sin) as the
``dymu_vtu`` keyword, which transformers forwards to the attention function
(:func:`dymu_vtu_attention`, registered as the ``"dymu_vtu"``
``AttentionInterface``) — the per-call state. Forward hooks
(:func:`install_vtu`) mark the calling thread while such a call runs, for the
two upstream places that cannot see the keyword: the rotary module is the
identity there (the cache stores un-rotated keys; VTU rotates inside
attention at the full positions), and the attention modules read
``"dymu_vtu"`` as their implementation (through :class:`_AttentionConfig`).
Everywhere else — plain calls of the language model, other threads,
``config._attn_implementation`` — the model is the user's, with the
attention implementation they chose.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch

from ..ops.vtu import vtu_attention, vtu_decode_attention
from .cache import static_length


ATTN_NAME = "dymu_vtu"


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
    # Decode on a preallocated cache state (static caches): the positions the T new tokens hold in the cache's
    # state, [T]. The map and tables then end with the new tokens' columns (where decode attention takes its
    # queries), their own columns masked; attention weights go back to the cache's layout.
    query_columns: Optional[torch.Tensor] = None
    # Partial rotary (the family's ``partial_rotary``): the first ``rotary_dim`` dims of each head rotate, the
    # tables being transformers' ``[.., rotary_dim]``; None: the whole head.
    rotary_dim: Optional[int] = None

    def to(self, device, non_blocking: bool = False) -> "VTUContext":
        """The context on ``device``: accelerate's hooks (``device_map`` over
        several GPUs) move arguments they do not know by calling ``.to``, so
        the map and tables follow each layer like its other inputs."""
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(self, merge_map=move(self.merge_map), cos=move(self.cos), sin=move(self.sin),
                       query_columns=move(self.query_columns))


class DeferredMask:
    """What ``generate()`` builds as the attention mask of a patched model
    with a compileable (static) cache (``create_masks_for_generate``).

    VTU needs no mask of its own, only the 2-D padding mask — which
    ``generate()`` with a static cache turns into a 4-D mask object *before*
    calling the model; this keeps the padding mask for the patched forward,
    also padded with zeros to the cache's length (``static``): what a decode
    step on a preallocated state (:meth:`VTUCacheState.preallocated`) takes,
    in one shape at every step.
    """

    def __init__(self, mask_kwargs: dict):
        self.padding = mask_kwargs.get("attention_mask")  # [B, L] or None
        cache = mask_kwargs.get("cache", mask_kwargs.get("past_key_values"))  # transformers >= 5.25: "cache"
        capacity = static_length(cache)
        self.static = None  # [B, capacity] or None
        if self.padding is not None and capacity is not None and capacity >= self.padding.shape[-1]:
            self.static = torch.nn.functional.pad(self.padding, (0, capacity - self.padding.shape[-1]))


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
# passes the forward's kwargs down to the attention function): outputs,
# caching, and the loss's own keywords (``*ForConditionalGeneration`` hands
# every kwarg to both the model and its loss function).
_BENIGN_KWARGS = frozenset({"position_ids", "cache_position", "output_attentions", "output_hidden_states",
                            "output_router_logits", "use_cache", "return_dict", "is_causal", "layer_idx",
                            "logits_to_keep", "num_items_in_batch", "shift_labels", "ignore_index"})
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
    if ctx.query_columns is not None:  # the new tokens' weights back at their own (masked, 0) columns
        T = query.shape[2]
        probs = probs[..., :-T].index_copy(-1, ctx.query_columns, probs[..., -T:])
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
    buffer = key.shape[2]  # a static cache hands over its whole buffer (max_cache_len rows)
    if not ctx.decode and key.shape[2] != query.shape[2]:
        # A static cache returns its whole buffer; a prompt (always on an empty
        # cache) wrote rows 0..N_un-1, the ones the map points into.
        key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    key, value = key.to(query.dtype), value.to(query.dtype)
    cos, sin = ctx.cos.to(query.dtype), ctx.sin.to(query.dtype)
    if ctx.decode:
        out = vtu_decode_attention(query, key, value, ctx.merge_map, cos, sin, scale=scaling, backend=ctx.backend,
                                   rotary_dim=ctx.rotary_dim)
    else:
        out = vtu_attention(query, key, value, ctx.merge_map, cos, sin, scale=scaling, backend=ctx.backend,
                            deterministic=ctx.deterministic, rotary_dim=ctx.rotary_dim)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    probs = _attention_probs(query, key, ctx, scale) if ctx.weights else None
    if probs is not None and buffer > probs.shape[-1]:
        # A static cache: unpatched attention weighs its whole buffer (the slots past the positions get 0).
        probs = torch.nn.functional.pad(probs, (0, buffer - probs.shape[-1]))
    return out.transpose(1, 2).contiguous(), probs


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, dymu_vtu_attention)


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


def _rotary_forward(rot, x, position_ids, *args, **kwargs):
    """``forward`` of the language model's rotary module while patched: the
    identity (cos 1, sin 0) inside a VTU call in this thread — VTU rotates
    inside attention, at the full positions, and the cache keeps keys
    un-rotated — and the original rotation otherwise (a plain call of the
    language model, another thread). The identity tables are made directly,
    shaped like the module's (``[B, T, 2 * len(inv_freq)]`` in ``x``'s dtype)."""
    inv_freq = getattr(rot, "inv_freq", None)
    if not _vtu_active() or inv_freq is None:
        cos, sin = type(rot).forward(rot, x, position_ids, *args, **kwargs)
        if _vtu_active():
            return torch.ones_like(cos), torch.zeros_like(sin)
        return cos, sin
    # [B, T, D] for 1-D positions [B, T] and for M-RoPE's [k, B, T] alike.
    shape = (*position_ids.shape[-2:], 2 * inv_freq.numel())
    return x.new_ones(shape), x.new_zeros(shape)

