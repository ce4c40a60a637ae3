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
count before the vision tower ran). The rotary embedding rotates what it
rotates (a partial ``rotary_dim`` too), and a gated attention's output gate
(``Qwen3NextAttention``: per token, equal within a group) applies to the
averaged rows; its fused CUDA path that skips ``rotary_emb`` is turned off
per instance.

Layers whose sequence mixer is not attention (Qwen3.5's Gated DeltaNet,
``linear_attn``) run as the family's :class:`~dymu_kernels.families.spec.
SequenceMixer` states (:func:`install_mixer_hooks`): the mixer gets the
expanded sequence (its own per-position code and vLLM's mixing op, whose
metadata describes every position of the step, run on it, and its state
caches hold the virtual sequence's states); its input projections run on the
unique rows and are expanded; its output projection's input is averaged per
group. The hooks read the step's groups from a
:class:`StepHolder` the model fills around its language-model call; with none
held (warm-up runs, steps where nothing merged) they do nothing. A layer with
parts outside what the hooks cover is refused at load, by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence

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


def _mixer_of(layer: nn.Module, mixers: Sequence):
    """The family's sequence mixer of ``layer`` (vLLM's ``layer.layer_type``), or None (attention)."""
    kind = getattr(layer, "layer_type", None)
    return next((m for m in mixers if m.layer_type == kind), None)


def mixer_inputs(mixer, module: nn.Module, packed: Dict[str, List[str]]) -> List[str]:
    """The children of vLLM's mixer ``module`` that are ``mixer.inputs``, as
    vLLM packs them (the model class's ``packed_modules_mapping``, e.g.
    ``in_proj_qkvz`` = ``in_proj_qkv`` + ``in_proj_z``); raises TypeError
    naming an input no child holds, or a child that holds an input beside
    something else."""
    found, covered = [], set()
    for name, _ in module.named_children():
        parts = packed.get(name, [name])
        if set(parts) & set(mixer.inputs):
            if not set(parts) <= set(mixer.inputs):
                raise TypeError(f"{type(module).__name__}.{name} packs {parts}, beyond the mixer's token-wise "
                                f"inputs {list(mixer.inputs)}")
            found.append(name)
            covered |= set(parts)
    missing = [n for n in mixer.inputs if n not in covered]
    if missing or not hasattr(module, mixer.output):
        raise TypeError(f"{type(module).__name__} has no {missing or [mixer.output]}: DyMU's VTU runs the sequence "
                        f"mixer {mixer.attr!r} through its inputs {list(mixer.inputs)} and output {mixer.output!r}")
    return found


def check_layer(layer: nn.Module, index: int, mixers: Sequence = ()) -> None:
    """Raise TypeError naming what a decoder layer has beyond what VTU covers
    (a layer of a ``mixers`` type holds that mixer in place of ``self_attn``)."""
    mixer = _mixer_of(layer, mixers)
    parts = LAYER_PARTS if mixer is None else (LAYER_PARTS - {"self_attn"}) | {mixer.attr}
    attn = getattr(layer, "self_attn", None) if mixer is None else None
    extra = sorted(n for n, _ in layer.named_children() if n not in parts)
    if attn is not None:
        extra += sorted(f"self_attn.{n}" for n, _ in attn.named_children() if n not in ATTENTION_PARTS)
    missing = [n for n in parts if not hasattr(layer, n)]
    missing += [f"self_attn.{n}" for n in _SEAMS if attn is not None and not hasattr(attn, n)]
    problems = ([f"has {extra}, which the VTU hooks do not cover"] if extra else []) + \
        ([f"has no {sorted(missing)}"] if missing else [])
    if problems:
        what = " and ".join(problems)
        raise TypeError(f"DyMU's VTU runs Llama/Qwen2-style decoder layers (row-wise parts, attention at "
                        f"self_attn.rotary_emb and self_attn.attn); layer {index} ({type(layer).__name__}) {what}")


def install_vtu_hooks(layers, holder: StepHolder, mixers: Sequence = (),
                      packed: Optional[Dict[str, List[str]]] = None) -> List[torch.utils.hooks.RemovableHandle]:
    """Hook every layer of ``layers`` at its rotary embedding and attention
    call, or at its sequence mixer where ``mixers`` (the family's) has its
    type (module doc; ``packed``: the model class's
    ``packed_modules_mapping``), reading ``holder``; returns the hook handles.

    Raises TypeError for a layer with parts the hooks do not cover, or a
    sequence-parallel MoE layer (its all-gather counts positions).
    """
    for i, layer in enumerate(layers):
        check_layer(layer, i, mixers)
        if getattr(layer, "use_attn_reduce_scatter_for_moe", False):
            raise TypeError(f"layer {i} ({type(layer).__name__}) runs sequence-parallel MoE "
                            "(use_sequence_parallel_moe), which gathers rows by position count: not served with DyMU")
    handles, seen = [], set()
    attention = []
    for layer in layers:
        mixer = _mixer_of(layer, mixers)
        if mixer is None:
            attention.append(layer)
        else:
            handles += install_mixer_hooks(getattr(layer, mixer.attr), mixer, holder, packed or {})

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

    for layer in attention:
        if getattr(layer.self_attn, "use_fused_qk_norm_rope_gate", False):  # CUDA: would skip rotary_emb
            layer.self_attn.use_fused_qk_norm_rope_gate = False
        rotary, attn = layer.self_attn.rotary_emb, layer.self_attn.attn
        if id(rotary) not in seen:  # vLLM shares one rotary module among layers: hook it once
            seen.add(id(rotary))
            handles.append(rotary.register_forward_pre_hook(expand_qk))
        handles.append(attn.register_forward_pre_hook(expand_v))
        handles.append(attn.register_forward_hook(average))
    return handles


def install_mixer_hooks(module: nn.Module, mixer, holder: StepHolder,
                        packed: Dict[str, List[str]]) -> List[torch.utils.hooks.RemovableHandle]:
    """Hook vLLM's sequence-mixer ``module`` as ``mixer`` (a
    :class:`~dymu_kernels.families.spec.SequenceMixer`) states, reading
    ``holder``: its hidden states expanded to the step's positions on entry,
    compacted again into each input projection (which runs on the unique
    rows) and that projection's output expanded; the output projection's
    input averaged per group. Idle while no step is held."""
    inputs = mixer_inputs(mixer, module, packed)

    def expand_hidden(mod, args, kwargs):
        step = holder.step
        if step is None:
            return None
        if args:
            x, args = args[0], (step.expand(args[0]),) + tuple(args[1:])
        else:
            x = kwargs["hidden_states"]
            kwargs = dict(kwargs, hidden_states=step.expand(x))
        if x.shape[0] != step.num_unique:  # fixed by the layer code, not a client
            raise RuntimeError(f"{type(mod).__name__} got {x.shape[0]} rows for a step of {step.num_unique} "
                               "unique rows")
        return args, kwargs

    def compact(mod, args):
        step = holder.step
        return None if step is None else (step.compact(args[0]),) + tuple(args[1:])

    def expand_out(mod, args, out):
        step = holder.step
        if step is None:
            return None
        if isinstance(out, tuple):  # vLLM's linear layers: (output, output bias)
            return (step.expand(out[0]),) + tuple(out[1:])
        return step.expand(out)

    def average(mod, args):
        step = holder.step
        return None if step is None else (step.average(args[0]),) + tuple(args[1:])

    handles = [module.register_forward_pre_hook(expand_hidden, with_kwargs=True)]
    for name in inputs:
        proj = getattr(module, name)
        handles += [proj.register_forward_pre_hook(compact), proj.register_forward_hook(expand_out)]
    handles.append(getattr(module, mixer.output).register_forward_pre_hook(average))
    return handles
