"""The compact layout with items of different placeholder counts and two
modalities (AnyRes images and videos), against a per-position loop."""

import pytest
import torch

from conftest import randn

from dymu_kernels.core.compact import MergedItems, build_compact_sequence

IMG, VID = 99, 98


def loop_layout(ids, mask, embeds, modalities):
    """Walk every sample's positions: text appends a row; a placeholder run of
    an item appends the item's unique rows and maps its positions through its slots."""
    nxt = {tok: 0 for tok in modalities}
    rows_all, maps = [], []
    for b in range(ids.shape[0]):
        rows, merge_map, pos = [], [], 0
        while pos < ids.shape[1]:
            tok = int(ids[b, pos])
            if not mask[b, pos]:
                merge_map.append(-1)
                pos += 1
            elif tok in modalities:
                items = modalities[tok]
                i = nxt[tok]
                nxt[tok] += 1
                p_i = int((items.slots[i] >= 0).sum())
                merge_map += [len(rows) + int(s) for s in items.slots[i, :p_i]]
                rows += list(items.features[i, : int(items.counts[i])])
                pos += p_i
            else:
                merge_map.append(len(rows))
                rows.append(embeds[b, pos])
                pos += 1
        rows_all.append(rows)
        maps.append(merge_map)
    compact = torch.zeros(len(rows_all), max(len(r) for r in rows_all), embeds.shape[-1])
    for b, rows in enumerate(rows_all):
        compact[b, : len(rows)] = torch.stack(rows)
    return compact, torch.tensor(maps, dtype=torch.int32), torch.tensor([len(r) for r in rows_all])


def items(gen, sizes, dim=8):
    """Items with ``sizes`` = [(placeholders, unique)]: random slot maps using every unique token."""
    feats, slots = [], []
    for p, u in sizes:
        slot = torch.cat([torch.arange(u), torch.randint(0, u, (p - u,), generator=gen)])
        slots.append(slot[torch.randperm(p, generator=gen)])
        feats.append(randn(u, dim, gen=gen))
    return MergedItems.stack(feats, slots)


def test_items_of_different_sizes_and_two_modalities_equal_the_loop(gen):
    images = items(gen, [(7, 3), (12, 12), (5, 1)])
    videos = items(gen, [(9, 4), (4, 2)])
    rows = [[1, 2] + [IMG] * 7 + [3] + [VID] * 9 + [4, 5],          # image then video
            [6] + [VID] * 4 + [IMG] * 12 + [7] + [IMG] * 5 + [8]]    # video then two images
    n = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    embeds = randn(*ids.shape, 8, gen=gen)
    got = build_compact_sequence([ids == IMG, ids == VID], mask, embeds, [images, videos], names=("image", "video"))
    expected = loop_layout(ids, mask, embeds, {IMG: images, VID: videos})
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_mismatches_raise_per_modality(gen):
    images, videos = items(gen, [(7, 3)]), items(gen, [(9, 4)])
    ids = torch.tensor([[1] + [IMG] * 7 + [VID] * 8 + [2]])
    embeds = randn(*ids.shape, 8, gen=gen)
    with pytest.raises(ValueError, match="found 8 video placeholder tokens in input_ids but 1 video\\(s\\) with 9"):
        build_compact_sequence([ids == IMG, ids == VID], None, embeds, [images, videos], names=("image", "video"))
    # Without video items, video ids are ordinary tokens (as in the unpatched model without pixel values).
    compact, merge_map, n_unique = build_compact_sequence([ids == IMG, ids == VID], None, embeds, [images, None],
                                                          names=("image", "video"))
    assert int(n_unique[0]) == 1 + 3 + 8 + 1 and torch.equal(compact[0, 4:12], embeds[0, 8:16])
