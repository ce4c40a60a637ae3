"""The compact sequence a DyMU language model runs on, and its merge map.

A prompt batch holds one placeholder per original image patch; after DToMe
each image is a few unique tokens. :func:`build_compact_sequence` lays out,
per sample, its text tokens and each image's unique tokens in position order,
and the map from every full position to its compact row — what VTU attention
reads to see the virtual full sequence. Device ops only, one host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class MergedImages:
    """Merged, projected image tokens, in placeholder order."""

    features: torch.Tensor  # [n_img, U_cap, C] projected unique tokens
    counts: torch.Tensor  # [n_img] unique tokens per image
    slots: torch.Tensor  # [n_img, P] unique token of each placeholder

    def select(self, index: List[int]) -> "MergedImages":
        """The images in the order ``index`` (repeats allowed)."""
        idx = torch.tensor(index, dtype=torch.long)
        return MergedImages(*(t[idx.to(t.device)] for t in (self.features, self.counts, self.slots)))


@dataclass
class _Layout:
    """Where each token of a prompt batch goes in the compact sequence.

    Built with device ops and a single host read (``placeholders`` and
    ``n_max`` together); positions are flat, batch-major indices into [B, N].
    """

    is_text: torch.Tensor  # [B, N] valid positions that are not image placeholders
    image_pos: torch.Tensor  # [n_img, P] position of each image's placeholders
    start: torch.Tensor  # [B, N] compact index of the first token a position adds
    n_unique: torch.Tensor  # [B] compact length per sample
    placeholders: List[int]  # host: image placeholders per sample
    n_max: int  # host: compact capacity, max(n_unique) and at least 1


def _plan_layout(image_mask, attention_mask, images: Optional[MergedImages]) -> _Layout:
    """The :class:`_Layout` of a prompt batch; one host sync. Not yet checked
    against the images (a mismatch gives a meaningless layout, no error)."""
    B, N = image_mask.shape
    device = image_mask.device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(image_mask, dtype=torch.bool)
    # Without images, placeholder ids are ordinary tokens, as in the unpatched
    # model (assisted decoding's first step runs like this).
    is_img = image_mask.bool() & valid if images is not None else torch.zeros_like(valid)
    is_text = valid & ~is_img
    n_img, P = images.slots.shape if images is not None else (0, 0)
    # nonzero() would sync for its data-dependent shape; the placeholders the
    # images can fill are n_img * P, so find the j-th one as the position where
    # the running count first reaches j + 1. (With too few placeholders the
    # clamp keeps indices in range; the count check rejects the batch.)
    running = is_img.reshape(-1).long().cumsum(0)
    rank = torch.arange(1, n_img * P + 1, device=device)
    image_pos = torch.searchsorted(running, rank).clamp_max(B * N - 1).view(n_img, P)
    new = is_text.long()  # tokens each position adds to the compact sequence
    if n_img:  # an image's unique tokens enter at its first placeholder
        new.view(-1)[image_pos[:, 0]] = images.counts.to(device=device, dtype=torch.long)
    start = new.cumsum(-1) - new
    n_unique = new.sum(-1)
    # The one host read: placeholder counts (validation) and the compact length (a shape).
    host = torch.cat([is_img.sum(-1), n_unique.max().view(1)]).tolist()
    return _Layout(is_text, image_pos, start, n_unique, host[:-1], max(host[-1], 1))


def _check_placeholders(layout: _Layout, images: Optional[MergedImages]) -> None:
    """Raise unless the placeholders are the images' (``n_img * P`` in all) and
    each sample holds whole images (no image spans two samples)."""
    n_img, P = images.slots.shape if images is not None else (0, 0)
    found = sum(layout.placeholders)
    if found != n_img * P:
        raise ValueError(
            f"found {found} image placeholder tokens in input_ids but {n_img} image(s) x {P} patches "
            f"= {n_img * P} image tokens; the prompt and pixel_values do not match"
        )
    split = [b for b, n in enumerate(layout.placeholders) if P and n % P]
    if split:
        raise ValueError(
            f"sample {split[0]} has {layout.placeholders[split[0]]} image placeholder tokens, not a whole number "
            f"of images of {P} patches; the prompt and pixel_values do not match"
        )


def _assemble(layout: _Layout, text_embeds, images: Optional[MergedImages]):
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
    merge_map = torch.where(layout.is_text, layout.start, -1)
    if images is not None and images.counts.shape[0]:
        first = layout.image_pos[:, 0]
        base = layout.start.reshape(-1)[first]  # [n_img] compact index of each image's first unique token
        merge_map.view(-1)[layout.image_pos.reshape(-1)] = (base[:, None] + images.slots.to(device)).reshape(-1)
        k = torch.arange(images.features.shape[1], device=device)
        dest = torch.where(k < images.counts.to(device)[:, None], (first // N * n_max + base)[:, None] + k, dump)
        flat.index_copy_(0, dest.reshape(-1), images.features.to(flat).reshape(-1, C))
    return flat[:dump].view(B, n_max, C), merge_map.to(torch.int32)


def build_compact_sequence(image_mask, attention_mask, text_embeds, images: Optional[MergedImages]):
    """Lay out text tokens and unique image tokens, and the full -> compact map.

    Args:
        image_mask: ``[B, N]`` bool, True at image placeholders (one per patch).
        attention_mask: ``[B, N]`` (0 = padding) or None.
        text_embeds: ``[B, N, C]`` token embeddings of the prompt.
        images: the merged images in placeholder order (batch-major, as
            transformers consumes them), any ``U_cap >= max(counts)``; or None
            without images — then placeholders are embedded as ordinary
            tokens, as the unpatched model does without pixel values.

    Returns:
        ``(compact [B, N_un_max, C], merge_map [B, N] int32, n_unique [B])``.
        Sample b's compact row holds, in the order of their positions, its
        text tokens and each image's ``counts[i]`` unique tokens (at the
        image's first placeholder); rows are zero-padded::

            placeholders [t0, IMG, IMG, IMG, t1]   image: counts 2, slots [0, 1, 0]
            compact      [t0, u0, u1, t1]
            merge_map    [0, 1, 2, 1, 3]

    One host sync (placeholder counts and ``N_un_max`` read together).

    Raises:
        ValueError when the placeholders do not match the images (total, or an
        image split across samples).
    """
    layout = _plan_layout(image_mask, attention_mask, images)
    _check_placeholders(layout, images)
    compact, merge_map = _assemble(layout, text_embeds, images)
    return compact, merge_map, layout.n_unique
