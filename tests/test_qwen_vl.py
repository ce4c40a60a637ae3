"""DyMU in tiny random Qwen2.5-VL and Qwen2-VL models (M-RoPE, windowed ViT,
2×2 patch merger; merging inside the tower on units and after the merger):
equal to the unpatched model when nothing merges — images of different
grids, videos, image + video, padded batches, generate() — consistent across
batches and backends when it does, and the in-tower stage equal to a plainly
written expand → attend → average of the stock blocks."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu  # noqa: E402

IMG, VID, VSTART, VEND = 290, 291, 292, 293
ROW = 3 * 2 * 14 * 14  # one patch row of pixel_values (channels x temporal patch x 14 x 14)
INF = float("inf")
NO_MERGE = {"vit": [INF] * 4, "merger": [INF] * 2}  # both stages, nothing merged
MERGE = {"vit": [0.3] * 4, "merger": [0.05]}
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
            vision = dict(depth=4, embed_dim=32, num_heads=2, mlp_ratio=2, hidden_size=64)
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


CASES = [(name, NO_MERGE) for name in PROMPTS] + [("image and video", [INF] * 4),
                                                   ("image and video", {"merger": [INF]})]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name,stages", CASES, ids=[f"{n}-{'both' if isinstance(t, dict) and len(t) == 2 else 'vit' if isinstance(t, list) else 'merger'}" for n, t in CASES])
def test_nothing_merged_equals_unpatched(gen, kind, name, stages):
    """Logits, every hidden state and greedy generate() equal the unpatched
    model's (the model's own M-RoPE positions over the full sequence), with
    either merge stage or both."""
    assert_nothing_merged_equals_unpatched(tiny_qwen(kind), batch([sample(gen, PROMPTS[name])]), stages)


def assert_nothing_merged_equals_unpatched(model, kwargs, stages, suppress=SUPPRESS):
    """Patched with ``stages`` (merging nothing), ``model`` gives the
    unpatched logits, every hidden state and greedy tokens on ``kwargs``;
    removed, the unpatched logits bit for bit."""
    gen_kwargs = dict(kwargs, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
    with torch.no_grad():
        ref = model(**kwargs, output_hidden_states=True)
        seq = model.generate(**gen_kwargs)
        apply_dymu(model, stages, backend="torch")
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
def test_assisted_and_prompt_lookup_decoding(gen, kind):
    """Assisted decoding (the model as its own assistant, two candidates a
    step) and prompt lookup crop the cache back past rejected candidates:
    nothing merged, both equal the unpatched model's greedy tokens; merging,
    the patched model's own greedy tokens (a crop after merged items removes
    generated positions only)."""
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS["image and video"])])
    gen_kwargs = dict(kwargs, max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS)
    config = model.generation_config
    saved = config.num_assistant_tokens, config.num_assistant_tokens_schedule
    # What the assistant reads from its own generation config (the cached tiny model gets its own back after).
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = 2, "constant"
    with torch.no_grad():
        expected = model.generate(**gen_kwargs)
        for stages in (NO_MERGE, MERGE):
            apply_dymu(model, stages, backend="torch")
            if stages is MERGE:
                expected = model.generate(**gen_kwargs)
            for extra in (dict(assistant_model=model), dict(prompt_lookup_num_tokens=2)):
                assert torch.equal(model.generate(**gen_kwargs, **extra), expected), (stages, list(extra))
            remove_dymu(model)
    config.num_assistant_tokens, config.num_assistant_tokens_schedule = saved


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bands", [False, True], ids=["sets", "bands"])
def test_merging_batch_equals_each_alone_and_cpp_equals_torch(gen, kind, bands, monkeypatch):
    """With merging: each sample of a left-padded batch (images of different
    grids, a video) gets its single-prompt logits, greedy tokens and counts;
    the C++ merge equals the reference; the cache holds unique rows — also
    when images and frame pairs match in bands (here beyond 6 units)."""
    from dymu_kernels.families import qwen_vit

    if bands:
        monkeypatch.setattr(qwen_vit, "MATCH_UNITS", 6)
    model = tiny_qwen(kind)
    samples = [sample(gen, PROMPTS["two images"]), sample(gen, PROMPTS["image and video"])]
    thresholds = MERGE
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
    h/2 x w/2 units), after each vision block and merge round; fixed r
    merges r units per set and block."""
    model = tiny_qwen("qwen2_5_vl")
    kwargs = batch([sample(gen, [("image", (1, 4, 8)), ("image", (1, 10, 6)), ("video", (3, 4, 6))])])
    with torch.no_grad():
        apply_dymu(model, {"merger": [INF]}, r=[2, 1, 1, 0], backend="cpp")
        model(**kwargs)
    images, video = dymu_stats(model, "image"), dymu_stats(model, "video")
    assert images.num_patches == [8, 15] and images.tokens_kept == [4, 11]
    assert images.tokens_per_layer == [[6, 5, 4, 4, 4], [13, 12, 11, 11, 11]]
    assert video.num_patches == [6, 6, 6] and video.tokens_kept == [2, 2, 2]


