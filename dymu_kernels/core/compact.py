"""The compact sequence a DyMU language model runs on, and its merge map.

A prompt batch holds one placeholder per original image patch; after DToMe
each image is a few unique tokens. :func:`build_compact_sequence` lays out,
per sample, its text tokens and each image's unique tokens in position order,
and the map from every full position to its compact row — what VTU attention
reads to see the virtual full sequence. Device ops only, one host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class MergedItems:
    """Merged, projected visual items (images, or videos) in placeholder order.

    Items may have different placeholder counts ``P_i`` (AnyRes images,
    videos): ``slots`` is padded with -1 beyond each item's ``P_i``.
    """

    features: torch.Tensor  # [n, U_cap, C] projected unique tokens
    counts: torch.Tensor  # [n] unique tokens per item
    slots: torch.Tensor  # [n, P_max] unique token of each placeholder; -1 = none (padding)
    # [n, U_cap, E] more per-row data that travels with the unique rows into the compact sequence (Qwen3-VL:
    # the deepstack taps, which the language model adds at the rows' layers); None: none
    extra: Optional[torch.Tensor] = None

    def select(self, index: List[int]) -> "MergedItems":
        """The items in the order ``index`` (repeats allowed)."""
        idx = torch.tensor(index, dtype=torch.long)
        return MergedItems(*(None if t is None else t[idx.to(t.device)]
                             for t in (self.features, self.counts, self.slots, self.extra)))

    @staticmethod
    def stack(features: Sequence[torch.Tensor], slots: Sequence[torch.Tensor]) -> "MergedItems":
        """Items given one by one (``[U_i, C]`` unique rows, ``[P_i]`` slot map), padded into one batch."""
        counts = torch.tensor([f.shape[0] for f in features], device=features[0].device)
        feats = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True)
        maps = torch.nn.utils.rnn.pad_sequence([m.long() for m in slots], batch_first=True, padding_value=-1)
        return MergedItems(feats, counts, maps)


@dataclass
class _Items:
    """Where one modality's placeholders are (flat, batch-major positions)."""

    images: MergedItems
    pos: torch.Tensor  # [n, P_max] position of each placeholder (clamped where there is none)
    has: torch.Tensor  # [n, P_max] bool: placeholder j exists (j < P_i)


@dataclass
class _Layout:
    """Where each token of a prompt batch goes in the compact sequence.

    Built with device ops and a single host read (placeholder counts, item
    spans and ``n_max`` together); positions are flat, batch-major indices
    into [B, N].
    """

    is_text: torch.Tensor  # [B, N] valid positions that are not visual placeholders
    items: List[Optional[_Items]]  # per modality (None: no items, placeholders are text)
    start: torch.Tensor  # [B, N] compact index of the first token a position adds
    n_unique: torch.Tensor  # [B] compact length per sample
    found: List[int]  # host: placeholders per modality in the batch
    expected: List[int]  # host: placeholders the items of each modality fill
    split_item: List[int]  # host: per modality, the first item whose placeholders span two samples, or -1
    n_max: int  # host: compact capacity, max(n_unique) and at least 1


