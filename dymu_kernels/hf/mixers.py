"""VTU through a language model's sequence mixers other than attention
(Qwen3.5's Gated DeltaNet), on transformers' own modules.

A family declares each such mixer by module names
(:class:`~dymu_kernels.families.spec.SequenceMixer`, which states the
contract); :func:`install_mixers` wraps, on this instance only, the mixer's
``forward`` and its input and output projections. Inside a DyMU forward
(the call carries the :class:`~.attention.VTUContext` as ``dymu_vtu``, which
the decoder layer hands its mixer) a prompt runs as follows, the mixer's own
forward doing everything between the projections:

1. the mixer's forward gets the virtual sequence — each position a copy of
   its unique row, padding zero — so every shape and cache it computes is the
   full sequence's (its conv and recurrent states are the virtual sequence's);
2. its input projections compute on the unique rows only and gather their
   outputs to the positions (equal to projecting the copies: they are
   token-wise and bias-free; padding rows stay zero, as the stock module
   zeroes padding before projecting);
3. its output projection's input is averaged per group (the positions that
   share a unique row) and the projection runs on the unique rows: the
   mixer returns ``[B, N_un, C]`` like VTU attention.

On a filled cache (``decode``) the new tokens are singletons: the stock
module runs, given the padding of the new tokens as its 2-D mask (as
transformers builds it for linear layers). Outside DyMU forwards — plain
calls, other threads — every wrapped module is the stock one.
"""

from __future__ import annotations

import functools
import threading
from typing import Callable, List, Sequence

import torch

from ..core.compact import to_full
from ..ops.segment import segment_mean

# Per thread: the mixers running a prompt now, by id -> (unique rows [B, N_un, C], merge map [B, N]).
_PROMPT = threading.local()


def _running() -> dict:
    if not hasattr(_PROMPT, "mixers"):
        _PROMPT.mixers = {}
    return _PROMPT.mixers


def install_mixers(lm, mixers: Sequence, undo: List[Callable[[], None]]) -> None:
    """Wrap the declared mixers (:class:`SequenceMixer`) of every decoder
    layer of ``lm`` whose ``config.layer_types`` entry is the mixer's layer
    type; appends the undo steps. A declared mixer missing from such a
    layer, or an input projection with a bias, raises ValueError (the
    contract would not hold)."""
    layer_types = getattr(lm.config, "layer_types", None) or []
    for seam in mixers:
        for i, layer in enumerate(lm.layers):
            if i >= len(layer_types) or layer_types[i] != seam.layer_type:
                continue
            mixer = getattr(layer, seam.attr, None)
            if mixer is None:
                raise ValueError(f"decoder layer {i} is a {seam.layer_type!r} layer without .{seam.attr}: not the "
                                 f"model DyMU's family file describes")
            for name in seam.inputs:
                proj = getattr(mixer, name)
                if getattr(proj, "bias", None) is not None:
                    raise ValueError(f"{type(mixer).__name__}.{name} has a bias: VTU gathers its outputs with zero "
                                     "padding rows, which needs bias-free input projections")
                _wrap(proj, functools.partial(_input_forward, proj, mixer), undo)
            out = getattr(mixer, seam.output)
            _wrap(out, functools.partial(_output_forward, out, mixer), undo)
            _wrap(mixer, functools.partial(_mixer_forward, mixer), undo)


def _wrap(module, forward, undo) -> None:
    module.forward = forward
    undo.append(lambda: module.__dict__.pop("forward", None))


def _mixer_forward(mixer, hidden_states, *args, dymu_vtu=None, **kwargs):
    """The mixer's ``forward`` while patched (module doc)."""
    stock = functools.partial(type(mixer).forward, mixer)
    if dymu_vtu is None:
        return stock(hidden_states, *args, **kwargs)
    if kwargs.get("attention_mask") is not None:
        raise ValueError(f"{type(mixer).__name__} got an attention_mask inside a DyMU forward, which carries its "
                         "padding in the merge map")
    merge_map = dymu_vtu.merge_map
    if dymu_vtu.decode:  # singletons: the stock module, with the new tokens' padding as transformers passes it
        T = hidden_states.shape[1]
        if T > 1:
            kwargs["attention_mask"] = (merge_map[:, -T:] >= 0).to(hidden_states.device, torch.long)
        return stock(hidden_states, *args, **kwargs)
    running = _running()
    key = id(mixer)
    if key in running:
        raise RuntimeError(f"{type(mixer).__name__} re-entered while running a DyMU prompt")
    running[key] = (hidden_states, merge_map.to(hidden_states.device))
    try:
        return stock(to_full(hidden_states, merge_map), *args, **kwargs)
    finally:
        del running[key]


def _input_forward(proj, mixer, x):
    """An input projection's ``forward`` while patched: inside its mixer's
    DyMU prompt, the projection of the unique rows gathered to the positions."""
    prompt = _running().get(id(mixer))
    if prompt is None:
        return type(proj).forward(proj, x)
    rows, merge_map = prompt
    return to_full(type(proj).forward(proj, rows), merge_map)


def _output_forward(proj, mixer, y):
    """The output projection's ``forward`` while patched: inside its mixer's
    DyMU prompt, on each group's mean of ``y [B, N, F]`` (rows no position
    maps to are zero)."""
    prompt = _running().get(id(mixer))
    if prompt is None:
        return type(proj).forward(proj, y)
    rows, merge_map = prompt
    return type(proj).forward(proj, segment_mean(y, merge_map, rows.shape[1]))
