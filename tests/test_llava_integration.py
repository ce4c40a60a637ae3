"""DyMU in a tiny, randomly initialised HF LLaVA: apply_dymu / generate / remove_dymu."""

import sys

import pytest
import torch

from conftest import TRITON_DEVICE, randn
from test_compact_layout import loop_layout

transformers = pytest.importorskip("transformers")

from dymu_kernels import reference as ref  # noqa: E402
from dymu_kernels.hf import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu  # noqa: E402
from dymu_kernels.core.compact import MergedItems, build_compact_sequence  # noqa: E402

IMG = 99  # image placeholder id
P = 16  # patches per image (28 px / 7 px)


def tiny_llava(seed=0):
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=28, patch_size=7)
    text = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, max_position_embeddings=512)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMG,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(config).eval()


def prompt(n_images=1, pre=3, post=4, start=1):
    ids = list(range(start, start + pre))
    for i in range(n_images):
        ids += [IMG] * P + [start + pre + i]
    return torch.tensor([ids + list(range(40, 40 + post))])


def left_padded(*prompts):
    """One batch of prompts, left-padded with 0 like a tokenizer for generation: ``(input_ids, attention_mask)``."""
    n = max(p.shape[1] for p in prompts)
    ids = torch.cat([torch.cat([torch.zeros(1, n - p.shape[1], dtype=torch.long), p], 1) for p in prompts])
    mask = torch.stack([torch.arange(n) >= n - p.shape[1] for p in prompts]).long()
    return ids, mask


def images(gen, n, flat=()):
    pix = randn(n, 3, 28, 28, gen=gen)
    for i in flat:
        pix[i] = 0.2  # a flat image: its patches are identical and merge
    return pix


def greedy(model, ids, pix, attention_mask=None, steps=6, use_cache=True):
    out = model.generate(input_ids=ids, pixel_values=pix, attention_mask=attention_mask, max_new_tokens=steps,
                         do_sample=False, use_cache=use_cache, suppress_tokens=[IMG], output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1)


NO_MERGE = [float("inf")] * 2  # no score exceeds inf: nothing merges


def test_nothing_merged_equals_unpatched_with_and_without_cache(gen):
    model = tiny_llava()
    ids, pix = prompt(2), images(gen, 2)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pix).logits
        seq, scores = greedy(model, ids, pix)
        apply_dymu(model, NO_MERGE, backend="torch")
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pix).logits, logits, atol=2e-5, rtol=2e-5)
        for use_cache in (True, False):
            s2, sc2 = greedy(model, ids, pix, use_cache=use_cache)
            assert torch.equal(s2, seq)
            torch.testing.assert_close(sc2, scores, atol=2e-5, rtol=2e-5)
    assert dymu_stats(model).tokens_kept == [P, P]


def test_merging_backends_agree_and_remove_restores(gen):
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    with torch.no_grad():
        before = model(input_ids=ids, pixel_values=pix).logits
        apply_dymu(model, [0.5, 0.5], backend="torch")
        ref_seq, ref_scores = greedy(model, ids, pix)
        stats = dymu_stats(model)
        assert stats.tokens_kept[0] < P and len(stats.tokens_per_layer[0]) == 2
        patch = model._dymu
        assert apply_dymu(model, [0.5, 0.5], backend="torch") is model and model._dymu is patch  # same: a no-op
        apply_dymu(model, NO_MERGE, backend="torch")  # other settings replace the old ones
        assert model._dymu.encoder.thresholds == NO_MERGE
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pix).logits, before, atol=1e-5, rtol=1e-5)
        remove_dymu(model)
        assert torch.equal(model(input_ids=ids, pixel_values=pix).logits, before)
        assert getattr(model, "_dymu", None) is None and "forward" not in model.model.__dict__
        # The fast backend: C++ merge on the CPU, Triton kernels on a GPU.
        device, backend = ("cuda", "triton") if TRITON_DEVICE == "cuda" else ("cpu", "cpp")
        model.to(device)
        apply_dymu(model, [0.5, 0.5], backend=backend)
        seq, scores = greedy(model, ids.to(device), pix.to(device))
    assert torch.equal(seq.cpu(), ref_seq)
    torch.testing.assert_close(scores.cpu(), ref_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(TRITON_DEVICE != "cpu", reason="interpreter variant of the GPU test above")
def test_triton_backend_in_the_interpreter(gen):
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    with torch.no_grad():
        apply_dymu(model, [0.5, 0.5], backend="torch")
        ref_seq, ref_scores = greedy(model, ids, pix, steps=3)
        remove_dymu(model)
        apply_dymu(model, [0.5, 0.5], backend="triton")
        seq, scores = greedy(model, ids, pix, steps=3)
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=1e-4)


