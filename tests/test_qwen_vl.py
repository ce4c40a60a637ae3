"""DyMU in tiny random Qwen2.5-VL and Qwen2-VL models (M-RoPE, windowed ViT,
2×2 patch merger; merging after the merger): equal to the unpatched model
when nothing merges — images of different grids, videos, image + video,
padded batches, generate() — and consistent across batches and backends when
it does."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu  # noqa: E402

IMG, VID, VSTART, VEND = 290, 291, 292, 293
ROW = 3 * 2 * 14 * 14  # one patch row of pixel_values (channels x temporal patch x 14 x 14)
NO_MERGE = [float("inf")] * 2
KINDS = ["qwen2_5_vl", "qwen2_vl"]
SUPPRESS = [IMG, VID, VSTART, 2]  # placeholders, and eos (so every sample makes all its tokens)
_MODELS = {}


def tiny_qwen(kind: str):
    """A tiny random model of ``kind``; the 2.5 tower has windows of 2x2
    units (56 px) and full attention in blocks 1 and 3."""
    if kind not in _MODELS:
        text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 3, 3]})
        ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
        if kind == "qwen2_5_vl":
            vision = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64,
                          fullatt_block_indexes=[1, 3], window_size=56, tokens_per_second=2)
            config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
            cls = transformers.Qwen2_5_VLForConditionalGeneration
        else:
            vision = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64)
            config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
            cls = transformers.Qwen2VLForConditionalGeneration
        torch.manual_seed(0)
        _MODELS[kind] = cls(config).eval()
    model = _MODELS[kind]
    remove_dymu(model)
    return model


def placeholders(grid) -> int:
    t, h, w = grid
    return t * h * w // 4


def sample(gen, items, pre=(3, 4, 5), post=(6, 7)):
    """One prompt with ``items`` (``("image" | "video", (t, h, w))``):
    ``input_ids``, ``mm_token_type_ids`` and the pixels / grids per modality."""
    ids, pixels = list(pre), {"image": [], "video": []}
    for kind, grid in items:
        token = IMG if kind == "image" else VID
        ids += [VSTART] + [token] * placeholders(grid) + [VEND, 8]
        pixels[kind].append((randn(grid[0] * grid[1] * grid[2], ROW, gen=gen), grid))
    ids += list(post)
    return torch.tensor(ids), pixels


def batch(samples):
    """Left-padded model inputs for a list of :func:`sample` outputs."""
    L = max(len(ids) for ids, _ in samples)
    input_ids = torch.zeros(len(samples), L, dtype=torch.long)
    mask = torch.zeros(len(samples), L, dtype=torch.long)
    for i, (ids, _) in enumerate(samples):
        input_ids[i, L - len(ids):] = ids
        mask[i, L - len(ids):] = 1
    types = (input_ids == IMG).long() + 2 * (input_ids == VID).long()
    kwargs = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=types)
    for kind, pix_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                    ("video", "pixel_values_videos", "video_grid_thw")):
        found = [p for _, pixels in samples for p in pixels[kind]]
        if found:
            kwargs[pix_key] = torch.cat([p for p, _ in found])
            kwargs[grid_key] = torch.tensor([g for _, g in found])
    return kwargs


PROMPTS = {
    "image": [("image", (1, 6, 10))],
    "two images": [("image", (1, 4, 8)), ("image", (1, 10, 6))],
    "video": [("video", (3, 4, 6))],
    "image and video": [("image", (1, 6, 6)), ("video", (2, 6, 4))],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(PROMPTS))
def test_nothing_merged_equals_unpatched(gen, kind, name):
    """Logits, every hidden state and greedy generate() equal the unpatched
    model's (the model's own M-RoPE positions over the full sequence)."""
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS[name])])
    gen_kwargs = dict(kwargs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    with torch.no_grad():
        ref = model(**kwargs, output_hidden_states=True)
        seq = model.generate(**gen_kwargs)
        apply_dymu(model, NO_MERGE, backend="torch")
        out = model(**kwargs, output_hidden_states=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=2e-5)
        for h, h_ref in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=2e-5)
        assert torch.equal(model.generate(**gen_kwargs), seq)
        remove_dymu(model)
        assert torch.equal(model(**kwargs).logits, ref.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_and_generate_modes_nothing_merged(gen, kind):
    """A left-padded batch (different grids, a video in one sample) and
    generate() with beams and sampling equal the unpatched model."""
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS["image"]), sample(gen, PROMPTS["image and video"])])
    modes = [dict(do_sample=False), dict(num_beams=2, num_return_sequences=2, do_sample=False), dict(do_sample=True)]
    with torch.no_grad():
        ref = model(**kwargs).logits
        refs = []
        for mode in modes:
            torch.manual_seed(1)
            refs.append(model.generate(**kwargs, **mode, max_new_tokens=3, suppress_tokens=SUPPRESS))
        apply_dymu(model, NO_MERGE, backend="cpp")
        real = kwargs["attention_mask"].bool()
        torch.testing.assert_close(model(**kwargs).logits[real], ref[real], atol=2e-5, rtol=2e-5)
        for mode, expected in zip(modes, refs):
            torch.manual_seed(1)
            got = model.generate(**kwargs, **mode, max_new_tokens=3, suppress_tokens=SUPPRESS)
            assert torch.equal(got, expected), mode


@pytest.mark.parametrize("kind", KINDS)
def test_merging_batch_equals_each_alone_and_cpp_equals_torch(gen, kind):
    """With merging: each sample of a left-padded batch (images of different
    grids, a video) gets its single-prompt logits, greedy tokens and counts;
    the C++ merge equals the reference; the cache holds unique rows."""
    model = tiny_qwen(kind)
    samples = [sample(gen, PROMPTS["two images"]), sample(gen, PROMPTS["image and video"])]
    thresholds = [0.05, 0.05]
    with torch.no_grad():
        apply_dymu(model, thresholds, backend="torch")
        kwargs = batch(samples)
        out = model(**kwargs, use_cache=True)
        full, rows = out.past_key_values.get_seq_length(), out.past_key_values.layers[0].get_seq_length()
        assert full == kwargs["input_ids"].shape[1] and rows < full
        sizes = kv_cache_bytes(out.past_key_values)
        assert sizes["bytes"] < sizes["bytes_without_dymu"]
        seq = model.generate(**kwargs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
        real = kwargs["attention_mask"].bool()
        for i, s in enumerate(samples):
            alone = batch([s])
            single = model(**alone).logits[0]
            torch.testing.assert_close(out.logits[i][real[i]], single, atol=1e-4, rtol=1e-4)
            single_seq = model.generate(**alone, max_new_tokens=3, do_sample=False,
                                        suppress_tokens=SUPPRESS)
            assert torch.equal(seq[i, -3:], single_seq[0, -3:])
        stats = dymu_stats(model, "image")
        assert stats.num_patches == [placeholders((1, 6, 6))] and stats.tokens_kept[0] < placeholders((1, 6, 6))
        apply_dymu(model, thresholds, backend="cpp")
        torch.testing.assert_close(model(**kwargs).logits, out.logits, atol=1e-4, rtol=1e-4)


def test_stats_per_image_and_frame_pair(gen):
    """dymu_stats counts each image and each video frame pair (a set of
    h/2 x w/2 tokens), after each merge round; fixed r merges r per round."""
    model = tiny_qwen("qwen2_5_vl")
    kwargs = batch([sample(gen, [("image", (1, 4, 8)), ("image", (1, 10, 6)), ("video", (3, 4, 6))])])
    with torch.no_grad():
        apply_dymu(model, r=[3, 2], backend="cpp")
        model(**kwargs)
    images, video = dymu_stats(model, "image"), dymu_stats(model, "video")
    assert images.num_patches == [8, 15] and images.tokens_kept == [3, 10]
    assert images.tokens_per_layer == [[5, 3], [12, 10]]
    assert video.num_patches == [6, 6, 6] and video.tokens_kept == [1, 1, 1]


def test_processor_pixels_and_placeholder_counts():
    """The image processor's own output (pixel rows in 2x2-unit order, grids)
    goes through the patched get_image_features: one row per placeholder the
    processor counts (grid.prod() // 4), equal to the unpatched tower's."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = tiny_qwen("qwen2_5_vl")
    processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=140 * 140)
    images = [Image.new("RGB", (130, 70), (200, 30, 40)), Image.new("RGB", (60, 110), (10, 120, 220))]
    enc = processor(images=images, return_tensors="pt")
    grid = enc["image_grid_thw"]
    with torch.no_grad():
        ref = model.model.get_image_features(enc["pixel_values"], grid).pooler_output
        apply_dymu(model, NO_MERGE, backend="torch")
        got = model.model.get_image_features(enc["pixel_values"], grid).pooler_output
    assert [g.shape[0] for g in got] == (grid.prod(-1) // 4).tolist() == [r.shape[0] for r in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unsupported_settings_raise(gen):
    model = tiny_qwen("qwen2_5_vl")
    with pytest.raises(ValueError, match="no published thresholds"):
        apply_dymu(model)
    with pytest.raises(ValueError, match="one threshold per round"):
        apply_dymu(model, [])
    apply_dymu(model, NO_MERGE, backend="torch")
    ids, pixels = sample(gen, PROMPTS["image"])
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.model.get_image_features(pixels["image"][0][0])
