"""DyMU in tiny random Qwen3.5 and Qwen3.5-MoE models: the Qwen3-VL tower
without deepstack in front of a hybrid language model (Gated DeltaNet linear
attention in three of four layers, gated full attention with partial rotary
in the fourth). Nothing merged equals the unpatched model in every generate
mode; merging equals a reference written plainly — per sequence mixer,
expand the unique rows to every position, run the stock module, average per
group — for both layer types; decode steps continue the virtual sequence's
states; merged batches equal each sample alone."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dymu_kernels.core.compact import to_full  # noqa: E402
from dymu_kernels.hf import apply_dymu, dymu_stats, remove_dymu  # noqa: E402
from dymu_kernels.ops.segment import segment_mean  # noqa: E402
from test_qwen3_vl import PROMPTS, SUPPRESS, sample, unpatched  # noqa: E402  (Qwen3-VL's prompt layout and token ids)
from test_qwen_vl import (IMG, VEND, VID, VSTART, assert_nothing_merged_equals_unpatched, batch,  # noqa: E402
                         check_compiled_whole_model)

INF = float("inf")
DEPTH = 4
NO_MERGE = {"vit": [INF] * DEPTH, "merger": [INF] * 2}  # both stages, nothing merged
MERGE = {"vit": [0.3] * DEPTH}
KINDS = ["qwen3_5", "qwen3_5_moe"]
_MODELS = {}


def tiny_qwen3_5(kind: str = "qwen3_5"):
    """A tiny random ``kind`` model: 4 tower blocks, a 4-layer text model
    (``linear_attention`` × 3, then ``full_attention``) with 32-dim heads
    rotating their first 8 dims (``partial_rotary_factor`` 0.25, interleaved
    M-RoPE) and Gated DeltaNet layers of 2 key / 4 value heads."""
    if kind not in _MODELS:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                "partial_rotary_factor": 0.25}
        text = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                    pad_token_id=0, rope_parameters=rope, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_key_head_dim=16, linear_value_head_dim=16)
        vision = dict(depth=DEPTH, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=16)
        ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
        if kind == "qwen3_5":
            config = transformers.Qwen3_5Config(vision_config=vision, text_config=text, **ids)
            cls = transformers.Qwen3_5ForConditionalGeneration
        else:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32)
            config = transformers.Qwen3_5MoeConfig(vision_config=vision, text_config=text, **ids)
            cls = transformers.Qwen3_5MoeForConditionalGeneration
        assert config.text_config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
        torch.manual_seed(0)
        _MODELS[kind] = cls(config).eval()
    return unpatched(_MODELS[kind])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["image", "video", "image and video"])
def test_nothing_merged_equals_unpatched(gen, kind, name):
    """Logits, every hidden state and greedy generate() equal the unpatched
    model's, with both merge stages on and nothing merging."""
    assert_nothing_merged_equals_unpatched(tiny_qwen3_5(kind), batch([sample(gen, PROMPTS[name])]), NO_MERGE,
                                           suppress=SUPPRESS)


@pytest.mark.parametrize("kind", KINDS)
def test_padded_batch_generate_modes_and_second_turn_nothing_merged(gen, kind):
    """A left-padded batch (a video in one sample): greedy, beams, sampling,
    a static cache, prompt lookup (which crops the hybrid cache) and a second
    turn on the cache equal the unpatched model."""
    model = tiny_qwen3_5(kind)
    kwargs = batch([sample(gen, PROMPTS["image"]), sample(gen, PROMPTS["image and video"])])
    modes = [dict(do_sample=False), dict(num_beams=2, num_return_sequences=2, do_sample=False), dict(do_sample=True),
             dict(do_sample=False, cache_implementation="static")]

    def run():
        outs = []
        for mode in modes:
            torch.manual_seed(1)
            outs.append(model.generate(**kwargs, **mode, max_new_tokens=3, suppress_tokens=SUPPRESS))
        one = batch([sample(torch.Generator().manual_seed(7), PROMPTS["image"])])
        outs.append(model.generate(**one, prompt_lookup_num_tokens=2, max_new_tokens=4, do_sample=False))
        first = model.generate(**kwargs, max_new_tokens=2, do_sample=False, suppress_tokens=SUPPRESS,
                               return_dict_in_generate=True)
        turn = torch.tensor([[9, 10, 11]] * 2)
        second = dict(input_ids=torch.cat([first.sequences, turn], 1),  # new text only: the images are cached
                      attention_mask=torch.cat([kwargs["attention_mask"], torch.ones(2, 5, dtype=torch.long)], 1),
                      cache=first.cache)
        outs.append(model.generate(**second, max_new_tokens=3, do_sample=False, suppress_tokens=SUPPRESS))
        return outs

    with torch.no_grad():
        refs = run()
        apply_dymu(model, NO_MERGE, backend="torch")
        for out, ref in zip(run(), refs, strict=True):
            assert torch.equal(out, ref)