def test_batch_with_left_padding_equals_each_sample_alone(gen):
    model = tiny_llava()
    a, b = prompt(1, pre=2, post=2), prompt(2, pre=5, post=3, start=10)
    pix = images(gen, 3, flat=(1,))  # sample a: image 0; sample b: images 1 (flat) and 2
    ids, mask = left_padded(a, b)
    with torch.no_grad():
        apply_dymu(model, [0.5, 0.5], backend="torch")
        batch_seq, batch_scores = greedy(model, ids, pix, attention_mask=mask)
        kept = dymu_stats(model).tokens_kept
        seq_a, scores_a = greedy(model, a, pix[:1])
        seq_b, scores_b = greedy(model, b, pix[1:])
    assert kept[1] < kept[0] and kept[1] < kept[2]  # the flat image keeps fewer tokens
    assert torch.equal(batch_seq[0], seq_a[0]) and torch.equal(batch_seq[1], seq_b[0])
    torch.testing.assert_close(batch_scores[0], scores_a[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch_scores[1], scores_b[0], atol=1e-4, rtol=1e-4)


def test_kv_cache_holds_one_row_per_unique_token(gen):
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    with torch.no_grad():
        apply_dymu(model, [0.5, 0.5], backend="torch")
        out = model(input_ids=ids, pixel_values=pix, use_cache=True)
    kept = dymu_stats(model).tokens_kept[0]
    n_unique = ids.shape[1] - P + kept
    report = kv_cache_bytes(out.past_key_values)
    per_row = 2 * 2 * 2 * 32 * 4  # layers x (k, v) x kv heads x head dim x fp32 bytes
    assert report["bytes"] == n_unique * per_row
    assert report["bytes_without_dymu"] == ids.shape[1] * per_row


def test_patched_layer_equals_expanded_attention(gen):
    """VTU semantics by hand: expand the compact sequence to every position, run the
    original layer's attention with HF's RoPE at the full positions, average per group."""
    model = tiny_llava()
    lm = model.model.language_model
    layer = lm.layers[0]
    merge_map = torch.tensor([[0, 1, 2, 2, 3, 2, 3, 4, 5]], dtype=torch.int32)
    hidden = randn(1, 6, 128, gen=gen)
    positions = torch.arange(9)[None]
    cos, sin = lm.rotary_emb(hidden, positions)
    with torch.no_grad():
        full = ref.unmerge(hidden, merge_map)
        mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
        expanded = layer.self_attn(layer.input_layernorm(full), position_embeddings=(cos, sin), attention_mask=mask)[0]
        expected = ref.segment_mean(expanded, merge_map, 6)

        from dymu_kernels.hf.attention import VTUContext

        apply_dymu(model, NO_MERGE, backend="torch")  # the layer now runs VTU in calls carrying a context
        ones, zeros = torch.ones(1, 6, 32), torch.zeros(1, 6, 32)
        ctx = VTUContext(merge_map, cos, sin, decode=False, backend="torch")
        got = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=(ones, zeros), attention_mask=None,
                              dymu_vtu=ctx)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_ablations_fixed_r_and_no_vtu(gen):
    model = tiny_llava()
    ids, pix = prompt(2), images(gen, 2, flat=(0,))
    with torch.no_grad():
        plain = model(input_ids=ids, pixel_values=pix).logits
        apply_dymu(model, r=3, backend="torch")
        greedy(model, ids, pix, steps=3)
        assert dymu_stats(model).tokens_kept == [P - 6, P - 6]  # 2 blocks x 3 merges, whatever the image
        remove_dymu(model)
        # No VTU: the language model sees the compact sequence at compressed positions.
        apply_dymu(model, NO_MERGE, vtu=False, backend="torch")
        no_vtu = model(input_ids=ids, pixel_values=pix).logits
        torch.testing.assert_close(no_vtu[:, :3], plain[:, :3], atol=2e-5, rtol=2e-5)  # text before the images
        remove_dymu(model)
        apply_dymu(model, [0.5, 0.5], vtu=False, backend="torch")
        merged_no_vtu = model(input_ids=ids, pixel_values=pix).logits
        seq, _ = greedy(model, ids, pix, steps=4)
        assert seq.shape == (1, 4) and dymu_stats(model).tokens_kept[0] < P
        remove_dymu(model)
        apply_dymu(model, [0.5, 0.5], backend="torch")
        merged_vtu = model(input_ids=ids, pixel_values=pix).logits
    # Same merges, but VTU keeps the original positions: the last token sees a different sequence.
    assert not torch.allclose(merged_vtu[:, -1], merged_no_vtu[:, -1], atol=1e-3)


