"""AnyRes packing on maps equals LLaVA-OneVision's pack_image_features on the expanded crops."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.core.maps import bilinear_taps, pack_image_maps  # noqa: E402

SIDE, CROP = 6, 42  # 6 x 6 patches of 7 px per 42 px crop
PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126], [126, 42], [126, 126], [84, 126], [126, 84]]


def tiny_onevision(aspect="anyres_max_9"):
    torch.manual_seed(0)
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=CROP, patch_size=7)
    text = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100)
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                               vision_aspect_ratio=aspect, image_token_id=98, video_token_id=97)
    return transformers.LlavaOnevisionForConditionalGeneration(config).eval()


@pytest.mark.parametrize("out", [(3, 5), (5, 3), (4, 4), (7, 2), (1, 1)])
def test_bilinear_taps_equal_interpolate(gen, out):
    x = randn(1, 3, 9, 6, gen=gen)
    index, weight = bilinear_taps(9, 6, *out)
    expected = torch.nn.functional.interpolate(x, size=out, mode="bilinear")[0].reshape(3, -1)
    got = (x[0].reshape(3, -1)[:, index] * weight.float()).sum(-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def merged_crops(gen, n_crops, dim=64, merge_every=3):
    """Random merged crops: unique features, counts, slot maps (neighbouring patches share tokens)."""
    counts, slots = [], []
    for c in range(n_crops):
        groups = torch.arange(SIDE * SIDE) // (merge_every if c % 2 else 1)  # odd crops merge, even ones do not
        perm = torch.randperm(int(groups.max()) + 1, generator=gen)  # unique ids in any order
        slots.append(perm[groups])
        counts.append(int(groups.max()) + 1)
    feats = randn(n_crops, max(counts), dim, gen=gen)
    return feats, torch.tensor(counts), torch.stack(slots)


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
@pytest.mark.parametrize("image_size", [(50, 120), (130, 60), (90, 90), (40, 40), (126, 84)])
def test_packed_maps_equal_pack_image_features(gen, aspect, image_size):
    """Tall, wide and square images; anyres_max_1 takes the bilinear downscale
    branch for every multi-crop image; the packed length is the model's."""
    model = tiny_onevision(aspect).model
    num = transformers.models.llava_onevision.modeling_llava_onevision
    n_crops = num.image_size_to_num_patches(image_size, PINPOINTS, CROP)
    grid = num.get_anyres_image_grid_shape(image_size, PINPOINTS, CROP)
    feats, counts, slots = merged_crops(gen, n_crops)
    expanded = torch.stack([feats[c, slots[c]] for c in range(n_crops)])  # [n_crops, 36, C]
    newline = randn(64, gen=gen)
    with torch.no_grad():
        expected, lens = model.pack_image_features([expanded], torch.tensor([image_size]), image_newline=newline,
                                                   vision_aspect_ratio=aspect)
    max_n = int(aspect.rsplit("_", 1)[1])
    unique, slot_map = pack_image_maps(feats, counts, slots, grid, image_size, newline, max_n)
    assert slot_map.shape[0] == int(lens[0]) == expected[0].shape[0]
    torch.testing.assert_close(unique[slot_map], expected[0], atol=1e-5, rtol=1e-5)
    # Every unique token is used, and the crops' own tokens are kept once each.
    assert torch.equal(torch.unique(slot_map), torch.arange(unique.shape[0]))
    assert unique.shape[0] <= slot_map.shape[0]


def test_single_crop_image_gets_one_newline(gen):
    feats, counts, slots = merged_crops(gen, 1)
    newline = randn(64, gen=gen)
    unique, slot_map = pack_image_maps(feats, counts, slots, (1, 1), (42, 42), newline, 9)
    assert slot_map.shape[0] == SIDE * SIDE + 1 and torch.equal(unique[slot_map[-1]], newline)
    torch.testing.assert_close(unique[slot_map[:-1]], feats[0, slots[0]])


def test_video_maps_equal_apply_pooling(gen):
    """Frames pooled 6 -> 3 per side on maps equal apply_pooling on the
    expanded frames plus the video's newline."""
    from dymu_kernels.core.maps import pool_video_maps

    model = tiny_onevision().model
    feats, counts, slots = merged_crops(gen, 4)
    expanded = torch.stack([feats[f, slots[f]] for f in range(4)])
    newline = randn(64, gen=gen)
    with torch.no_grad():
        pooled = model.apply_pooling(expanded).reshape(-1, 64)
    expected = torch.cat([pooled, newline[None]])
    unique, slot_map = pool_video_maps(feats, counts, slots, newline)
    assert slot_map.shape[0] == 4 * 9 + 1
    torch.testing.assert_close(unique[slot_map], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.unique(slot_map), torch.arange(unique.shape[0]))
    # Merged frames keep some pooled cells as their own tokens (no new rows for them).
    assert unique.shape[0] <= slot_map.shape[0]


def test_downscale_keeps_ids_of_cells_inside_one_merged_token(gen):
    """2 x 2 blocks of patches merged into one token, a 2 x 2 crop grid halved
    by anyres_max_1: every output cell reads one block, so it keeps that
    block's token — no new rows; only the 6 newlines are added."""
    model = tiny_onevision("anyres_max_1").model
    blocks = (torch.arange(SIDE)[:, None] // 2) * (SIDE // 2) + torch.arange(SIDE)[None, :] // 2  # 3 x 3 tokens
    slots = blocks.reshape(-1).expand(5, -1)
    counts = torch.full((5,), 9)
    feats = randn(5, 9, 64, gen=gen)
    newline = randn(64, gen=gen)
    unique, slot_map = pack_image_maps(feats, counts, slots, (2, 2), (84, 84), newline, 1)
    expanded = torch.stack([feats[c, slots[c]] for c in range(5)])
    with torch.no_grad():
        expected, _ = model.pack_image_features([expanded], torch.tensor([[84, 84]]), image_newline=newline,
                                                vision_aspect_ratio="anyres_max_1")
    torch.testing.assert_close(unique[slot_map], expected[0], atol=1e-6, rtol=1e-6)
    assert slot_map.shape[0] == 36 + 6 * (6 + 1) and unique.shape[0] == 5 * 9 + 6


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
@pytest.mark.parametrize("image_size", [(50, 120), (130, 60), (90, 90), (126, 84), (47, 47)])
def test_packed_length_equals_the_processors_placeholder_count(gen, aspect, image_size):
    """The processor inserts as many placeholders as the packed map has slots
    (its own count, ``LlavaOnevisionProcessor._get_number_of_features``, run
    with this model's settings; building a processor needs torchvision)."""
    import functools
    import types

    Processor = transformers.LlavaOnevisionProcessor
    fake = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=PINPOINTS),
                                 num_image_tokens=SIDE * SIDE, vision_aspect_ratio=aspect)
    fake._get_unpadded_features = functools.partial(Processor._get_unpadded_features, fake)
    expected = Processor._get_number_of_features(fake, *image_size, CROP, CROP)
    num = transformers.models.llava_onevision.modeling_llava_onevision
    n_crops = num.image_size_to_num_patches(image_size, PINPOINTS, CROP)
    grid = num.get_anyres_image_grid_shape(image_size, PINPOINTS, CROP)
    feats, counts, slots = merged_crops(gen, n_crops)
    _, slot_map = pack_image_maps(feats, counts, slots, grid, image_size, randn(64, gen=gen), int(aspect.rsplit("_", 1)[1]))
    assert slot_map.shape[0] == expected
