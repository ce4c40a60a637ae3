"""AnyRes packing of merged crops, on maps (LLaVA-OneVision; docs/design.md §2).

LLaVA-OneVision encodes an image as a base crop plus a grid of crops, then
``pack_image_features`` lays the grid's patch features out as one picture
(view/permute), cuts the padding away (``unpad_image``), shrinks it with a
bilinear resize when it is larger than ``anyres_max_N`` crops allow, and ends
every row with an ``image_newline`` token. After DToMe a crop is a few unique
tokens and a slot map (patch -> unique token). :func:`pack_image_maps` runs the
same packing on the *maps*, so the image's placeholder count — and the virtual
sequence VTU attends over — is exactly the unpatched model's:

- view/permute/unpad are index operations: they move unique-token ids;
- a bilinear output cell whose inputs (non-zero weights) all carry one id
  keeps that id; otherwise it becomes a new unique token, the weighted sum of
  its inputs' unique features — exact, because the resize is linear and comes
  after the projector;
- each newline is a unique token of its own (tokens at different positions
  must not share a row: VTU averages a row's outputs over its positions).

:func:`bilinear_taps` gives the resize's four (index, weight) taps per output
cell, as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` computes them for a given output size.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch


def bilinear_taps(in_h: int, in_w: int, out_h: int, out_w: int, device=None):
    """``(index [out_h*out_w, 4], weight [out_h*out_w, 4])``: flat input cells and
    weights of each output cell of a bilinear resize (``align_corners=False``,
    output size given, no antialiasing), in row-major output order."""

    def axis(n_in, n_out):
        scale = n_in / n_out
        src = ((torch.arange(n_out, device=device, dtype=torch.float64) + 0.5) * scale - 0.5).clamp_min(0)
        i0 = src.floor().long().clamp_max(n_in - 1)
        i1 = (i0 + 1).clamp_max(n_in - 1)
        frac = src - i0
        return i0, i1, 1 - frac, frac

    y0, y1, wy0, wy1 = axis(in_h, out_h)
    x0, x1, wx0, wx1 = axis(in_w, out_w)
    index = torch.stack([y0[:, None] * in_w + x0, y0[:, None] * in_w + x1,
                         y1[:, None] * in_w + x0, y1[:, None] * in_w + x1], -1).reshape(-1, 4)
    weight = torch.stack([wy0[:, None] * wx0, wy0[:, None] * wx1, wy1[:, None] * wx0, wy1[:, None] * wx1],
                         -1).reshape(-1, 4)
    return index, weight


def resize_ids(ids: torch.Tensor, unique: torch.Tensor, out_h: int, out_w: int):
    """Bilinear resize of a map of unique-token ids ``[H, W]`` to ``[out_h, out_w]``.

    Returns ``(ids [out_h, out_w], new_rows [K, C])``: cells whose non-zero
    taps all carry one id keep it; every other cell gets a new id
    ``len(unique) + k`` whose row is the weighted sum of its taps' unique rows.
    """
    H, W = ids.shape
    index, weight = bilinear_taps(H, W, out_h, out_w, device=ids.device)
    tap_ids = ids.reshape(-1)[index]  # [cells, 4]
    live = weight > 0
    first = tap_ids.gather(1, live.float().argmax(1, keepdim=True))  # an id with weight
    pure = ((tap_ids == first) | ~live).all(1)
    out = first[:, 0].clone()
    mixed = (~pure).nonzero()[:, 0]
    new_rows = torch.einsum("kt,ktc->kc", weight[mixed].to(unique.dtype), unique[tap_ids[mixed]])
    out[mixed] = unique.shape[0] + torch.arange(mixed.numel(), device=ids.device)
    return out.view(out_h, out_w), new_rows


def unpad_slices(height: int, width: int, original_size: Sequence[int]) -> Tuple[slice, slice]:
    """Rows and columns ``unpad_image`` keeps of a ``[height, width]`` grid for
    an image of ``original_size`` (height, width)."""
    orig_h, orig_w = (int(v) for v in original_size)
    if orig_w / orig_h > width / height:
        new_h = int(round(orig_h * (width / orig_w), 7))
        pad = (height - new_h) // 2
        return slice(pad, height - pad), slice(0, width)
    new_w = int(round(orig_w * (height / orig_h), 7))
    pad = (width - new_w) // 2
    return slice(0, height), slice(pad, width - pad)


def pack_image_maps(features: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor, grid: Tuple[int, int],
                    image_size: Sequence[int], newline: torch.Tensor, max_num_patches: int):
    """One image's merged crops packed as ``pack_image_features`` packs features.

    Args:
        features: ``[n_crops, U_cap, C]`` projected unique tokens per crop
            (crop 0 is the base image).
        counts: ``[n_crops]`` unique tokens per crop.
        slots: ``[n_crops, side*side]`` per patch, its unique token in the crop.
        grid: ``(rows, cols)`` of the crop grid (``get_anyres_image_grid_shape``);
            ignored for a single crop.
        image_size: the original ``(height, width)``.
        newline: ``[C]`` the ``image_newline`` embedding.
        max_num_patches: N of ``anyres_max_N``.

    Returns:
        ``(unique [U, C], slot_map [P])``: the image's unique tokens (each used
        by at least one placeholder) and, per placeholder of the packed
        sequence, its unique token; ``unique[slot_map]`` equals
        ``pack_image_features`` on the expanded crops.
    """
    n_crops, _, C = features.shape
    side = math.isqrt(slots.shape[1])
    counts_l = counts.tolist()  # one host read for all crops
    offsets = torch.tensor([0] + counts_l[:-1], device=slots.device).cumsum(0)
    ids = slots.long() + offsets[:, None]  # image-level unique ids per crop
    rows = [torch.cat([features[c, : counts_l[c]] for c in range(n_crops)])]
    n_rows = sum(counts_l)

    def new_ids(k):
        nonlocal n_rows
        out = torch.arange(n_rows, n_rows + k, device=slots.device)
        n_rows += k
        return out

    if n_crops == 1:
        return torch.cat(rows + [newline[None].to(features)]), torch.cat([ids[0], new_ids(1)])
    nph, npw = grid
    # The grid's crops as one picture: (nph, npw, side, side) -> (nph*side, npw*side).
    picture = ids[1:].view(nph, npw, side, side).permute(0, 2, 1, 3).reshape(nph * side, npw * side)
    keep_r, keep_c = unpad_slices(nph * side, npw * side, image_size)
    picture = picture[keep_r, keep_c]
    h, w = picture.shape
    ratio = math.sqrt(h * w / (max_num_patches * side**2))
    if ratio > 1.1:
        unique = rows[0]
        picture, mixed = resize_ids(picture, unique, int(h // ratio), int(w // ratio))
        rows.append(mixed)
        n_rows += mixed.shape[0]
    h = picture.shape[0]
    newline_ids = new_ids(h)
    rows.append(newline[None].to(features).expand(h, C))
    packed = torch.cat([picture, newline_ids[:, None]], 1).reshape(-1)
    # Unpadding can cut every patch of a unique token away: keep only the rows used.
    used, slot_map = torch.unique(torch.cat([ids[0], packed]), return_inverse=True)
    return torch.cat(rows)[used], slot_map


def pool_video_maps(features: torch.Tensor, counts: torch.Tensor, slots: torch.Tensor, newline: torch.Tensor):
    """One video's merged frames as ``get_video_features`` lays them out: each
    frame's ``side x side`` map bilinearly resized to ``ceil(side/2)`` squared
    (``apply_pooling``), frames in order, one newline at the end.

    Args / returns as :func:`pack_image_maps`, with frames for crops.
    """
    side = math.isqrt(slots.shape[1])
    out = math.ceil(side / 2)
    rows, maps, n_rows = [], [], 0
    for f, count in enumerate(counts.tolist()):  # one host read for all frames
        unique = features[f, :count]
        ids, mixed = resize_ids(slots[f].long().view(side, side), unique, out, out)
        rows += [unique, mixed]
        maps.append(ids.reshape(-1) + n_rows)
        n_rows += unique.shape[0] + mixed.shape[0]
    rows.append(newline[None].to(features))
    maps.append(torch.tensor([n_rows], device=slots.device))
    used, slot_map = torch.unique(torch.cat(maps), return_inverse=True)
    return torch.cat(rows)[used], slot_map
