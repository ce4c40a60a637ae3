"""DyMU in a tiny random LLaVA-OneVision (SigLIP + AnyRes + Qwen2): equal to
the unpatched model when nothing merges, consistent across batches when it does."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, dymu_stats, remove_dymu  # noqa: E402
from test_anyres_maps import CROP, tiny_onevision  # noqa: E402

IMG, VID = 98, 97
NO_MERGE = [float("inf")] * 2


def image_inputs(model, gen, sizes):
    """pixel_values [n, max_crops, 3, 42, 42], image_sizes, and each image's
    placeholder count (the unpatched model's packed length)."""
    num = transformers.models.llava_onevision.modeling_llava_onevision
    crops = [num.image_size_to_num_patches(s, model.config.image_grid_pinpoints, CROP) for s in sizes]
    pix = randn(len(sizes), max(crops), 3, CROP, CROP, gen=gen)
    image_sizes = torch.tensor(sizes)
    with torch.no_grad():
        packed = model.model.get_image_features(pixel_values=pix, image_sizes=image_sizes).pooler_output
    return pix, image_sizes, [p.shape[0] for p in packed]


def prompt(counts, pre=(1, 2), post=(3, 4), video=0):
    ids = list(pre)
    for c in counts:
        ids += [IMG] * c + [5]
    ids += [VID] * video + list(post)
    return torch.tensor([ids])


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_nothing_merged_equals_unpatched(gen, aspect):
    """Tall and wide AnyRes images (and the downscale branch with anyres_max_1):
    logits and greedy generate() equal the unpatched model's."""
    model = tiny_onevision(aspect)
    for sizes in ([(50, 120)], [(130, 60)]):
        pix, image_sizes, counts = image_inputs(model, gen, sizes)
        ids = prompt(counts)
        kwargs = dict(input_ids=ids, pixel_values=pix, image_sizes=image_sizes)
        gen_kwargs = dict(kwargs, max_new_tokens=4, do_sample=False, suppress_tokens=[IMG, VID], pad_token_id=0)
        with torch.no_grad():
            logits = model(**kwargs).logits
            seq = model.generate(**gen_kwargs)
            apply_dymu(model, NO_MERGE, backend="torch")
            torch.testing.assert_close(model(**kwargs).logits, logits, atol=2e-5, rtol=2e-5)
            assert torch.equal(model.generate(**gen_kwargs), seq)
            remove_dymu(model)
            assert torch.equal(model(**kwargs).logits, logits)


def test_video_and_image_in_one_prompt_equal_unpatched(gen):
    model = tiny_onevision()
    pix, image_sizes, counts = image_inputs(model, gen, [(90, 90)])
    video = randn(1, 3, 3, CROP, CROP, gen=gen)  # 3 frames
    frames_tokens = 3 * 9 + 1  # 6 x 6 patches pooled to 3 x 3 per frame, one newline
    ids = prompt(counts, video=frames_tokens)
    kwargs = dict(input_ids=ids, pixel_values=pix, image_sizes=image_sizes, pixel_values_videos=video)
    with torch.no_grad():
        logits = model(**kwargs).logits
        apply_dymu(model, NO_MERGE, backend="torch")
        torch.testing.assert_close(model(**kwargs).logits, logits, atol=2e-5, rtol=2e-5)
        # With merging: image and video tokens both shrink; the C++ backend equals the reference.
        apply_dymu(model, [0.2, 0.2], backend="torch")
        merged = model(**kwargs, use_cache=True)
        rows = merged.past_key_values.layers[0].get_seq_length()
        apply_dymu(model, [0.2, 0.2], backend="cpp")
        torch.testing.assert_close(model(**kwargs).logits, merged.logits, atol=1e-4, rtol=1e-4)
    assert rows < ids.shape[1] and max(dymu_stats(model, "video").tokens_kept) < 36


def test_merging_batch_equals_single_and_cpp_equals_torch(gen):
    """With merging: a left-padded batch of two prompts (images of different
    sizes, so different placeholder counts) gives each its single-prompt
    tokens; the C++ backend gives the reference backend's."""
    model = tiny_onevision()
    batch, single_a, single_b = batch_of_two(model, gen, flat_b=True)
    kw = dict(max_new_tokens=4, do_sample=False, suppress_tokens=[IMG, VID], pad_token_id=0)
    with torch.no_grad():
        apply_dymu(model, [0.3, 0.3], backend="torch")
        out = model.generate(**batch, **kw)[:, -4:]
        kept = dymu_stats(model).tokens_kept  # per crop: image a's 1 + 3 crops, then image b's
        alone_a = model.generate(**single_a, **kw)[:, -4:]
        alone_b = model.generate(**single_b, **kw)[:, -4:]
        remove_dymu(model)
        apply_dymu(model, [0.3, 0.3], backend="cpp")
        cpp = model.generate(**single_a, **kw)[:, -4:]
    assert torch.equal(out[0], alone_a[0]) and torch.equal(out[1], alone_b[0]) and torch.equal(cpp, alone_a)
    assert min(kept) < 36  # crops merged


def test_onevision_needs_thresholds_it_has(gen):
    model = tiny_onevision()
    with pytest.raises(ValueError, match="no published thresholds for LlavaOnevisionForConditionalGeneration"):
        apply_dymu(model)
    with pytest.raises(TypeError, match="apply_dymu supports transformers LlavaForConditionalGeneration .*"
                                        "LlavaOnevisionForConditionalGeneration"):
        apply_dymu(torch.nn.Linear(2, 2))


def test_multi_image_prompt_and_merged_video(gen):
    """Two images in one prompt (one crop each: 36 + 1 placeholders), equal to
    the unpatched model with nothing merged; a video merges and generates."""
    model = tiny_onevision()
    pix = randn(2, 1, 3, CROP, CROP, gen=gen)
    sizes = torch.tensor([[60, 90], [90, 60]])
    ids = prompt([37, 37])
    kwargs = dict(input_ids=ids, pixel_values=pix, image_sizes=sizes, batch_num_images=torch.tensor([2]))
    video = randn(1, 4, 3, CROP, CROP, gen=gen)
    video[0, 1:] = video[0, :1]  # a static scene: frames repeat
    vid_ids = prompt([], video=4 * 9 + 1)
    with torch.no_grad():
        logits = model(**kwargs).logits
        apply_dymu(model, NO_MERGE, backend="torch")
        torch.testing.assert_close(model(**kwargs).logits, logits, atol=2e-5, rtol=2e-5)
        remove_dymu(model)
        apply_dymu(model, [0.2, 0.2], backend="torch")
        out = model.generate(input_ids=vid_ids, pixel_values_videos=video, max_new_tokens=3, do_sample=False,
                             suppress_tokens=[IMG, VID], pad_token_id=0, return_dict_in_generate=True)
        kept = dymu_stats(model, "video").tokens_kept
    assert out.sequences.shape[1] == vid_ids.shape[1] + 3 and dymu_stats(model, "image") is None
    assert len(kept) == 4 and max(kept) < 36  # every frame merged


def batch_of_two(model, gen, flat_b=False):
    """Two left-padded prompts with images of different sizes (different crop
    and placeholder counts) as one generate() batch, and each prompt alone.
    ``flat_b``: prompt b's image is flat (its crops merge a lot)."""
    pix_a, sizes_a, counts_a = image_inputs(model, gen, [(50, 120)])
    pix_b, sizes_b, counts_b = image_inputs(model, gen, [(90, 90)])
    if flat_b:
        pix_b[0, :] = 0.25
    a, b = prompt(counts_a), prompt(counts_b, pre=(6,))
    n = max(a.shape[1], b.shape[1])
    ids = torch.cat([torch.cat([torch.zeros(1, n - t.shape[1], dtype=torch.long), t], 1) for t in (a, b)])
    mask = torch.stack([torch.arange(n) >= n - t.shape[1] for t in (a, b)]).long()
    crops = max(pix_a.shape[1], pix_b.shape[1])
    pix = torch.cat([torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, crops - p.shape[1])) for p in (pix_a, pix_b)])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=pix, image_sizes=torch.cat([sizes_a, sizes_b]))
    return (batch, dict(input_ids=a, pixel_values=pix_a, image_sizes=sizes_a),
            dict(input_ids=b, pixel_values=pix_b, image_sizes=sizes_b))