def test_errors(gen, tmp_path):
    model = tiny_llava()
    with pytest.raises(TypeError, match="apply_dymu supports transformers LlavaForConditionalGeneration"):
        apply_dymu(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="thresholds has 1 entries but 2 encoder blocks run"):
        apply_dymu(model, [0.9])
    with pytest.raises(ValueError, match="thresholds\\[1\\] must be a number"):
        apply_dymu(model, [0.9, "x"])
    with pytest.raises(ValueError, match="thresholds\\[0\\] = 2.0 is outside \\[-1, 1\\]"):
        apply_dymu(model, [2.0, 0.9])
    with pytest.raises(ValueError, match="neither a threshold file nor a preset"):
        apply_dymu(model, "no-such-file.json")
    with pytest.raises(ValueError, match=r"thresholds stages \['merger'\] unknown for LlavaForConditionalGeneration"):
        apply_dymu(model, {"merger": [0.5]})
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="'format' must be"):
        apply_dymu(model, bad)
    assert getattr(model, "_dymu", None) is None  # failed calls leave the model untouched
    apply_dymu(model, NO_MERGE, backend="torch")
    with pytest.raises(ValueError, match="found 32 image placeholder tokens in input_ids but 1 image\\(s\\) with 16 image tokens"):
        model(input_ids=prompt(2), pixel_values=images(gen, 1))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids=prompt(1), inputs_embeds=torch.randn(1, 24, 128))


def test_transformers_version_and_feature_layer_checks(monkeypatch):
    model = tiny_llava()
    # transformers swaps its sys.modules entry for a lazy module: patch the one `import` returns.
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.40.0")
    with pytest.raises(RuntimeError, match="supports transformers >= 5.24 and < 6.0, found 4.40.0"):
        apply_dymu(model, NO_MERGE)
    monkeypatch.undo()
    model.model.config.vision_feature_layer = [-2, -1]
    with pytest.raises(ValueError, match="DyMU needs a single vision_feature_layer"):
        apply_dymu(model, NO_MERGE)


def test_beam_search_and_several_return_sequences(gen):
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1)
    kwargs = dict(input_ids=ids, pixel_values=pix, max_new_tokens=4, suppress_tokens=[IMG], pad_token_id=0)
    with torch.no_grad():
        beams = model.generate(num_beams=3, num_return_sequences=2, do_sample=False, **kwargs)
        apply_dymu(model, NO_MERGE, backend="torch")
        assert torch.equal(model.generate(num_beams=3, num_return_sequences=2, do_sample=False, **kwargs), beams)
        remove_dymu(model)
        apply_dymu(model, [0.5, 0.5], backend="torch")
        out = model.generate(num_beams=2, num_return_sequences=2, do_sample=False, **kwargs)
    assert out.shape[0] == 2 and dymu_stats(model).tokens_kept[0] < P


