"""Paths a patched model must get right beyond the happy path: padding in a
continued batch, attention features VTU does not compute, threads sharing one
model, the user's attention implementation, attention weights, determinism."""

import threading

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, remove_dymu  # noqa: E402
from dymu_kernels.hf import attention as vtu_hf  # noqa: E402
from test_llava_integration import IMG, NO_MERGE, images, left_padded, prompt, tiny_llava  # noqa: E402


def _pad(rows, side):
    """New tokens of different lengths as one batch padded with 0 on ``side``:
    ``(ids [B, T], mask [B, T])``."""
    T = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def _continue(model, ids, mask, pix, turns, positions=False):
    """A prompt, then ``turns`` calls on the filled cache, each with a padded
    batch of new tokens (``(ids, mask)``); logits of every call at real tokens.
    ``positions``: pass position ids that skip padding (as generate() does);
    otherwise the model numbers every position, padding included."""
    def pos(m, T):
        return (m.cumsum(-1) - 1).clamp_min(0)[:, -T:] if positions else None

    out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, use_cache=True, position_ids=pos(mask, ids.shape[1]))
    cache, logits = out.past_key_values, [out.logits[mask.bool()]]
    for new_ids, new_mask in turns:
        mask = torch.cat([mask, new_mask], 1)
        out = model(input_ids=new_ids, attention_mask=mask, cache=cache, use_cache=True,
                    position_ids=pos(mask, new_ids.shape[1]))
        cache = out.past_key_values
        logits.append(out.logits[new_mask.bool()])
    return logits


@pytest.mark.parametrize("side, positions", [("left", False), ("right", False), ("left", True)])
def test_padded_continuation_equals_unpatched(gen, side, positions):
    """A left-padded prompt batch, then a next turn whose new text is padded
    (different lengths, T > 1), then a padded single-token step: with nothing
    merged every real token's logits equal the unpatched model's, on every
    backend the CPU runs."""
    base = tiny_llava()
    ids, mask = left_padded(prompt(1, pre=2, post=2), prompt(1, pre=5, post=3, start=10))
    pix = images(gen, 2)
    # Turn 2 gives both samples real tokens after turn 1's padding (right padding leaves it in the middle).
    turns = [_pad([[7, 8, 9], [11]], side), _pad([[12], [13, 14]], side), _pad([[15], []], side)]
    with torch.no_grad():
        expected = _continue(base, ids, mask, pix, turns, positions)
        for backend in ("torch", "cpp"):
            patched = apply_dymu(tiny_llava(), NO_MERGE, backend=backend)
            got = _continue(patched, ids, mask, pix, turns, positions)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, atol=3e-5, rtol=3e-5)


def test_onevision_padded_continuation_equals_unpatched(gen):
    """LLaVA-OneVision (Qwen2): a left-padded batch of images of different
    sizes, then a padded next turn and a padded step, equal to the unpatched model."""
    from test_anyres_maps import tiny_onevision
    from test_onevision import batch_of_two

    base = tiny_onevision()
    batch, _, _ = batch_of_two(base, gen)
    ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
    turns = [_pad([[7, 8], [9, 10, 11]], "left"), _pad([[], [12]], "right")]

    def run(model):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **batch)
        cache, m, logits = out.past_key_values, mask, [out.logits[mask.bool()]]
        for new_ids, new_mask in turns:
            m = torch.cat([m, new_mask], 1)
            out = model(input_ids=new_ids, attention_mask=m, cache=cache, use_cache=True)
            cache = out.past_key_values
            logits.append(out.logits[new_mask.bool()])
        return logits

    with torch.no_grad():
        expected = run(base)
        got = run(apply_dymu(tiny_onevision(), NO_MERGE, backend="torch"))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=3e-5, rtol=3e-5)


