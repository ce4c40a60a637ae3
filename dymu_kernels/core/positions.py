"""Positions of the virtual sequence, as the language model numbers them.

VTU rotates queries and keys at the positions the unpatched model would have
used, so DyMU must know them — and must never re-implement a model's own
position rules (M-RoPE has quirks of its own). A family's *position provider*
says where they come from:

- ``prompt(inner, position_ids, input_ids, embeds, attention_mask, vision_kwargs)``:
  the positions of a prompt of ``N`` (virtual) positions (``embeds``
  ``[B, N, C]``: the full sequence's embeddings), ``[B, N]`` (1-D RoPE) or
  ``[k, B, N]`` (``k`` rotary axes: M-RoPE's t, h, w);
- ``step(inner, previous, position_ids, embeds)``: the positions of the ``T``
  new tokens ``embeds [B, T, C]`` on a cache whose positions so far are
  ``previous`` (stored form, below).

Whatever the model's rotary module takes, it turns into per-position cos/sin
``[B, N, D]``, which is all :func:`dymu_kernels.vtu_attention` needs.

The VTU state keeps positions per cache position in *stored* form,
``[B, N]`` or ``[B, N, k]`` (position last, so appending, cropping and beam
selection work on dims 0 and 1 for both); :func:`stored_positions` and
:func:`rotary_positions` convert.
"""

from __future__ import annotations

from typing import Optional

import torch


def stored_positions(positions: torch.Tensor) -> torch.Tensor:
    """Rotary-form positions ``[B, N]`` / ``[k, B, N]`` -> stored form ``[B, N]`` / ``[B, N, k]``."""
    return positions if positions.dim() == 2 else positions.movedim(0, -1)


def rotary_positions(stored: torch.Tensor) -> torch.Tensor:
    """Stored-form positions -> what the rotary module takes (``[B, N]`` / ``[k, B, N]``)."""
    return stored if stored.dim() == 2 else stored.movedim(-1, 0)


class LinearPositions:
    """1-D RoPE positions (Llama, Qwen2, Mistral-type language models): the
    caller's ``position_ids`` when given (``generate()`` passes positions
    that skip left padding), else ``0..N-1`` as the language model itself
    numbers them; new tokens follow every position the cache has seen."""

    def prompt(self, inner, position_ids: Optional[torch.Tensor], input_ids, embeds: torch.Tensor, attention_mask,
               vision_kwargs) -> torch.Tensor:
        B, N, device = embeds.shape[0], embeds.shape[1], embeds.device
        # Materialised (no view of the caller's tensor): the cache keeps them, and
        # a compiled decode step guards on whether its inputs are views.
        if position_ids is not None:
            return position_ids.to(device).long().expand(B, N).clone()
        return torch.arange(N, device=device).expand(B, N).clone()

    def step(self, inner, previous: torch.Tensor, position_ids: Optional[torch.Tensor],
             embeds: torch.Tensor) -> torch.Tensor:
        B, T, device = embeds.shape[0], embeds.shape[1], previous.device
        if position_ids is not None:
            return position_ids[..., -T:].to(device).expand(B, T).long()
        return (previous.shape[1] + torch.arange(T, device=device)).expand(B, T)