def test_match_sets_bands_of_window_rows():
    """Images / frame pairs beyond max_units units match in bands of whole
    unit rows, a multiple of the window height, at most max_units units where
    a window row allows it; smaller ones are one set (the default bound keeps
    every image up to 4096 LM tokens whole)."""
    from dymu_kernels.families.qwen_vit import MATCH_UNITS, match_sets

    sets = match_sets(torch.tensor([[1, 6, 10], [2, 20, 8], [1, 4, 4]]), 2, window_units=2, max_units=9)
    # 3x5 units: a window row (2 unit rows, 10 units) is the least band; 10x4 units: bands of 2 rows (8 units).
    assert sets.units == [10, 5] + [8] * 10 + [4]
    assert sets.frames == [2, 5, 5, 1] and sets.frame_units == [15, 40, 40, 4] and sets.items == [2, 10, 1]
    assert match_sets(torch.tensor([[1, 6, 10]]), 2, 1, max_units=9).units == [5, 5, 5]
    assert MATCH_UNITS == 4096
    assert match_sets(torch.tensor([[1, 128, 128]]), 2, 4).units == [4096]
    assert match_sets(torch.tensor([[1, 256, 256]]), 2, 4).units == [4096] * 4  # 16k LM tokens
    assert match_sets(torch.tensor([[1, 250, 262]]), 2, 4).units == [28 * 131] * 4 + [13 * 131]
    with pytest.raises(ValueError, match="max_units=0"):
        match_sets(torch.tensor([[1, 4, 4]]), 2, max_units=0)