def test_padded_continuation_with_merging_equals_each_sample_alone(gen):
    """With merging, a padded next turn of a batch equals each conversation run alone."""
    pix = images(gen, 2, flat=(0,))
    prompts = [prompt(1, pre=2, post=2), prompt(1, pre=5, post=3, start=10)]
    new = [[7, 8, 9], [11]]
    model = apply_dymu(tiny_llava(), [0.3, 0.3], backend="torch")
    ids, mask = left_padded(*prompts)
    with torch.no_grad():
        batch = _continue(model, ids, mask, pix, [_pad(new, "left")], positions=True)[1]
        alone = [_continue(model, p, torch.ones_like(p), pix[i:i + 1], [_pad([new[i]], "left")], positions=True)[1]
                 for i, p in enumerate(prompts)]
    torch.testing.assert_close(batch, torch.cat(alone), atol=1e-4, rtol=1e-4)


def test_continuation_mask_of_the_wrong_length_raises(gen):
    model = apply_dymu(tiny_llava(), NO_MERGE, backend="torch")
    ids, pix = prompt(1), images(gen, 1)
    with torch.no_grad():
        cache = model(input_ids=ids, pixel_values=pix, use_cache=True).past_key_values
        with pytest.raises(ValueError, match="attention_mask has shape"):
            model(input_ids=torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                  cache=cache)


def _llava_over(text_config):
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=28, patch_size=7)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text_config, image_token_id=IMG,
                                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    return transformers.LlavaForConditionalGeneration(config).eval()


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=100)


@pytest.mark.parametrize("text_config, feature", [
    (lambda: transformers.MistralConfig(**SMALL, sliding_window=8), "sliding_window=8"),
    (lambda: transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=0),
     "sliding_attention"),
    (lambda: transformers.Gemma2Config(**SMALL, head_dim=16), "sliding_attention"),
    (lambda: transformers.LlamaConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
])
def test_language_model_features_vtu_does_not_compute_are_refused(text_config, feature):
    """A sliding window in any config spelling (Mistral's sliding_window without
    layer_types, Qwen2's use_sliding_window, Gemma2's layer types, which also
    soft-cap) and partial rotary are refused by name at apply_dymu, never
    silently computed as full attention."""
    model = _llava_over(text_config())
    with pytest.raises(ValueError, match=feature):
        apply_dymu(model, NO_MERGE)
    assert getattr(model, "_dymu", None) is None


def test_softcapping_is_refused_by_name():
    config = transformers.LlamaConfig(**SMALL)
    config.attn_logit_softcapping = 50.0
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        apply_dymu(_llava_over(config), NO_MERGE)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(sliding_window=4), ValueError, "a sliding window"),
    (dict(softcap=30.0), ValueError, "logit soft-capping"),
    (dict(s_aux=torch.zeros(4)), ValueError, "attention sinks"),
    (dict(dropout=0.1), ValueError, "attention dropout"),
    (dict(some_new_feature=3), TypeError, "some_new_feature=3"),
])
def test_unknown_attention_arguments_raise_at_call_time(gen, kwargs, error, match):
    """An attention argument VTU does not implement raises instead of being ignored."""
    ctx = vtu_hf.VTUContext(torch.arange(5, dtype=torch.int32)[None], torch.ones(1, 5, 16), torch.zeros(1, 5, 16),
                               decode=False, backend="torch")
    q, k = randn(1, 4, 5, 16, gen=gen), randn(1, 2, 5, 16, gen=gen)
    module = torch.nn.Module()
    with pytest.raises(error, match=match):
        vtu_hf.dymu_vtu_attention(module, q, k, k, None, dymu_vtu=ctx, **kwargs)
    # Features that are off pass (Qwen2 hands sliding_window=None to full-attention layers).
    out, probs = vtu_hf.dymu_vtu_attention(module, q, k, k, None, dymu_vtu=ctx, sliding_window=None,
                                              position_ids=None, dropout=0.0)
    assert out.shape == (1, 5, 4, 16) and probs is None