@pytest.mark.parametrize("mode", [dict(num_beams=3, num_return_sequences=2, do_sample=False), dict(do_sample=True),
                                  dict(cache_implementation="static", do_sample=False),
                                  dict(do_sample=False, output_hidden_states=True)])
def test_generate_modes_equal_unpatched(gen, mode):
    """Beam search over list-valued items of different lengths, sampling, the
    static cache (Qwen2's per-layer-type masks) and hidden states, on a
    left-padded batch; assisted and prompt-lookup decoding on one prompt."""
    base, patched = tiny_onevision(), tiny_onevision()
    apply_dymu(patched, NO_MERGE, backend="torch")
    batch, single, _ = batch_of_two(base, gen)
    kw = dict(max_new_tokens=4, suppress_tokens=[IMG, VID], pad_token_id=0, return_dict_in_generate=True)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = base.generate(**batch, **kw, **mode).sequences
        torch.manual_seed(3)
        assert torch.equal(patched.generate(**batch, **kw, **mode).sequences, expected)
        if mode.get("num_beams"):
            for extra in (dict(prompt_lookup_num_tokens=2), dict(assistant_model="self")):
                a = {k: (base if v == "self" else v) for k, v in extra.items()}
                b = {k: (patched if v == "self" else v) for k, v in extra.items()}
                assert torch.equal(patched.generate(**single, **kw, do_sample=False, **b).sequences,
                                   base.generate(**single, **kw, do_sample=False, **a).sequences)


def test_sliding_window_language_models_are_refused():
    model = tiny_onevision()
    model.model.language_model.config.layer_types = ["sliding_attention"]
    with pytest.raises(ValueError, match="layer_types \\['sliding_attention'\\]; VTU attention computes full causal"):
        apply_dymu(model, NO_MERGE)
    assert getattr(model, "_dymu", None) is None and model.model.language_model.config._attn_implementation != "dymu_vtu"


def test_bench_onevision_quick_rows(tmp_path):
    """benchmarks/bench_onevision.py --quick: rows for both prompts and configs;
    with merging the image runs fewer language-model tokens than positions."""
    import importlib.util
    import json
    import os

    pytest.importorskip("skimage")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("bench_onevision", os.path.join(root, "benchmarks", "bench_onevision.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--results-dir", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "onevision_quick.jsonl")]
    assert [(r["config"], r["prompt"]) for r in rows] == [("stock", "image"), ("stock", "video"),
                                                          ("r=100", "image"), ("r=100", "video")]
    stock, merged = rows[0], rows[2]
    assert stock["lm_tokens"] == stock["positions"] == merged["positions"] > merged["lm_tokens"]
    assert merged["kv_mib"] < stock["kv_mib"] and merged["gflops"] < stock["gflops"]
    assert all(r["n_samples"] == 3 and r["prefill_min"] <= r["prefill_s"] <= r["prefill_max"] for r in rows)
    assert rows[1]["positions"] == 20 + 8 * 196 + 1 and "commit" in rows[0]