@pytest.mark.parametrize("kind", KINDS)
def test_bands_nothing_merged_and_r_per_band(gen, kind, monkeypatch):
    """Bands (beyond 6 units here): nothing merged still equals the unpatched
    model (images, a video, both stages); fixed r merges r units per band and
    block, and dymu_stats sums an image's bands."""
    from dymu_kernels.families import qwen_vit

    monkeypatch.setattr(qwen_vit, "MATCH_UNITS", 6)
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS["two images"] + [("video", (2, 6, 6))])])
    with torch.no_grad():
        ref = model(**kwargs).logits
        apply_dymu(model, NO_MERGE, backend="cpp")
        torch.testing.assert_close(model(**kwargs).logits, ref, atol=2e-5, rtol=2e-5)
        blocks = len(model.model.visual.blocks)
        apply_dymu(model, {"merger": [INF]}, r=[1] + [0] * (blocks - 1), backend="cpp")
        model(**kwargs)
    # 2x4 units: one band (a window row of the 2.5 tower is 2 unit rows); 5x3: bands of 2 rows (2.5) / 2 rows;
    # video frame pairs of 3x3 units: bands of 2 rows (2.5) / 2 rows.
    bands = {"qwen2_5_vl": ([1, 3], [2, 2]), "qwen2_vl": ([2, 3], [2, 2])}[kind]
    images, video = dymu_stats(model, "image"), dymu_stats(model, "video")
    assert images.num_patches == [8, 15] and images.tokens_kept == [8 - bands[0][0], 15 - bands[0][1]]
    assert video.num_patches == [9, 9] and video.tokens_kept == [9 - b for b in bands[1]]
    assert images.tokens_per_layer[1] == [15 - bands[0][1]] * (blocks + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_tower_hidden_states_as_transformers(gen, kind):
    """get_image_features / get_video_features give the tower's hidden states
    as transformers does: the last one at every patch, and with
    output_hidden_states=True every block's input and the last — equal to
    the stock tower's with nothing merged (either stage); with merging, each
    patch carries its unit's row and the first entry is the unmerged input."""
    model = tiny_qwen(kind)
    grid = torch.tensor([[1, 6, 10], [1, 4, 8]])
    pixels = randn(int(grid.prod(-1).sum()), ROW, gen=gen)
    video_grid = torch.tensor([[2, 4, 6]])
    video = randn(int(video_grid.prod()), ROW, gen=gen)
    inner = model.model

    def run(**kwargs):
        return (inner.get_image_features(pixels, grid, **kwargs), inner.get_video_features(video, video_grid, **kwargs))

    with torch.no_grad():
        refs, ref_lasts = run(output_hidden_states=True), run()
        for stages in (NO_MERGE, {"merger": [INF]}):
            apply_dymu(model, stages, backend="torch")
            for got, got_last, ref, ref_last in zip(run(output_hidden_states=True), run(), refs, ref_lasts):
                assert got_last.hidden_states is None
                torch.testing.assert_close(got_last.last_hidden_state, ref_last.last_hidden_state, atol=2e-5,
                                           rtol=2e-5)
                assert len(got.hidden_states) == len(ref.hidden_states) == len(inner.visual.blocks) + 1
                for h, h_ref in zip(got.hidden_states, ref.hidden_states):
                    torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=2e-5)
                assert got.last_hidden_state is got.hidden_states[-1]
        apply_dymu(model, MERGE, backend="torch")
        merged = inner.get_image_features(pixels, grid, output_hidden_states=True)
    assert torch.equal(merged.hidden_states[0], refs[0].hidden_states[0])
    last = merged.hidden_states[-1]
    assert last.shape == refs[0].last_hidden_state.shape and not torch.allclose(last, refs[0].last_hidden_state)
    units = last.view(-1, 4 * last.shape[-1]).unique(dim=0).shape[0]  # distinct unit rows at the patches
    after_tower = [n[len(inner.visual.blocks) - 1] for n in dymu_stats(model, "image").tokens_per_layer]
    assert units == sum(after_tower) < last.shape[0] // 4


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
        apply_dymu(model, {"merger": []})
    with pytest.raises(ValueError, match="stages \\['tower'\\] unknown"):
        apply_dymu(model, {"tower": [0.5] * 4})
    with pytest.raises(ValueError, match="4 vision blocks"):
        apply_dymu(model, [0.5, 0.5])
    apply_dymu(model, NO_MERGE, backend="torch")
    ids, pixels = sample(gen, PROMPTS["image"])
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.model.get_image_features(pixels["image"][0][0])