def test_threads_sharing_one_model_each_get_their_own_results(gen):
    """One thread runs DyMU forwards while another calls the language model
    directly: the plain calls keep real RoPE and the user's attention, the
    DyMU forwards keep VTU — no state leaks between them through the model."""
    model = apply_dymu(tiny_llava(), [0.3, 0.3], backend="torch")
    lm = model.model.language_model
    ids, pix = prompt(2), images(gen, 2, flat=(0,))
    x = randn(1, 40, 128, gen=gen)
    with torch.no_grad():
        merged = model(input_ids=ids, pixel_values=pix).logits
        plain = lm(inputs_embeds=x).last_hidden_state
    errors = []

    def loop(fn, expected):
        try:
            with torch.no_grad():
                for _ in range(25):
                    torch.testing.assert_close(fn(), expected, atol=1e-5, rtol=1e-5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=loop, args=(lambda: model(input_ids=ids, pixel_values=pix).logits, merged)),
               threading.Thread(target=loop, args=(lambda: lm(inputs_embeds=x).last_hidden_state, plain))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_the_users_attention_implementation_stays_theirs(gen):
    """transformers reports the user's implementation on a patched model;
    set_attn_implementation works and keeps DyMU; plain calls of the language
    model use the user's choice (eager returns weights), DyMU forwards run VTU."""
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    x = randn(1, 12, 128, gen=gen)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        plain_eager = model.model.language_model(inputs_embeds=x, output_attentions=True)
        model.set_attn_implementation("sdpa")
        apply_dymu(model, [0.3, 0.3], backend="torch")
        assert model.config._attn_implementation == "sdpa"
        assert model.model.language_model.config._attn_implementation == "sdpa"
        merged = model(input_ids=ids, pixel_values=pix).logits
        model.set_attn_implementation("eager")
        assert model._dymu is not None and model.model.language_model.config._attn_implementation == "eager"
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pix).logits, merged, atol=1e-5, rtol=1e-5)
        got = model.model.language_model(inputs_embeds=x, output_attentions=True)
        torch.testing.assert_close(got.last_hidden_state, plain_eager.last_hidden_state)
        assert len(got.attentions) == 2
        for a, b in zip(got.attentions, plain_eager.attentions):
            torch.testing.assert_close(a, b)
        remove_dymu(model)
        assert model.model.language_model.config._attn_implementation == "eager"
        assert model.model.language_model.layers[0].self_attn.config is model.model.language_model.config


def test_output_attentions_equal_unpatched_eager(gen):
    """output_attentions=True with eager attention: the probabilities at the
    full positions, prompt and decode step, equal the unpatched model's with
    nothing merged; with merging they are still distributions over the full
    positions (rows sum to 1, the future is 0)."""
    base = tiny_llava()
    base.set_attn_implementation("eager")
    patched = apply_dymu(tiny_llava(), NO_MERGE, backend="torch")
    patched.set_attn_implementation("eager")
    ids, mask = left_padded(prompt(1, pre=2, post=2), prompt(1, pre=5, post=3, start=10))
    pix = images(gen, 2)
    real = mask.bool()
    with torch.no_grad():
        for model in (base, patched):
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pix, output_attentions=True, use_cache=True)
            step = model(input_ids=torch.tensor([[7], [8]]), attention_mask=torch.cat([mask, mask[:, :1] * 0 + 1], 1),
                         cache=out.past_key_values, output_attentions=True)
            model.result = (out.attentions, step.attentions)
        (a_pre, a_step), (b_pre, b_step) = base.result, patched.result
        assert len(b_pre) == len(a_pre) == 2
        for x, y in zip(a_pre, b_pre):
            assert y.shape == x.shape == (2, 4, ids.shape[1], ids.shape[1])
            for i in range(2):  # real queries over real keys (padding rows mean nothing in either)
                torch.testing.assert_close(y[i][:, real[i]][..., real[i]], x[i][:, real[i]][..., real[i]],
                                           atol=2e-5, rtol=2e-5)
        for x, y in zip(a_step, b_step):
            assert y.shape == x.shape == (2, 4, 1, ids.shape[1] + 1)
            keep = torch.cat([real, torch.ones(2, 1, dtype=torch.bool)], 1)
            for i in range(2):
                torch.testing.assert_close(y[i][..., keep[i]], x[i][..., keep[i]], atol=2e-5, rtol=2e-5)
        merged = apply_dymu(patched, [0.3, 0.3], backend="torch")
        attn = merged(input_ids=ids, attention_mask=mask, pixel_values=images(gen, 2, flat=(0, 1)),
                      output_attentions=True).attentions[0]
    torch.testing.assert_close(attn[1].sum(-1)[:, real[1]], torch.ones(4, int(real[1].sum())))
    assert float(attn.triu(1).abs().max()) == 0.0


