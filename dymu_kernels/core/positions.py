"""Positions of the virtual sequence, as the language model numbers them.

VTU rotates queries and keys at the positions the unpatched model would have
used, so DyMU must know them — and must never re-implement a model's own
position rules (M-RoPE has quirks of its own). A family's *position provider*
(:class:`PositionProvider`) says where they come from:

- ``prompt(inner, position_ids, input_ids, embeds, attention_mask, vision_kwargs)``:
  the positions of a prompt of ``N`` (virtual) positions (``embeds``
  ``[B, N, C]``: the full sequence's embeddings), ``[B, N]`` (1-D RoPE) or
  ``[k, B, N]`` (``k`` rotary axes: M-RoPE's t, h, w);
- ``step(inner, previous, seen, position_ids, embeds)``: the positions of
  the ``T`` new tokens ``embeds [B, T, C]`` on a cache that has seen ``seen``
  positions (an int or a 0-d tensor), stored in ``previous`` (stored form,
  below; a static cache's state is preallocated: its columns from ``seen`` on
  hold 0).

Whatever the model's rotary module takes, it turns into per-position cos/sin
``[B, N, D]``, which is all :func:`dymu_kernels.vtu_attention` needs.

The VTU state keeps positions per cache position in *stored* form,
``[B, N]`` or ``[B, N, k]`` (position last, so appending, cropping and beam
selection work on dims 0 and 1 for both); :func:`stored_positions` and
:func:`rotary_positions` convert.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch


def stored_positions(positions: torch.Tensor) -> torch.Tensor:
    """Rotary-form positions ``[B, N]`` / ``[k, B, N]`` -> stored form ``[B, N]`` / ``[B, N, k]``."""
    return positions if positions.dim() == 2 else positions.movedim(0, -1)


def rotary_positions(stored: torch.Tensor) -> torch.Tensor:
    """Stored-form positions -> what the rotary module takes (``[B, N]`` / ``[k, B, N]``)."""
    return stored if stored.dim() == 2 else stored.movedim(-1, 0)


class PositionProvider(Protocol):
    """Where a family's language-model positions come from (module doc):
    ``Family.positions``. ``inner``: the base model (its own position rules);
    ``vision_kwargs``: the forward's vision arguments (grids, token types)."""

    def prompt(self, inner, position_ids: Optional[torch.Tensor], input_ids: Optional[torch.Tensor],
               embeds: torch.Tensor, attention_mask: Optional[torch.Tensor], vision_kwargs: dict) -> torch.Tensor:
        """Positions of a prompt of ``N`` virtual positions (``embeds [B, N, C]``):
        ``[B, N]`` (1-D RoPE) or ``[k, B, N]`` (``k`` rotary axes), a fresh tensor."""

    def step(self, inner, previous: torch.Tensor, seen, position_ids: Optional[torch.Tensor],
             embeds: torch.Tensor) -> torch.Tensor:
        """Positions of ``T`` new tokens (``embeds [B, T, C]``) after a cache
        that has seen ``seen`` positions (int or 0-d tensor), stored in
        ``previous`` (stored form; columns from ``seen`` on hold 0):
        ``[B, T]`` / ``[k, B, T]``."""


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

    def step(self, inner, previous: torch.Tensor, seen, position_ids: Optional[torch.Tensor],
             embeds: torch.Tensor) -> torch.Tensor:
        B, T, device = embeds.shape[0], embeds.shape[1], previous.device
        if position_ids is not None:
            return position_ids[..., -T:].to(device).expand(B, T).long()
        return (seen + torch.arange(T, device=device)).expand(B, T)


def _three_axes(position_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """The caller's positions as M-RoPE's ``[3, B, N]``, read as the language
    model reads them: ``[B, N]`` or ``[1, B, N]`` (the same positions on every
    axis; generate() continuing a cache passes the latter), ``[3, B, N]``, or
    ``[4, B, N]`` (generate(): a text row first)."""
    if position_ids.dim() == 2:
        position_ids = position_ids[None]
    if position_ids.dim() != 3 or position_ids.shape[0] not in (1, 3, 4):
        raise ValueError(f"position_ids of shape {tuple(position_ids.shape)}: expected [B, N], [1 | 3 | 4, B, N] "
                         "(M-RoPE)")
    if position_ids.shape[0] == 4:
        return position_ids[1:]
    return position_ids.expand(3, batch, -1)


class MRopePositions:
    """M-RoPE positions ``[3, B, N]`` (t, h, w) as a Qwen-VL-type model makes
    them: the caller's, else the model's own ``compute_3d_position_ids`` over
    the full (virtual) sequence — its rules, quirks included, never
    re-implemented here."""

    def prompt(self, inner, position_ids: Optional[torch.Tensor], input_ids, embeds: torch.Tensor, attention_mask,
               vision_kwargs) -> torch.Tensor:
        B, N = embeds.shape[:2]
        if position_ids is not None:
            return _three_axes(position_ids, B)[..., -N:].to(embeds.device).long().clone()
        # The model's own rules (and its rope_deltas bookkeeping), over the full sequence.
        # (Qwen2-VL's takes no second_per_grid_ts; its processor makes none.)
        timing = {} if vision_kwargs.get("second_per_grid_ts") is None else \
            {"second_per_grid_ts": vision_kwargs["second_per_grid_ts"]}
        positions = inner.compute_3d_position_ids(
            input_ids=input_ids, image_grid_thw=vision_kwargs.get("image_grid_thw"),
            video_grid_thw=vision_kwargs.get("video_grid_thw"), inputs_embeds=embeds, attention_mask=attention_mask,
            cache=None, mm_token_type_ids=vision_kwargs.get("mm_token_type_ids"), **timing)
        if positions is None:  # what the language model does without positions: 0..N-1 on every axis
            positions = torch.arange(N, device=embeds.device).expand(3, B, N)
        return positions.to(embeds.device).long().clone()

    def step(self, inner, previous: torch.Tensor, seen, position_ids: Optional[torch.Tensor],
             embeds: torch.Tensor) -> torch.Tensor:
        B, T = embeds.shape[:2]
        if position_ids is not None:
            return _three_axes(position_ids, B)[..., -T:].to(previous.device).long()
        # As the model continues without positions (its rope_deltas): text after the largest position so far
        # (unwritten columns of a preallocated state hold 0, which never exceeds it).
        start = previous.flatten(1).amax(1) + 1
        return (start[:, None] + torch.arange(T, device=previous.device)).expand(3, B, T)