def group_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Each row replaced by the mean of the rows in its group (plainly)."""
    out = torch.empty_like(values)
    for g in groups.unique():
        members = groups == g
        out[members] = values[members].mean(0)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("match_units", [4096, 6], ids=["sets", "bands"])
def test_vit_stage_equals_plain_expand_attend_average(gen, kind, match_units, monkeypatch):
    """With merging, the in-tower stage equals the stock blocks run plainly on
    the expanded sequence: every patch carries its unit's vector, the stock
    attention module attends over all patches (its own windows / segments,
    2-D RoPE), outputs are averaged over each merged group, the merges the
    stage chose are applied (size-weighted: a mean over the original units),
    then the stock MLP; the stock merger on the result gives the tokens."""
    from dymu_kernels.families import qwen_vit

    model = tiny_qwen(kind)
    visual = model.model.visual
    grid = torch.tensor([[1, 6, 10], [2, 4, 6]])
    pixels = randn(int(grid.prod(-1).sum()), ROW, gen=gen)
    maps = []  # each block's merge: the set-local map before and after

    def spy(x, size, lengths, pos_map, metric, threshold=None, **kwargs):
        out = real(x, size, lengths, pos_map, metric, threshold, **kwargs)
        maps.append((pos_map.clone(), out.pos_map.clone()))
        return out

    real = qwen_vit.dtome_merge
    monkeypatch.setattr(qwen_vit, "dtome_merge", spy)
    with torch.no_grad():
        state, last, _, sets, _ = qwen_vit.QwenUnitDToMe(visual, [0.3] * 4, backend="torch", trim=False,
                                                         match_units=match_units)(pixels, grid)
        sizes = sets.units
        inputs = []  # what each stock block gets: (hidden states, segments, rotary tables)
        hooks = [blk.register_forward_pre_hook(lambda m, a, k: inputs.append((a[0], k["cu_seqlens"],
                                                                              k["position_embeddings"])),
                                               with_kwargs=True) for blk in visual.blocks]
        stock = visual(pixels, grid_thw=grid)
        for h in hooks:
            h.remove()
        assert len(maps) == len(visual.blocks) and any((b != a).any() for a, b in maps)
        valid = torch.arange(maps[0][0].shape[1])[None] < torch.tensor(sizes)[:, None]
        sets = torch.arange(len(sizes))[:, None].expand_as(valid)[valid]

        def groups(pos_map):  # window-order units -> a global group id
            return sets * 1000 + pos_map[valid]

        x = inputs[0][0]  # [L, C], window order
        L, C = x.shape
        for blk, (_, cu, rotary), (before, after) in zip(visual.blocks, inputs, maps):
            y = x + blk.attn(blk.norm1(x), cu_seqlens=cu, position_embeddings=rotary)
            y = group_mean(group_mean(y.view(-1, 4 * C), groups(before)), groups(after)).view(L, C)
            x = y + blk.mlp(blk.norm2(y))
        torch.testing.assert_close(last, x, atol=1e-5, rtol=1e-5)
        tokens = visual.merger(x)  # window order; the stage's map is in raster order
        if hasattr(visual, "fullatt_block_indexes"):
            tokens = tokens[torch.argsort(stock_window_index(visual, grid))]
        ours = state.x.gather(1, state.pos_map.clamp_min(0)[..., None].expand(-1, -1, state.x.shape[-1]))[valid]
        torch.testing.assert_close(ours, tokens, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(tokens, stock.pooler_output, atol=1e-3)  # merging changed the tokens


def stock_window_index(visual, grid):
    from transformers import vision_utils

    return vision_utils.get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                window_size=visual.window_size, patch_size=visual.patch_size)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_static_cache_and_a_second_turn_equal_unpatched(gen, kind):
    """generate() with a static cache, and a second turn of new text on the
    first turn's cache (positions continue after the image's M-RoPE
    positions), equal the unpatched model with nothing merged."""
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS["image and video"])])
    more = torch.tensor([[9, 10, 11]])

    def run():
        static = model.generate(**kwargs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS,
                                cache_implementation="static")
        first = model.generate(**kwargs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS,
                               return_dict_in_generate=True)
        ids = torch.cat([first.sequences, more], 1)
        types = torch.nn.functional.pad(kwargs["mm_token_type_ids"], (0, ids.shape[1] - kwargs["input_ids"].shape[1]))
        second = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                                cache=first.past_key_values, max_new_tokens=3, do_sample=False,
                                suppress_tokens=SUPPRESS)
        return static, second

    with torch.no_grad():
        expected = run()
        apply_dymu(model, NO_MERGE, backend="torch")
        got = run()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def test_bench_qwen_quick_rows(tmp_path, family):
    """benchmarks/bench_qwen.py --quick writes rows for every config and prompt
    (Qwen2.5-VL, Qwen3-VL with deepstack and timestamped video frames, and
    Qwen3.5's hybrid language model with its time by layer part); merging
    keeps fewer language-model tokens and costs fewer FLOPs."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_qwen.py"), "--quick", "--samples",
                           "3", "--family", family, "--results-dir", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = {"qwen2_5_vl": "qwen", "qwen3_vl": "qwen3", "qwen3_5": "qwen3_5"}[family]
    rows = [json.loads(line) for line in open(tmp_path / f"{name}_quick.jsonl")]
    assert all(r["family"] == family for r in rows)
    assert [(r["config"], r["prompt"]) for r in rows] == [
        (c, p) for c in ("stock", "r=12", "r=24", "thresholds", "stock (last)") for p in ("image", "video")]
    by = {(r["config"], r["prompt"]): r for r in rows}
    for prompt in ("image", "video"):
        stock = by[("stock", prompt)]
        assert stock["lm_tokens"] == stock["positions"] and stock["flop_bound"] == 1.0
        assert by[("r=24", prompt)]["lm_tokens"] < by[("r=12", prompt)]["lm_tokens"] < stock["lm_tokens"]
        for config in ("r=12", "r=24", "thresholds"):
            r = by[(config, prompt)]
            assert r["flop_bound"] > 1.0 and r["tower_flop_bound"] > 1.0 and r["kv_mib"] < stock["kv_mib"]
            assert r["prefill_min"] <= r["prefill_s"] <= r["prefill_max"] and r["n_samples"] == 3
    assert rows[0]["commit"] and rows[0]["device"].startswith("cpu")
    for r in rows:  # Qwen3.5: the linear layers' time apart (their mixing and projections), else none of it
        parts = ("linear_mixing_s", "linear_projections_s", "full_attention_s", "mlp_s")
        if family == "qwen3_5":
            assert all(r[k] > 0 for k in parts) and r["linear_mixing_s"] < r["prefill_s"]
        else:
            assert not any(k in r for k in parts)