def plain_logits(model, kwargs, thresholds, backend="torch"):
    """``(patched logits, plain logits, merge map)`` for ``thresholds``: the
    plain side takes the patched prompt's compact embeddings, merge map and
    full-position RoPE tables, and runs every decoder layer with its sequence
    mixer as ``expand → stock module → average per group`` (the stock Gated
    DeltaNet with the padding mask; the stock gated attention with the real
    partial-rotary tables and a causal padding mask), the rest of the layer
    on the unique rows."""
    lm = model.model.language_model
    got = {}

    def grab(module, args, kw):
        if kw.get("dymu_vtu") is not None and "x" not in got:
            got["x"], got["ctx"] = kw["inputs_embeds"], kw["dymu_vtu"]

    hook = lm.register_forward_pre_hook(grab, with_kwargs=True)
    apply_dymu(model, thresholds, backend=backend)
    try:
        with torch.no_grad():
            patched = model(**kwargs).logits
    finally:
        hook.remove()
    x, ctx = got["x"], got["ctx"]
    m = ctx.merge_map
    N = m.shape[1]
    valid = m >= 0
    # causal over real keys; a padding query sees itself only (its row is dropped by the average)
    mask = (torch.ones(N, N, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]) | \
        torch.eye(N, dtype=torch.bool)[None, None]
    with torch.no_grad():
        for layer in lm.layers:
            full = to_full(layer.input_layernorm(x), m)
            if layer.block_type == "linear_attention":
                y = type(layer.linear_attn).forward(layer.linear_attn, full, cache=None, attention_mask=valid.long())
            else:
                y, _ = type(layer.self_attn).forward(layer.self_attn, full, position_embeddings=(ctx.cos, ctx.sin),
                                                     attention_mask=mask)
            x = x + segment_mean(y, m, x.shape[1])
            mlp = layer.mlp(layer.post_attention_layernorm(x))
            x = x + (mlp[0] if isinstance(mlp, tuple) else mlp)
        plain = model.lm_head(to_full(lm.norm(x), m))
    assert ctx.cos.shape[-1] == 8 and ctx.rotary_dim == 8  # partial rotary: a quarter of the 32-dim heads
    return patched, plain, m


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_merging_equals_expand_stock_average_per_mixer(gen, kind, backend):
    """Merging: every position's logits equal the plain per-mixer reference
    (:func:`plain_logits`) — one prompt per layout and a left-padded batch —
    and the tower really merged."""
    model = tiny_qwen3_5(kind)
    cases = [[sample(gen, PROMPTS[n])] for n in ("image", "two images", "video")]
    cases.append([sample(gen, PROMPTS["image"]), sample(gen, PROMPTS["image and video"])])
    for samples in cases:
        kwargs = batch(samples)
        patched, plain, m = plain_logits(model, kwargs, MERGE, backend)
        assert int(m.max()) + 1 < int((m >= 0).sum(1).max())  # fewer unique rows than positions
        torch.testing.assert_close(patched[m >= 0], plain[m >= 0], atol=2e-5, rtol=2e-5)
    stats = dymu_stats(model)
    patches = stats.num_patches
    assert sum(stats.tokens_kept) < (sum(patches) if isinstance(patches, list) else patches * len(stats.tokens_kept))
    remove_dymu(model)


@pytest.mark.parametrize("kind", KINDS)
def test_merged_decode_continues_the_virtual_sequence(gen, kind):
    """With merging, a decode step on the cache (the Gated DeltaNet's conv and
    recurrent states, the attention's unique rows) gives the logits a single
    forward over prompt + token gives at that token (the token is a
    singleton either way), and prompt lookup (cache crops) generates what
    greedy decoding does."""
    model = tiny_qwen3_5(kind)
    kwargs = batch([sample(gen, PROMPTS["image and video"])])
    apply_dymu(model, MERGE, backend="torch")
    with torch.no_grad():
        out = model(**kwargs, use_cache=True)
        token = torch.tensor([[42, 43]])
        step = model(input_ids=token, attention_mask=torch.ones(1, kwargs["input_ids"].shape[1] + 2, dtype=torch.long),
                     cache=out.cache).logits
        whole = dict(kwargs, input_ids=torch.cat([kwargs["input_ids"], token], 1),
                     attention_mask=torch.cat([kwargs["attention_mask"], torch.ones(1, 2, dtype=torch.long)], 1),
                     mm_token_type_ids=torch.cat([kwargs["mm_token_type_ids"], torch.zeros(1, 2, dtype=torch.long)], 1))
        torch.testing.assert_close(step, model(**whole).logits[:, -2:], atol=2e-5, rtol=2e-5)
        greedy = model.generate(**kwargs, max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS)
        lookup = model.generate(**kwargs, max_new_tokens=5, do_sample=False, suppress_tokens=SUPPRESS,
                                prompt_lookup_num_tokens=2)
        assert torch.equal(lookup, greedy)
    remove_dymu(model)


