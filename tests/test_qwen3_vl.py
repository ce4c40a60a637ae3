"""DyMU in tiny random Qwen3-VL and Qwen3-VL-MoE models: learned position
embeddings in the tower, deepstack taps (merged inside the tower, one row per
final group and tap), interleaved M-RoPE and timestamped videos from the
model's own positions. Nothing merged equals the unpatched model; merged
batches equal each sample alone; the C++ path equals the reference."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu  # noqa: E402
from test_qwen_vl import IMG, VEND, VID, VSTART, batch, check_compiled_whole_model  # noqa: E402  (same token ids)

ROW = 3 * 2 * 16 * 16  # one patch row of pixel_values (channels x temporal patch x 16 x 16)
INF = float("inf")
DEPTH = 4
NO_MERGE = {"vit": [INF] * DEPTH, "merger": [INF] * 2}  # both stages, nothing merged
MERGE = {"vit": [0.3] * DEPTH, "merger": [0.05]}
KINDS = ["qwen3_vl", "qwen3_vl_moe"]
SUPPRESS = [IMG, VID, VSTART, 2]
_MODELS = {}


def tiny_qwen3(kind: str = "qwen3_vl"):
    """A tiny random ``kind`` model: 4 tower blocks with deepstack taps after
    blocks 0 and 2, a 16-entry (4 x 4) learned position table resampled to
    every grid, interleaved M-RoPE in a 2-layer text model."""
    if kind not in _MODELS:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
        text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0, rope_parameters=rope)
        vision = dict(depth=DEPTH, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=16, deepstack_visual_indexes=[0, 2])
        ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
        if kind == "qwen3_vl":
            config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
            cls = transformers.Qwen3VLForConditionalGeneration
        else:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
            config = transformers.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
            cls = transformers.Qwen3VLMoeForConditionalGeneration
        torch.manual_seed(0)
        _MODELS[kind] = cls(config).eval()
    return unpatched(_MODELS[kind])


def unpatched(model):
    """A cached tiny model as new: DyMU removed, no rope_deltas left from a previous generate()."""
    remove_dymu(model)
    model.model.rope_deltas = None
    return model


def units(grid) -> int:
    t, h, w = grid
    return t * h * w // 4


def sample(gen, items, pre=(3, 4, 5), post=(6, 7)):
    """One prompt with ``items`` (``("image" | "video", (t, h, w))``) as the
    Qwen3-VL processor lays them out (a video: per frame pair a timestamp
    token, then vision_start, its placeholders, vision_end)."""
    ids, pixels = list(pre), {"image": [], "video": []}
    for kind, grid in items:
        t, h, w = grid
        if kind == "image":
            ids += [VSTART] + [IMG] * units(grid) + [VEND, 8]
        else:
            for frame in range(t):
                ids += [20 + frame, VSTART] + [VID] * (h * w // 4) + [VEND]
            ids += [8]
        pixels[kind].append((randn(t * h * w, ROW, gen=gen), grid))
    ids += list(post)
    return torch.tensor(ids), pixels


PROMPTS = {
    "image": [("image", (1, 6, 10))],
    "two images": [("image", (1, 4, 8)), ("image", (1, 10, 6))],
    "video": [("video", (3, 4, 6))],
    "image and video": [("image", (1, 6, 6)), ("video", (2, 6, 4))],
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(PROMPTS))
def test_nothing_merged_equals_unpatched(gen, kind, name):
    """Logits, every hidden state, the deepstack features of
    get_image_features / get_video_features and greedy generate() equal the
    unpatched model's, with both merge stages on and nothing merging."""
    model = tiny_qwen3(kind)
    kwargs = batch([sample(gen, PROMPTS[name])])
    gen_kwargs = dict(kwargs, max_new_tokens=4, do_sample=False, suppress_tokens=SUPPRESS)
    modality = "video" if name == "video" else "image"
    pix, grid = (("pixel_values_videos", "video_grid_thw") if modality == "video" else
                 ("pixel_values", "image_grid_thw"))
    method = f"get_{modality}_features"
    with torch.no_grad():
        ref = model(**kwargs, output_hidden_states=True)
        ref_feats = getattr(model.model, method)(kwargs[pix], kwargs[grid])
        seq = model.generate(**gen_kwargs)
        apply_dymu(model, NO_MERGE, backend="torch")
        out = model(**kwargs, output_hidden_states=True)
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=2e-5)
        for h, h_ref in zip(out.hidden_states, ref.hidden_states, strict=True):
            torch.testing.assert_close(h, h_ref, atol=2e-5, rtol=2e-5)
        feats = getattr(model.model, method)(kwargs[pix], kwargs[grid])
        # The tower's features and taps bit for bit (the same ops on the same rows when nothing merges).
        for a, b in zip(feats.pooler_output, ref_feats.pooler_output, strict=True):
            assert torch.equal(a, b)
        assert len(feats.deepstack_features) == len(ref_feats.deepstack_features) == 2
        for tap, ref_tap in zip(feats.deepstack_features, ref_feats.deepstack_features, strict=True):
            for a, b in zip(tap, ref_tap, strict=True):
                assert torch.equal(a, b)
        torch.testing.assert_close(feats.last_hidden_state, ref_feats.last_hidden_state, atol=1e-5, rtol=1e-5)
        assert torch.equal(model.generate(**gen_kwargs), seq)
        remove_dymu(model)
        assert torch.equal(model(**kwargs).logits, ref.logits)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_and_generate_modes_nothing_merged(gen, kind):
    """A left-padded batch (different grids, a video in one sample), beams,
    sampling, a static cache and a second turn on the cache equal the
    unpatched model."""
    model = tiny_qwen3(kind)
    kwargs = batch([sample(gen, PROMPTS["image"]), sample(gen, PROMPTS["image and video"])])
    modes = [dict(do_sample=False), dict(num_beams=2, num_return_sequences=2, do_sample=False), dict(do_sample=True),
             dict(do_sample=False, cache_implementation="static")]
    with torch.no_grad():
        ref = model(**kwargs).logits
        refs = []
        for mode in modes:
            torch.manual_seed(1)
            refs.append(model.generate(**kwargs, **mode, max_new_tokens=3, suppress_tokens=SUPPRESS))
        first = model.generate(**kwargs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS,
                               return_dict_in_generate=True)
        turn = torch.tensor([[9, 10, 11]] * 2)
        second = dict(input_ids=torch.cat([first.sequences, turn], 1),  # new text only: the images are cached
                      attention_mask=torch.cat([kwargs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1),
                      mm_token_type_ids=torch.cat([kwargs["mm_token_type_ids"], torch.zeros(2, 5, dtype=torch.long)], 1))
        second_ref = model.generate(**second, past_key_values=first.past_key_values, max_new_tokens=2,
                                    do_sample=False, suppress_tokens=SUPPRESS)
        apply_dymu(model, NO_MERGE, backend="cpp")
        real = kwargs["attention_mask"].bool()
        torch.testing.assert_close(model(**kwargs).logits[real], ref[real], atol=2e-5, rtol=2e-5)
        for mode, expected in zip(modes, refs):
            torch.manual_seed(1)
            got = model.generate(**kwargs, **mode, max_new_tokens=3, suppress_tokens=SUPPRESS)
            assert torch.equal(got, expected), mode
        first = model.generate(**kwargs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS,
                               return_dict_in_generate=True)
        got = model.generate(**second, past_key_values=first.past_key_values, max_new_tokens=2, do_sample=False,
                             suppress_tokens=SUPPRESS)
        assert torch.equal(got, second_ref)


@pytest.mark.parametrize("kind", KINDS)
def test_merging_batch_equals_each_alone_and_cpp_equals_torch(gen, kind):
    """With merging in the tower and after the merger: each sample of a
    left-padded batch gets its single-prompt logits, greedy tokens and
    counts; the C++ path equals the reference; the cache holds unique rows."""
    model = tiny_qwen3(kind)
    samples = [sample(gen, PROMPTS["two images"]), sample(gen, PROMPTS["image and video"])]
    with torch.no_grad():
        apply_dymu(model, MERGE, backend="torch")
        kwargs = batch(samples)
        out = model(**kwargs, use_cache=True)
        stats = dymu_stats(model, "image")
        assert stats.num_patches == [8, 15, 9] and all(k < n for k, n in zip(stats.tokens_kept, stats.num_patches))
        full, rows = out.past_key_values.get_seq_length(), out.past_key_values.layers[0].get_seq_length()
        assert full == kwargs["input_ids"].shape[1] and rows < full
        sizes = kv_cache_bytes(out.past_key_values)
        assert sizes["bytes"] < sizes["bytes_without_dymu"]
        seq = model.generate(**kwargs, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
        real = kwargs["attention_mask"].bool()
        for i, s in enumerate(samples):
            alone = batch([s])
            torch.testing.assert_close(out.logits[i][real[i]], model(**alone).logits[0], atol=1e-4, rtol=1e-4)
            single = model.generate(**alone, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS)
            assert torch.equal(seq[i, -3:], single[0, -3:])
        apply_dymu(model, MERGE, backend="cpp")
        torch.testing.assert_close(model(**kwargs).logits, out.logits, atol=1e-4, rtol=1e-4)


def _plain_group_taps(model, pixels, grid, thresholds):
    """The deepstack rows DyMU must hand the language model, written plainly:
    the stock tower's tap mergers on each unit's row at the tap block of a
    tower that merges (the in-tower stage's own unit rows), averaged over the
    final groups."""
    from dymu_kernels.families.qwen_vit import QwenUnitDToMe

    stage = QwenUnitDToMe(model.model.visual, thresholds, backend="torch", trim=False)
    out = stage(pixels, grid)
    groups = out.state.pos_map[0]
    per_unit = [t[0] for t in out.taps]  # [P0, D] per tap: each unit's row of its unique unit at the tap block
    means = []
    for tap in per_unit:
        mean = torch.empty_like(tap)
        for g in groups.unique():
            mean[groups == g] = tap[groups == g].mean(0)
        means.append(mean)
    return means


def test_deepstack_rows_are_group_means_and_never_dropped(gen):
    """With merging, the rows the text model adds after its layers 0 and 1
    are, for every placeholder, the mean of its final group's per-unit tap
    rows; they are nonzero (never dropped), and the patched output keeps
    closer to the unpatched model than the same merging without deepstack."""
    model = tiny_qwen3()
    ids, pixels = sample(gen, PROMPTS["image"])
    kwargs = batch([(ids, pixels)])
    thresholds = [0.3] * DEPTH
    with torch.no_grad():
        stock = model(**kwargs).logits
        apply_dymu(model, thresholds, backend="torch")
        feats = model.model.get_image_features(kwargs["pixel_values"], kwargs["image_grid_thw"])
        expected = _plain_group_taps(model, kwargs["pixel_values"], kwargs["image_grid_thw"], thresholds)
        assert dymu_stats(model).tokens_kept[0] < units(PROMPTS["image"][0][1])
        for got, want in zip(feats.deepstack_features, expected, strict=True):
            torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
            assert got[0].abs().sum() > 0
        merged = model(**kwargs).logits
        captured = {}
        lm = model.model.language_model
        hook = lm.register_forward_pre_hook(lambda m, a, k: captured.update(k) or None, with_kwargs=True)
        model(**kwargs)
        hook.remove()
        assert captured["visual_pos_masks"].sum() == dymu_stats(model).tokens_kept[0]
        assert len(captured["deepstack_visual_embeds"]) == 2
        original = lm._deepstack_process
        lm._deepstack_process = lambda hidden, *args: hidden  # the same merging, taps dropped
        try:
            dropped = model(**kwargs).logits
        finally:
            lm._deepstack_process = original
    assert (merged - stock).norm() < (dropped - stock).norm()


def test_torch_compile_of_the_whole_model(gen):
    """The compiled forward with merging in both stages on a video (frame
    pairs, timestamped positions), the deepstack rows reaching the compiled
    language model, equals eager, and so does fullgraph compiled generate()
    (check_compiled_whole_model; dynamo's eager backend: the ops' fakes and
    graph breaks are dynamo's, their autograd trace is test_qwen_vl's, and
    the MoE model's language model differs only in its MLP — minutes of
    tracing less in CI). Images take the same tower and language-model code
    (compiled in test_qwen_vl and the LLaVA tests); each modality costs
    half a minute of tracing here."""
    model = tiny_qwen3()
    apply_dymu(model, MERGE, backend="cpp")
    check_compiled_whole_model(model, batch([sample(gen, PROMPTS["video"])]), SUPPRESS, backend="eager")


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_nothing_merged(gen, kind):
    """A fine-tuning step through the patched model equals the unpatched one
    (loss and every gradient) with nothing merged."""
    model = tiny_qwen3(kind)
    kwargs = batch([sample(gen, PROMPTS["image and video"])])
    labels = kwargs["input_ids"].masked_fill((kwargs["input_ids"] == IMG) | (kwargs["input_ids"] == VID), -100)

    def step():
        model.zero_grad()
        loss = model(**kwargs, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = step()
    apply_dymu(model, NO_MERGE)
    loss, grads = step()
    model.zero_grad()
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_calibration_cli_on_a_saved_qwen3_vl(tmp_path, capsys):
    """``python3 -m dymu_kernels.calibrate --model <a Qwen3-VL folder>``: the
    tower's blocks on 2x2 units (with its position embeddings), pixels and
    grids from the model's own 16-px image processor; the file patches the
    model and equals the API's result on the same images."""
    Image = pytest.importorskip("PIL.Image")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from dymu_kernels import Thresholds
    from dymu_kernels.calibrate import calibrate_tower, load_tower, main
    from dymu_kernels.families.qwen_vit import QwenUnitDToMe

    model = tiny_qwen3()
    folder, images = tmp_path / "qwen3", tmp_path / "images"
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=128 * 128).save_pretrained(folder)
    images.mkdir()
    rng = torch.Generator().manual_seed(3)
    for i in range(4):
        pixels = (torch.rand(96, 128, 3, generator=rng) * 255).to(torch.uint8).numpy()
        pixels[:, : 64 * (i % 2 + 1)] = 40 * i  # flat areas: something to merge
        Image.fromarray(pixels).save(images / f"{i}.png")
    out = tmp_path / "t.json"
    assert main(["--model", str(folder), "--images", str(images), "--r", "1", "--batch-size", "2", "--out", str(out),
                 "--no-progress"]) == 0
    assert f"calibrated {DEPTH} blocks on 4 images" in capsys.readouterr().out
    encoder, processor = load_tower(str(folder))
    assert isinstance(encoder, QwenUnitDToMe) and encoder.visual.pos_embed is not None
    assert processor.patch_size == 16
    from_cli = Thresholds.load(out)
    assert from_cli == calibrate_tower(encoder, images, 1, processor=processor, batch_size=2, model=str(folder),
                                       progress=False)
    apply_dymu(model, out)
    assert model._dymu.encoder.vit.thresholds == from_cli.thresholds
