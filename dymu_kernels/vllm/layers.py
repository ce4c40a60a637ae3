"""VTU in vLLM's decoder layers (Llama, Qwen2 and their like).

A step's tokens arrive as unique rows (see :mod:`dymu_kernels.vllm.groups`).
Each layer runs its norms, Q/K/V and O projections and MLP on those rows;
attention runs through vLLM's own attention layer over every position: Q, K
and V are expanded to the positions, rotated at each position, written to the
paged KV cache and attended; each group's outputs are then averaged back into
its row. That is the official release's VTU path (expand -> RoPE attention ->
average), so outputs equal it; the savings are the token-wise work, while
attention and the KV cache stay at full length (vLLM fixed the placeholder
count before the vision tower ran).

The layers are vLLM's own instances with their class swapped for a subclass
whose ``forward`` reads the step's groups from a :class:`StepHolder` the
model fills around its language-model call (vLLM's Qwen2 model passes no
extra arguments to its layers); with none held the layer runs vLLM's forward
unchanged (warm-up runs, steps where nothing merged).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Optional

import torch
from torch import nn

from .groups import StepGroups

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("qkv_proj", "rotary_emb", "attn", "o_proj", "q_size", "kv_size")


def vtu_self_attention(attn: nn.Module, positions: torch.Tensor, hidden: torch.Tensor, step: StepGroups):
    """vLLM's self-attention block on unique rows ``hidden [U, C]``: projections
    per row, attention per position, outputs averaged per row -> ``[U, C]``."""
    qkv, _ = attn.qkv_proj(hidden)
    q, k, v = step.expand(qkv).split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)
    out = step.average(attn.attn(q, k, v))
    out, _ = attn.o_proj(out)
    return out


class StepHolder:
    """The groups of the step the language model is running, shared by its layers."""

    def __init__(self):
        self.step: Optional[StepGroups] = None

    @contextmanager
    def running(self, step: StepGroups):
        self.step = step
        try:
            yield
        finally:
            self.step = None


class VTUDecoderLayer:
    """Mixin placed before a vLLM decoder layer class (see module doc)."""

    _dymu_holder: StepHolder

    def forward(self, positions, hidden_states, residual, **kwargs):
        dymu_step = self._dymu_holder.step
        if dymu_step is None:
            return super().forward(positions, hidden_states, residual, **kwargs)
        if kwargs:  # what vLLM's model code passes (fixed at load), not client data
            raise TypeError(f"VTU decoder layers take no extra arguments, got {sorted(kwargs)}")
        # vLLM's pre-norm residual convention, on the unique rows.
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = vtu_self_attention(self.self_attn, positions, hidden_states, dymu_step)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


_CLASSES: Dict[type, type] = {}


def install_vtu_layers(layers, holder: StepHolder) -> None:
    """Swap every layer of ``layers`` to its VTU subclass reading ``holder``.

    Raises TypeError for a layer without the parts VTU runs (a layer kind
    the plugin does not know: it refuses rather than guess).
    """
    for i, layer in enumerate(layers):
        if isinstance(layer, VTUDecoderLayer):
            layer._dymu_holder = holder
            continue
        missing = [n for n in _LAYER_PARTS if not hasattr(layer, n)]
        missing += [f"self_attn.{n}" for n in _ATTN_PARTS if hasattr(layer, "self_attn") and not hasattr(layer.self_attn, n)]
        if missing:
            raise TypeError(f"DyMU's VTU needs Llama/Qwen2-style decoder layers; layer {i} "
                            f"({type(layer).__name__}) has no {missing}")
        base = type(layer)
        if base not in _CLASSES:
            _CLASSES[base] = type(f"VTU{base.__name__}", (VTUDecoderLayer, base), {"__module__": __name__})
        layer.__class__ = _CLASSES[base]
        layer._dymu_holder = holder
