"""Which positions of one vLLM step share a unique token.

vLLM fixes the number of image placeholders before the vision tower runs, so
a merged image still fills all ``P`` of them: placeholder ``p`` holds a copy of
its unique token ``slots[p]``. The language model computes on the unique rows
only (see :mod:`dymu_kernels.vllm.layers`), so every step needs the map from
its scheduled tokens to unique rows — and it must come from vLLM's own
per-step data, never from comparing embeddings (two requests, or two groups
of one image, can hold equal rows).

The map travels with the encoder output: :func:`tag_item` appends
``TAG_COLUMNS`` columns holding each placeholder's unique-token index and the
item's placeholder count, exactly (base-256 digits are exact in fp32, fp16 and
bf16; three of each hold items of up to 16,777,215 placeholders — long
videos among them). vLLM caches and slices that output per its placeholder ranges and hands
the model's ``embed_input_ids`` the pieces scheduled in this step, in
placeholder order, with the ``is_multimodal`` mask; :func:`untag_pieces`
strips the columns and :func:`step_groups` turns (piece, unique index) into
groups — text tokens are groups of one. A piece shorter than its item (an
image split across steps, which a prefix-cache hit ending inside it, chunked
multimodal input or vLLM's own scheduler under chunked prefill would do: see
:mod:`.scheduler`) raises: a merged group's attention output averages over all its positions,
so its rows depend on the whole image at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ..ops.segment import segment_mean

_DIGITS = 3  # base-256 digits per number
TAG_COLUMNS = 2 * _DIGITS  # unique index, item placeholder count
_BASE = 256
_LIMIT = _BASE ** _DIGITS


def _digits(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.stack([values // _BASE ** i % _BASE for i in range(_DIGITS)], dim=-1).to(dtype)


def _number(digits: torch.Tensor) -> torch.Tensor:
    """``[n, _DIGITS]`` digits (as read back from the tags) -> ``[n]`` int64."""
    weights = torch.tensor([_BASE ** i for i in range(_DIGITS)], device=digits.device)
    return (digits.double().round().long() * weights).sum(-1)


def tag_item(rows: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """One merged item as vLLM's encoder output: ``[P, C + TAG_COLUMNS]``.

    Args:
        rows: ``[P, C]`` each placeholder's row (its unique token's features).
        slots: ``[P]`` the unique token of each placeholder.
    """
    P = slots.shape[0]
    # Engine step, but no client reaches it: P is the tower's patch count, fixed by the checkpoint's config
    # (the pixels' size is checked while the request is processed: DyMULlavaMultiModalProcessor).
    if P >= _LIMIT:
        raise ValueError(f"an item has {P} placeholders; tags hold at most {_LIMIT - 1}")
    slots = slots.long()
    tags = torch.cat([_digits(slots, rows.dtype), _digits(torch.full_like(slots, P), rows.dtype)], dim=-1)
    return torch.cat([rows, tags.to(rows.device)], dim=-1)


def untag_pieces(pieces: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """The scheduled pieces of tagged items -> ``(embeddings [n_k, C], unique index [n_k])``.

    Raises RuntimeError when a piece is not a whole item (see module doc).
    """
    lengths = [piece.shape[0] for piece in pieces]
    tags = torch.cat([piece[:, -TAG_COLUMNS:] for piece in pieces])
    local, total = _number(tags[:, :_DIGITS]), _number(tags[:, _DIGITS:])
    expected = torch.repeat_interleave(torch.tensor(lengths, device=total.device),
                                       torch.tensor(lengths, device=total.device))
    # Engine step, but no client reaches it: only the scheduler splits an item; the plugin's scheduler
    # (scheduler.py) never ends a step inside one (vLLM's does, under chunked prefill, tested) nor starts one
    # there (a prefix-cache hit is rounded down to the item's start), and the settings that could (KV-transfer
    # consumers, chunked multimodal input) are refused at load (engine_checks).
    if 0 in lengths or bool((total != expected).any()):  # one host read for all pieces
        for n, t in zip(lengths, total.split(lengths)):
            if n == 0 or bool((t != n).any()):
                full = int(t[0]) if n else 0
                raise RuntimeError(
                    f"a merged image reached the language model in part ({n} of {full} placeholders in one step). "
                    "DyMU needs each image in one step: serve with the plugin's scheduler and "
                    "disable_chunked_mm_input=True (dymu_kernels.vllm.engine_kwargs() sets it)"
                )
    return [piece[:, :-TAG_COLUMNS] for piece in pieces], list(local.split(lengths))


@dataclass
class StepGroups:
    """The unique rows of a step's ``N`` tokens.

    ``inverse[t]``: the row of token ``t``; ``first[u]``: the first token of
    row ``u`` (rows are in order of first position); ``counts[u]``: its tokens.
    """

    inverse: torch.Tensor  # [N] int64
    first: torch.Tensor  # [U] int64
    counts: torch.Tensor  # [U] int64

    @property
    def num_tokens(self) -> int:
        return self.inverse.shape[0]

    @property
    def num_unique(self) -> int:
        return self.first.shape[0]

    def pad_to(self, num_tokens: int) -> "StepGroups":
        """Extra trailing tokens (vLLM pads a batch for graphs) as rows of their own."""
        extra = num_tokens - self.num_tokens
        if extra < 0:
            raise ValueError(f"the step has {self.num_tokens} tokens; cannot shrink to {num_tokens}")
        if extra == 0:
            return self
        dev = self.inverse.device
        new_rows = torch.arange(self.num_unique, self.num_unique + extra, device=dev)
        return StepGroups(torch.cat([self.inverse, new_rows]),
                          torch.cat([self.first, torch.arange(self.num_tokens, num_tokens, device=dev)]),
                          torch.cat([self.counts, torch.ones(extra, dtype=self.counts.dtype, device=dev)]))

    def compact(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, ...]`` rows whose group members are equal -> ``[U, ...]``."""
        return x.index_select(0, self.first)

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """``[U, ...]`` -> ``[N, ...]``: each token gets its row."""
        return x.index_select(0, self.inverse)

    def average(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, F]`` -> ``[U, F]``: each row the mean of its tokens (fp32 accumulation)."""
        return segment_mean(x[None], self.inverse[None], self.num_unique)[0]


def step_groups(is_multimodal: torch.Tensor, piece_ids: Sequence[torch.Tensor]) -> StepGroups:
    """Groups of a step from vLLM's ``is_multimodal`` mask ``[N]`` and each
    scheduled piece's unique indices (:func:`untag_pieces`): the masked
    positions, in order, are the pieces' rows, concatenated (how vLLM places
    them). Two pieces never share a group, even with equal indices."""
    device = is_multimodal.device
    mask = is_multimodal.bool()
    N = mask.shape[0]
    n_mm = int(mask.sum())
    lengths = [int(p.shape[0]) for p in piece_ids]
    if n_mm != sum(lengths):  # vLLM's own invariant (its mask marks its pieces' rows), not client data
        raise RuntimeError(f"{n_mm} multimodal positions but the pieces hold {sum(lengths)} rows")
    key = torch.arange(N, device=device)  # text tokens: a key of their own
    if n_mm:
        piece = torch.repeat_interleave(torch.arange(len(piece_ids), device=device),
                                        torch.tensor(lengths, device=device))
        local = torch.cat([p.to(device) for p in piece_ids])
        key[mask] = N + piece * (local.max() + 1) + local
    _, inverse = torch.unique(key, return_inverse=True)
    U = int(inverse.max()) + 1 if N else 0
    first = torch.full((U,), N, dtype=torch.long, device=device).scatter_reduce(
        0, inverse, torch.arange(N, device=device), "amin")
    # Rows in order of first position (the order the tokens come in).
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(U, device=device)
    inverse = rank[inverse]
    counts = torch.bincount(inverse, minlength=U)
    return StepGroups(inverse, first[order], counts)


def whole_items_end(ranges: Sequence, num_computed: int, num_new: int) -> int:
    """How many of the ``num_new`` tokens a step would schedule from
    ``num_computed`` it may schedule so that it ends inside none of the items
    it starts at or before (``ranges``: vLLM ``PlaceholderRange``s, offset and
    length, in prompt order). Used by :mod:`.scheduler`."""
    end = num_computed + num_new
    for r in ranges:
        if num_computed <= r.offset < end < r.offset + r.length:
            return r.offset - num_computed
    return num_new


def prefix_hit_end(ranges: Sequence, hit: int, block_size: int) -> int:
    """A prefix-cache hit of ``hit`` tokens, rounded down so that it ends
    inside none of the items (``ranges``: vLLM ``PlaceholderRange``s): to the
    start of the block holding the start of an item it would end inside,
    again until no item holds the end. A hit ending at an item's end (or
    later) keeps the item's cached KV, computed when the whole item was
    merged; one ending before its start recomputes all of it. Used by
    :mod:`.scheduler`."""
    moved = True
    while moved and hit > 0:
        moved = False
        for r in ranges:
            if r.offset < hit < r.offset + r.length:
                hit = r.offset // block_size * block_size
                moved = True
    return hit