@pytest.mark.parametrize("kind", KINDS)
def test_merging_batch_equals_each_alone(gen, kind):
    """A merged left-padded batch gives each sample's logits alone, and the
    C++ backend the torch backend's."""
    model = tiny_qwen3_5(kind)
    samples = [sample(gen, PROMPTS["two images"]), sample(gen, PROMPTS["video"])]
    apply_dymu(model, MERGE, backend="torch")
    with torch.no_grad():
        both = model(**batch(samples)).logits
        for i, s in enumerate(samples):
            alone = model(**batch([s])).logits
            torch.testing.assert_close(both[i, both.shape[1] - alone.shape[1]:], alone[0], atol=3e-5, rtol=3e-5)
        apply_dymu(model, MERGE, backend="cpp")
        torch.testing.assert_close(model(**batch(samples)).logits, both, atol=3e-5, rtol=3e-5)
    remove_dymu(model)


def test_training_step_through_the_mixers(gen):
    """A merged training step: the loss backpropagates through the Gated
    DeltaNet seam (gathers, group means) into its input projections."""
    model = tiny_qwen3_5()
    kwargs = batch([sample(gen, PROMPTS["image"])])
    apply_dymu(model, MERGE, backend="torch")
    model.train()
    try:
        loss = model(**kwargs, labels=kwargs["input_ids"]).loss
        loss.backward()
        lin = model.model.language_model.layers[0].linear_attn
        for proj in (lin.in_proj_qkv, lin.in_proj_z, lin.in_proj_b, lin.in_proj_a, lin.out_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
        remove_dymu(model)


def test_a_hybrid_model_without_a_declared_mixer_is_refused():
    """The same hybrid language model under a family that declares no mixer
    for its linear layers, or no partial rotary, is refused by name (never
    run as if attention)."""
    from dymu_kernels.core.lm_features import check_full_attention
    from dymu_kernels.families import families

    text = tiny_qwen3_5().config.text_config
    family = families()["qwen3_5"]
    check_full_attention(text, mixers=[m.layer_type for m in family.mixers], partial_rotary=True)
    with pytest.raises(ValueError, match=r"layer_types \['linear_attention'\]"):
        check_full_attention(text, partial_rotary=True)
    with pytest.raises(ValueError, match="partial_rotary_factor=0.25"):
        check_full_attention(text, mixers=["linear_attention"])


def test_attention_weights_with_partial_rotary_nothing_merged(gen):
    """output_attentions with eager attention: the gated attention layer's
    weights at the full positions (computed through the expanded sequence with
    the partial-rotary tables) equal the unpatched model's."""
    model = tiny_qwen3_5()
    kwargs = batch([sample(gen, PROMPTS["image and video"])])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref = model(**kwargs, output_attentions=True).attentions
            apply_dymu(model, NO_MERGE, backend="torch")
            out = model(**kwargs, output_attentions=True).attentions
        assert len(ref) == len(out) == 1  # the one full-attention layer (Gated DeltaNet layers return none)
        torch.testing.assert_close(out[0], ref[0], atol=2e-6, rtol=2e-5)
    finally:
        remove_dymu(model)
        model.set_attn_implementation("sdpa")


def test_torch_compile_of_the_whole_model(gen):
    """The compiled forward with merging (the Gated DeltaNet seam and the
    partial-rotary attention inside the graph) equals eager, breaking only at
    data-dependent sizes and the cache checks kept out of the graph, and so
    does fullgraph compiled generate() (check_compiled_whole_model; dynamo's
    eager backend, as test_qwen3_vl)."""
    model = tiny_qwen3_5()
    apply_dymu(model, MERGE, backend="cpp")
    try:
        check_compiled_whole_model(model, batch([sample(gen, PROMPTS["image"])]), SUPPRESS, backend="eager")
    finally:
        remove_dymu(model)


@pytest.mark.parametrize("kind", KINDS)
def test_a_cache_filled_without_dymu_is_refused(gen, kind):
    """A hybrid cache the unpatched model filled (its linear layers count
    their positions in a tensor) cannot continue under DyMU: refused by name
    instead of mixing rows of two layouts."""
    model = tiny_qwen3_5(kind)
    kwargs = batch([sample(gen, PROMPTS["image"])])
    with torch.no_grad():
        cache = model(**kwargs, use_cache=True).cache
        apply_dymu(model, MERGE, backend="torch")
        try:
            with pytest.raises(ValueError, match="this KV cache was filled without DyMU"):
                model(**kwargs, cache=cache)
        finally:
            remove_dymu(model)