def test_trimmed_vision_tower_gives_the_same_logits(gen):
    model = tiny_llava()
    ids, mask = left_padded(prompt(1, pre=2, post=2), prompt(2, pre=5, post=3, start=10))
    pix = images(gen, 3, flat=(1,))  # the flat image keeps far fewer tokens
    logits, stats = {}, {}
    with torch.no_grad():
        for trim in (False, True):
            apply_dymu(model, [0.5, 0.5], backend="torch", trim=trim)
            logits[trim] = model(input_ids=ids, pixel_values=pix, attention_mask=mask).logits
            stats[trim] = dymu_stats(model)
            if trim:
                capacity = model._dymu.encoder(pix).features.shape[1]
            remove_dymu(model)
        assert apply_dymu(model, [0.5, 0.5])._dymu.encoder.trim == "auto"  # the default
    assert capacity < P + 1 and min(stats[True].tokens_kept) < max(stats[True].tokens_kept)
    assert stats[True] == stats[False]
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def random_merged_images(gen, n_img, u_cap, dim):
    """Features, unique counts (all different) and placeholder -> unique maps of n_img images."""
    counts = torch.randperm(u_cap, generator=gen)[:n_img] + 1
    slots = torch.stack([torch.randint(0, int(c), (P,), generator=gen) for c in counts])
    return randn(n_img, u_cap, dim, gen=gen), counts, slots


def test_build_compact_sequence_equals_per_image_loop(gen):
    # Left padding, two and three images per prompt, a prompt without images.
    ids, mask = left_padded(prompt(2, pre=1, post=2), prompt(0, pre=4, post=1), prompt(1, pre=3, post=0, start=20),
                            prompt(3, pre=2, post=3, start=5))
    feats, counts, slots = random_merged_images(gen, 6, P - 2, 8)  # U_cap < P: a trimmed tower
    embeds = randn(*ids.shape, 8, gen=gen)
    got = build_compact_sequence(ids == IMG, mask, embeds, MergedItems(feats, counts, slots))
    expected = loop_layout(ids, mask, embeds, {IMG: MergedItems(feats, counts, slots)})
    assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
    assert torch.equal(got[0], expected[0])


def test_build_compact_sequence_rejects_images_split_across_prompts(gen):
    ids, mask = left_padded(prompt(1, pre=1, post=2), prompt(1, pre=1, post=2))
    ids[0, -3], ids[1, 1] = IMG, 7  # sample 0 has P + 1 placeholders, sample 1 has P - 1
    feats, counts, slots = random_merged_images(gen, 2, P, 8)
    with pytest.raises(ValueError, match="the placeholders of image 1 span two samples"):
        build_compact_sequence(ids == IMG, mask, randn(*ids.shape, 8, gen=gen), MergedItems(feats, counts, slots))


def test_text_only_calls_and_placeholder_mismatch(gen):
    """Image-token ids without pixel values are ordinary tokens, as in the
    unpatched model (assisted decoding's first step runs like this); a prompt
    without placeholders but with pixel values raises the mismatch error."""
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        apply_dymu(model, [0.5, 0.5])
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        text = ids.masked_fill(ids == model.config.image_token_id, 5)
        with pytest.raises(ValueError, match="found 0 image placeholder tokens in input_ids but 1 image"):
            model(input_ids=text, pixel_values=pix)


def test_direct_forward_with_too_few_images_and_4d_masks_raise(gen):
    """Three prompts with one image's pixel values is a mismatch in a direct
    forward (only generate() repeats prompts after encoding their images), and
    a 4-D custom mask raises a clear error instead of failing inside."""
    model = tiny_llava()
    apply_dymu(model, [0.5, 0.5])
    ids = prompt(1).repeat(3, 1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="found 48 image placeholder tokens in input_ids but 1 image"):
            model(input_ids=ids, pixel_values=images(gen, 1))
        mask4 = torch.ones(1, 1, ids.shape[1], ids.shape[1])
        with pytest.raises(ValueError, match="takes a 2-D \\[batch, sequence\\] padding attention_mask"):
            model(input_ids=ids[:1], pixel_values=images(gen, 1), attention_mask=mask4)


def test_return_dict_false_gives_tuples(gen):
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1)
    apply_dymu(model, [0.5, 0.5])
    with torch.no_grad():
        as_dict = model.model(input_ids=ids, pixel_values=pix)
        as_tuple = model.model(input_ids=ids, pixel_values=pix, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_dict.last_hidden_state)
        outer = model(input_ids=ids, pixel_values=pix, return_dict=False)
        assert isinstance(outer, tuple) and torch.equal(outer[0], model(input_ids=ids, pixel_values=pix).logits)