@pytest.mark.parametrize("kind", KINDS)
def test_inputs_embeds_without_positions_as_transformers(gen, kind):
    """inputs_embeds without input_ids or position_ids: the positions are what
    transformers makes of it (its compute_3d_position_ids: the 1-D fallback,
    or its last rope_deltas), so the patched model equals the unpatched one."""
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS["image"])])
    ids = kwargs.pop("input_ids")
    kwargs["inputs_embeds"] = model.get_input_embeddings()(ids)
    outs = []
    with torch.no_grad():
        for patch in (None, NO_MERGE):
            if patch is not None:
                apply_dymu(model, patch, backend="torch")
            model.model.rope_deltas = None  # a fresh model: no positions from an earlier prompt
            fresh = model(**kwargs).logits
            model(input_ids=ids, **{k: v for k, v in kwargs.items() if k != "inputs_embeds"})  # sets rope_deltas
            outs.append((fresh, model(**kwargs).logits))
    for got, expected in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


def check_compiled_whole_model(model, kwargs, suppress, backend="aot_eager"):
    """torch.compile of a patched model's forward (by default aot_eager: the
    trace through every op's fake and autograd, without inductor's minutes of
    codegen here) equals eager, and every graph break is a data-dependent size
    (grids, segment lengths, token counts — as the unpatched model's own
    vision code has) or the cache's class swap — none at a kernel (all
    torch.library ops with fakes);
    then generate() with a fullgraph compiled forward
    (check_fullgraph_static_generate)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        expected = model(**kwargs).logits
        try:
            got = torch.compile(model.forward, backend=backend)(**kwargs).logits
        finally:
            torch._dynamo.reset()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    reasons = list(counters["graph_break"])
    # Besides data-dependent sizes: the cache's one-time class swap (torch.compiler.disable), and transformers'
    # own output-capturing hooks (installed on the model's modules once anything asked it for hidden states),
    # which read a ContextVar dynamo does not trace.
    allowed = ("Data dependent", "Dynamic shape", "Tensor.item()", "compiler.disable", "`get` of class `ContextVar`")
    assert reasons and all(any(a in r for a in allowed) for r in reasons), reasons
    check_fullgraph_static_generate(model, kwargs, suppress)


def check_fullgraph_static_generate(model, kwargs, suppress):
    """generate() with a fullgraph, static-shape compiled forward (as
    transformers' own compile tests configure it: ``dynamic=False``, a
    static cache) equals eager generate(), twice, from *one* graph: the VTU
    state on the cache is preallocated to the cache's length, so no decode
    step changes a shape (it grew by a column per step and recompiled each
    step)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    base = dict(kwargs, max_new_tokens=4, do_sample=False, suppress_tokens=suppress)
    config = model.generation_config
    with torch.no_grad():
        eager = model.generate(**base)
        config.compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
        config.compile_config._compile_all_devices = True  # compile on the CPU too
        torch._dynamo.reset()
        counters.clear()
        try:
            runs = [model.generate(**base, cache_implementation="static") for _ in range(2)]
        finally:
            config.compile_config = None
            torch._dynamo.reset()
    assert all(torch.equal(run, eager) for run in runs)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_fullgraph_static_generate_compiles_once_nothing_merged(gen):
    """check_fullgraph_static_generate with nothing merged (merging: the
    whole-model test below)."""
    model = tiny_qwen("qwen2_5_vl")
    apply_dymu(model, NO_MERGE, backend="torch")
    check_fullgraph_static_generate(model, batch([sample(gen, PROMPTS["image"])]), SUPPRESS)