def _plan_layout(masks, attention_mask, modalities: List[Optional[MergedItems]]) -> _Layout:
    """The :class:`_Layout` of a prompt batch; one host sync. Not yet checked
    against the items (a mismatch gives a meaningless layout, no error)."""
    B, N = masks[0].shape
    device = masks[0].device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, N, dtype=torch.bool, device=device)
    is_text = valid.clone()
    new_at, host, items = [], [], []
    for mask, images in zip(masks, modalities):
        if images is None:  # placeholder ids are ordinary tokens, as in the unpatched model without pixels
            items.append(None)
            host += [torch.zeros((), dtype=torch.long, device=device)] * 2 + [torch.full((), -1, device=device)]
            continue
        is_vis = mask.bool() & valid
        is_text &= ~is_vis
        slots = images.slots.to(device)
        n, P = slots.shape
        has = slots >= 0
        per_item = has.sum(1)
        # nonzero() would sync for its data-dependent shape; instead find the
        # j-th placeholder of item i as the position where the running count
        # first reaches offset_i + j + 1 (clamped: a mismatch is caught later).
        running = is_vis.reshape(-1).long().cumsum(0)
        rank = (per_item.cumsum(0) - per_item)[:, None] + torch.arange(1, P + 1, device=device)
        pos = torch.searchsorted(running, rank.reshape(-1)).clamp_max(B * N - 1).view(n, P)
        pos = torch.where(has, pos, pos[:, :1])
        last = pos.gather(1, (per_item - 1).clamp_min(0)[:, None])[:, 0]
        spans = (pos[:, 0] // N != last // N) if n else torch.zeros(0, dtype=torch.bool, device=device)
        first_split = torch.where(spans, torch.arange(n, device=device), n).min() if n else torch.tensor(0, device=device)
        host += [is_vis.sum(), per_item.sum(), torch.where(first_split < n, first_split, -1)]
        new_at.append((pos[:, 0], images.counts.to(device=device, dtype=torch.long)))
        items.append(_Items(images, pos, has))
    new = is_text.long()  # tokens each position adds to the compact sequence
    for first, counts in new_at:  # an item's unique tokens enter at its first placeholder
        new.view(-1)[first] = counts
    start = new.cumsum(-1) - new
    n_unique = new.sum(-1)
    # The one host read: placeholder counts and spans (validation) and the compact length (a shape).
    values = torch.stack([h.reshape(()).to(torch.long) for h in host] + [n_unique.max()]).tolist()
    k = len(masks)
    return _Layout(is_text, items, start, n_unique, values[0:3 * k:3], values[1:3 * k:3], values[2:3 * k:3],
                   max(values[-1], 1))


def _check_placeholders(layout: _Layout, names: Sequence[str]) -> None:
    """Raise unless each modality's placeholders are its items' and every item
    lies within one sample."""
    for name, items, found, expected, split in zip(names, layout.items, layout.found, layout.expected,
                                                   layout.split_item):
        n = 0 if items is None else items.images.counts.shape[0]
        if found != expected:
            # transformers' own words first (get_placeholder_mask), so code matching on them keeps working.
            raise ValueError(
                f"{name.capitalize()} features and {name} tokens do not match, tokens: {found}, features: {expected}; "
                f"found {found} {name} placeholder tokens in input_ids but {n} {name}(s) with {expected} {name} "
                f"tokens: the prompt and the pixel values do not match"
            )
        if split >= 0:
            raise ValueError(
                f"the placeholders of {name} {split} span two samples of the batch; the prompt and the pixel "
                "values do not match"
            )


def _assemble(layout: _Layout, text_embeds):
    """The compact sequence and merge map of a checked layout (no host sync)."""
    B, N = layout.is_text.shape
    C, n_max, device = text_embeds.shape[-1], layout.n_max, text_embeds.device
    # Sample b's compact slot u is row b * n_max + u of a flat buffer, so one
    # index_copy_ places all tokens; the extra last row absorbs the copies of
    # positions with nothing to place (fixed shapes need a destination for them).
    dump = B * n_max
    row0 = torch.arange(B, device=device)[:, None] * n_max
    flat = text_embeds.new_zeros(dump + 1, C)
    flat.index_copy_(0, torch.where(layout.is_text, row0 + layout.start, dump).reshape(-1), text_embeds.reshape(-1, C))
    # The flat map has one spare entry after its B * N: writes for absent placeholders land there.
    text_map = torch.where(layout.is_text, layout.start, -1).reshape(-1)
    merge_map = torch.cat([text_map, text_map.new_full((1,), -1)])
    for items in layout.items:
        if items is None or not items.images.counts.shape[0]:
            continue
        images, first = items.images, items.pos[:, 0]
        base = layout.start.reshape(-1)[first]  # [n] compact index of each item's first unique token
        target = torch.where(items.has, items.pos, B * N)  # no placeholder -> the dump entry
        merge_map.index_copy_(0, target.reshape(-1), (base[:, None] + images.slots.to(device).clamp_min(0)).reshape(-1))
        k = torch.arange(images.features.shape[1], device=device)
        dest = torch.where(k < images.counts.to(device)[:, None], (first // N * n_max + base)[:, None] + k, dump)
        flat.index_copy_(0, dest.reshape(-1), images.features.to(flat).reshape(-1, C))
    return flat[:dump].view(B, n_max, C), merge_map[: B * N].view(B, N).to(torch.int32)


def build_compact_sequence(placeholder_masks, attention_mask, text_embeds, items, names=("image",)):
    """Lay out text tokens and unique visual tokens, and the full -> compact map.

    Args:
        placeholder_masks: ``[B, N]`` bool, True at one modality's placeholders
            (one per patch / packed slot), or a list of such masks, one per
            modality (e.g. images and videos).
        attention_mask: ``[B, N]`` (0 = padding) or None.
        text_embeds: ``[B, N, C]`` token embeddings of the prompt.
        items: the merged items of each modality (a :class:`MergedItems`, or
            a list matching ``placeholder_masks``), in placeholder order
            (batch-major, as transformers consumes them); any
            ``U_cap >= max(counts)``. None for a modality without items: its
            placeholders are embedded as ordinary tokens, as the unpatched
            model does without pixel values.
        names: the modalities' names, for error messages.

    Returns:
        ``(compact [B, N_un_max, C], merge_map [B, N] int32, n_unique [B])``.
        Sample b's compact row holds, in the order of their positions, its
        text tokens and each item's ``counts[i]`` unique tokens (at the item's
        first placeholder); rows are zero-padded::

            placeholders [t0, IMG, IMG, IMG, t1]   image: counts 2, slots [0, 1, 0]
            compact      [t0, u0, u1, t1]
            merge_map    [0, 1, 2, 1, 3]

    One host sync (placeholder counts, item spans and ``N_un_max`` read together).

    Raises:
        ValueError when the placeholders do not match the items (total per
        modality — with transformers' message, e.g. "Image features and image
        tokens do not match, tokens: T, features: F", then ours — or an item
        split across samples).
    """
    if isinstance(placeholder_masks, torch.Tensor):
        placeholder_masks, items = [placeholder_masks], [items]
    layout = _plan_layout(list(placeholder_masks), attention_mask, list(items))
    _check_placeholders(layout, names)
    compact, merge_map = _assemble(layout, text_embeds)
    return compact, merge_map, layout.n_unique


def compact_extra_rows(placeholder_masks, attention_mask, text_embeds, items, names=("image",)):
    """:func:`build_compact_sequence` for items that may carry
    :attr:`MergedItems.extra` rows: those travel with their unique rows
    (laid out in the same call, as more channels; text rows and items
    without extra rows get zeros). Returns ``(compact [B, N_un_max, C],
    merge_map, n_unique, extra [B, N_un_max, E] or None, visual [B, N_un_max]
    bool or None)`` — ``visual``: the compact rows of visual items."""
    if isinstance(placeholder_masks, torch.Tensor):
        placeholder_masks, items = [placeholder_masks], [items]
    E = 0  # (a loop: dynamo does not trace max() over a generator)
    for m in items:
        if m is not None and m.extra is not None:
            E = m.extra.shape[-1]
    if not E:
        return (*build_compact_sequence(placeholder_masks, attention_mask, text_embeds, items, names), None, None)
    C = text_embeds.shape[-1]

    def widened(m: Optional[MergedItems]) -> Optional[MergedItems]:
        if m is None:
            return None
        more = m.extra if m.extra is not None else m.features.new_zeros(*m.features.shape[:2], E)
        return MergedItems(torch.cat([m.features.to(text_embeds.dtype), more.to(text_embeds.dtype)], -1),
                           m.counts, m.slots)

    wide = torch.cat([text_embeds, text_embeds.new_zeros(*text_embeds.shape[:2], E)], -1)
    compact, merge_map, n_unique = build_compact_sequence(placeholder_masks, attention_mask, wide,
                                                          [widened(m) for m in items], names)
    B, n_rows = compact.shape[:2]
    visual = torch.zeros(B, n_rows + 1, dtype=torch.bool, device=compact.device)  # last column: a dump
    for mask, m in zip(placeholder_masks, items):
        if m is not None:
            hit = mask.to(compact.device) & (merge_map >= 0)
            visual.scatter_(1, torch.where(hit, merge_map.long(), n_rows), True)
    return compact[..., :C], merge_map, n_unique, compact[..., C:], visual[:, :n_rows]


def to_full(hidden: torch.Tensor, merge_map: torch.Tensor) -> torch.Tensor:
    """Compact rows ``[B, N_un, F]`` -> the full positions ``[B, N, F]`` of
    ``merge_map [B, N]`` (each position its row; padding, -1, is 0). No
    checks and no host sync (a compiled forward runs it)."""
    B, N = merge_map.shape
    idx = merge_map.long().clamp_min(0)[..., None].expand(B, N, hidden.shape[-1])
    return hidden.gather(1, idx.to(hidden.device)).masked_fill((merge_map < 0)[..., None].to(hidden.device), 0)
