"""VTU in vLLM's decoder layers, hooked at the two seams where it differs.

A step's tokens arrive as unique rows (see :mod:`dymu_kernels.vllm.groups`),
and vLLM's own decoder layers run on them unchanged: norms, Q/K/V and O
projections, per-head ``q_norm`` / ``k_norm`` and the MLP are row-wise, so
they compute each unique row once. Only two calls see positions, and there
module hooks put the VTU path (expand -> RoPE attention -> average, the
official release's; outputs equal it):

- the rotary embedding, ``rotary_emb(positions, q, k)``: a pre-hook expands
  the unique rows of ``q`` and ``k`` to every position, so vLLM's rotary
  (1-D RoPE, M-RoPE alike) rotates each at its own position;
- the attention layer, ``attn(q, k, v)``: a pre-hook expands ``v`` too, so
  vLLM's paged attention writes and attends every position; a hook after it
  averages each group's outputs back into its row for ``o_proj``.

Attention and the KV cache stay at full length (vLLM fixed the placeholder
count before the vision tower ran). The hooks read the step's groups from a
:class:`StepHolder` the model fills around its language-model call; with none
held (warm-up runs, steps where nothing merged) they do nothing. A layer with
parts outside what the hooks cover is refused at load, by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional

import torch
from torch import nn

from .groups import StepGroups

# Children of a decoder layer, and of its self_attn, that work row by row (or are the hooked seams).
LAYER_PARTS = frozenset({"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"})
ATTENTION_PARTS = frozenset({"qkv_proj", "q_norm", "k_norm", "rotary_emb", "attn", "o_proj"})
_SEAMS = ("rotary_emb", "attn")


class StepHolder:
    """The groups of the step the language model is running, shared by the hooks."""

    def __init__(self):
        self.step: Optional[StepGroups] = None

    @contextmanager
    def running(self, step: StepGroups):
        self.step = step
        try:
            yield
        finally:
            self.step = None


def check_layer(layer: nn.Module, index: int) -> None:
    """Raise TypeError naming what a decoder layer has beyond what VTU covers."""
    attn = getattr(layer, "self_attn", None)
    extra = sorted(n for n, _ in layer.named_children() if n not in LAYER_PARTS)
    if attn is not None:
        extra += sorted(f"self_attn.{n}" for n, _ in attn.named_children() if n not in ATTENTION_PARTS)
    missing = [n for n in LAYER_PARTS if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in _SEAMS if attn is not None and not hasattr(attn, n)]
    problems = ([f"has {extra}, which the VTU hooks do not cover"] if extra else []) + \
        ([f"has no {sorted(missing)}"] if missing else [])
    if problems:
        what = " and ".join(problems)
        raise TypeError(f"DyMU's VTU runs Llama/Qwen2-style decoder layers (row-wise parts, attention at "
                        f"self_attn.rotary_emb and self_attn.attn); layer {index} ({type(layer).__name__}) {what}")


def install_vtu_hooks(layers, holder: StepHolder) -> List[torch.utils.hooks.RemovableHandle]:
    """Hook every layer of ``layers`` at its rotary embedding and attention
    call (module doc), reading ``holder``; returns the hook handles.

    Raises TypeError for a layer with parts the hooks do not cover.
    """
    for i, layer in enumerate(layers):
        check_layer(layer, i)
    handles, seen = [], set()

    def expand_qk(module, args):
        step = holder.step
        if step is None:
            return None
        positions, q, k = args
        return positions, step.expand(q), step.expand(k)

    def expand_v(module, args):
        step = holder.step
        if step is None:
            return None
        q, k, v = args[:3]
        if q.shape[0] != step.num_tokens or v.shape[0] != step.num_unique:  # fixed by the layer code, not a client
            raise RuntimeError(f"VTU attention got q of {q.shape[0]} rows and v of {v.shape[0]} for a step of "
                               f"{step.num_tokens} positions in {step.num_unique} rows: the layer did not call "
                               "its rotary embedding on q and k before attention")
        return (q, k, step.expand(v)) + tuple(args[3:])

    def average(module, args, out):
        step = holder.step
        return None if step is None else step.average(out)

    for layer in layers:
        rotary, attn = layer.self_attn.rotary_emb, layer.self_attn.attn
        if id(rotary) not in seen:  # vLLM shares one rotary module among layers: hook it once
            seen.add(id(rotary))
            handles.append(rotary.register_forward_pre_hook(expand_qk))
        handles.append(attn.register_forward_pre_hook(expand_v))
        handles.append(attn.register_forward_hook(average))
    return handles