def test_torch_compile_of_the_whole_model(gen):
    """The compiled forward with merging in both stages equals eager, and so
    does fullgraph compiled generate() (check_compiled_whole_model; an image:
    a video doubles the minutes of tracing, test_qwen3_vl compiles one)."""
    model = tiny_qwen("qwen2_5_vl")
    apply_dymu(model, MERGE, backend="cpp")
    check_compiled_whole_model(model, batch([sample(gen, PROMPTS["image"])]), SUPPRESS)


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_and_loss_kwargs(gen, kind):
    """A fine-tuning step through a patched model (the tower's per-unit means
    on the C++ path have a backward): with nothing merged, the loss and every
    parameter's gradient equal the unpatched model's; with merging, gradients
    reach the tower. Loss keywords (``shift_labels``) pass through to the loss."""
    model = tiny_qwen(kind)
    kwargs = batch([sample(gen, PROMPTS["image and video"])])
    labels = kwargs["input_ids"].masked_fill((kwargs["input_ids"] == IMG) | (kwargs["input_ids"] == VID), -100)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)

    def step(**extra):
        model.zero_grad()
        loss = model(**kwargs, **extra).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step(labels=labels)
    apply_dymu(model, NO_MERGE)  # "auto": C++ where it has a backward, the reference merge where not
    loss, grads = step(labels=labels)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)
    shifted, _ = step(labels=labels, shift_labels=shift)
    torch.testing.assert_close(shifted, ref_loss, atol=1e-5, rtol=1e-5)
    apply_dymu(model, MERGE)
    loss, grads = step(labels=labels)
    assert torch.isfinite(loss)
    assert grads["model.visual.blocks.0.attn.qkv.weight"].abs().sum() > 0
    model.zero_grad()
    remove_dymu(model)
