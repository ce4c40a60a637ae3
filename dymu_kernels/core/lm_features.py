"""What VTU attention computes, checked against a language model: full
causal attention with RoPE over the whole head. A model asking for more
(sliding windows, soft-capping, sinks, partial rotary) is refused by name —
a feature VTU ignored would give plausible wrong answers. Reads config and
module attributes only (transformers and vLLM configs alike)."""

from __future__ import annotations

from typing import Iterable


def _text_attr(text_config, name):
    """A config attribute, also where transformers 5 keeps RoPE settings (``rope_parameters``)."""
    value = getattr(text_config, name, None)
    if value is None:
        value = (getattr(text_config, "rope_parameters", None) or {}).get(name)
    return value


def check_full_attention(text_config, mixers: Iterable[str] = (), partial_rotary: bool = False) -> None:
    """Raise ValueError naming every language-model attention feature VTU does
    not compute — sliding windows (``layer_types``, ``sliding_window``,
    ``attention_chunk_size``), logit soft-capping, attention sinks, partial
    rotary embeddings: VTU is full causal attention with RoPE over the whole
    head, and a feature it ignored would give plausible wrong answers.
    ``mixers``: layer types the caller runs exactly otherwise (the family's
    :class:`~dymu_kernels.families.spec.SequenceMixer` s); ``partial_rotary``:
    the caller passes VTU attention the rotary width (the family's
    ``partial_rotary``)."""
    found = []
    layer_types = getattr(text_config, "layer_types", None)
    other = sorted(set(layer_types or []) - {"full_attention"} - set(mixers))
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
        if value is not None and value != 1 and not partial_rotary:
            found.append(f"{name}={value}")
    if found:
        raise ValueError(f"the language model uses {', '.join(found)}; VTU attention computes full causal attention "
                         "with RoPE over the whole head only, so DyMU cannot run this model exactly")


def check_rotary(lm, partial_rotary: bool = False) -> None:
    """Raise ValueError when the language model's rotary tables do not cover
    the whole head (partial rotary in any config spelling; allowed with
    ``partial_rotary``) or its attention modules carry sinks: what
    :func:`check_full_attention` reads from the config, checked on the
    modules themselves."""
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    inv_freq = getattr(lm.rotary_emb, "inv_freq", None)
    if inv_freq is not None and 2 * inv_freq.numel() != head_dim and not partial_rotary:
        raise ValueError(f"the language model rotates {2 * inv_freq.numel()} of {head_dim} head dims (partial "
                         "rotary, partial_rotary_factor < 1); VTU attention rotates the whole head, so DyMU cannot "
                         "run this model exactly")
    for layer in lm.layers:
        if getattr(getattr(layer, "self_attn", None), "sinks", None) is not None:
            raise ValueError("the language model's attention has sinks; VTU attention does not compute them")