def test_integration_asks_for_deterministic_attention_by_default(gen, monkeypatch):
    """VTU attention is called with deterministic=True unless the user opts out
    (on CUDA the Triton re-merge would otherwise use fp32 atomics)."""
    seen = []
    real = vtu_hf.vtu_attention
    monkeypatch.setattr(vtu_hf, "vtu_attention", lambda *a, **k: seen.append(k["deterministic"]) or real(*a, **k))
    ids, pix = prompt(1), images(gen, 1)
    with torch.no_grad():
        model = apply_dymu(tiny_llava(), [0.3, 0.3], backend="torch")
        model(input_ids=ids, pixel_values=pix)
        apply_dymu(model, [0.3, 0.3], backend="torch", deterministic=False)
        model(input_ids=ids, pixel_values=pix)
    assert seen == [True, True, False, False]  # one call per layer, two layers


def test_static_cache_compiled_generation_compiles_like_the_unpatched_model(gen):
    """generate() with a static cache and a fullgraph-compiled decode step:
    new prompts (other lengths, other merge counts) reuse the compiled step —
    the patched model compiles exactly as often as the unpatched one (the VTU
    state's growing length is marked dynamic, the cache's row count is a
    tensor, positions are no views) — and the tokens equal eager generation."""
    from torch._dynamo.utils import counters

    config = transformers.CompileConfig(fullgraph=True, mode="default")
    config._compile_all_devices = True  # transformers compiles decode steps on GPUs only unless told
    prompts = [(prompt(1, pre=pre, post=post), images(gen, 1, flat=(0,) if i % 2 else ()))
               for i, (pre, post) in enumerate([(3, 4), (5, 2), (2, 7), (6, 6), (1, 3)])]
    graphs = {}
    with torch.no_grad():
        for name in ("stock", "dymu"):
            model = tiny_llava()
            if name == "dymu":
                apply_dymu(model, [0.5, 0.5])
            kwargs = dict(cache_implementation="static", max_new_tokens=5, do_sample=False, pad_token_id=0,
                          suppress_tokens=[IMG])
            torch._dynamo.reset()
            counters.clear()
            compiled = [model.generate(input_ids=i, pixel_values=p, compile_config=config, **kwargs) for i, p in prompts]
            graphs[name] = counters["stats"]["unique_graphs"]
            eager = [model.generate(input_ids=i, pixel_values=p, disable_compile=True, **kwargs) for i, p in prompts]
            assert all(torch.equal(a, b) for a, b in zip(compiled, eager)), name
    assert graphs["dymu"] == graphs["stock"] <= 2, graphs


def test_output_attentions_over_a_static_cache(gen):
    """generate() on a static cache (what a compiled generate() uses) with
    eager attention and output_attentions: every step's weights span the
    cache's whole buffer, as unpatched (they came back [.., N, N] instead of
    [.., N, max_cache_len]), and equal the unpatched weights with nothing merged."""
    base = tiny_llava()
    base.set_attn_implementation("eager")
    patched = apply_dymu(tiny_llava(), NO_MERGE, backend="torch")
    patched.set_attn_implementation("eager")
    ids, pix = prompt(1), images(gen, 1)
    runs = []
    with torch.no_grad():
        for model in (base, patched):
            runs.append(model.generate(input_ids=ids, pixel_values=pix, max_new_tokens=3, do_sample=False,
                                       cache_implementation="static", output_attentions=True,
                                       return_dict_in_generate=True, suppress_tokens=[IMG]))
    a, b = runs
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.attentions) == len(b.attentions) == 3
    for step_a, step_b in zip(a.attentions, b.attentions):
        for x, y in zip(step_a, step_b):
            assert y.shape == x.shape and x.shape[-1] == ids.shape[1] + 2  # the whole static buffer
            torch.testing.assert_close(y, x, atol=2e-5, rtol=2e-5)
