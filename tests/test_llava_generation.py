"""A patched LLaVA under transformers' own generation and modeling utilities.

With thresholds that merge nothing the patched model must equal the unpatched
one in every mode; with merging every mode runs, and a batch equals its
prompts run alone.
"""

import pytest
import torch

from conftest import needs_extension, randn
from test_llava_integration import IMG, NO_MERGE, P, images, left_padded, prompt, tiny_llava

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, dymu_stats  # noqa: E402

BASE = dict(max_new_tokens=4, suppress_tokens=[IMG], pad_token_id=0, return_dict_in_generate=True)

# generate() modes: keyword arguments, and whether they draw random numbers.
MODES = {
    "greedy": dict(do_sample=False, output_scores=True),
    "sample": dict(do_sample=True, top_k=5, output_scores=True),
    "beam": dict(num_beams=3, do_sample=False, output_scores=True, output_hidden_states=True),
    "beam_sample": dict(num_beams=2, do_sample=True, num_return_sequences=2, output_scores=True),
    "static_cache": dict(cache_implementation="static", do_sample=False, output_scores=True),
    "hidden_states": dict(do_sample=False, output_hidden_states=True),
}


def run(model, mode, **inputs):
    torch.manual_seed(7)  # sampling modes draw the same numbers for both models
    kwargs = dict(MODES[mode])
    return model.generate(**inputs, **BASE, **kwargs)


def assert_same_generation(a, b, mask=None):
    """Same tokens; same scores and hidden states (the prompt's at its real
    positions only: padding positions hold nothing meaningful in either)."""
    assert torch.equal(a.sequences, b.sequences)
    for name in ("scores", "hidden_states"):
        x, y = getattr(a, name, None), getattr(b, name, None)
        assert (x is None) == (y is None), name
        if x is None:
            continue
        flat = lambda t: [h for step in t for h in (step if isinstance(step, tuple) else (step,))]  # noqa: E731
        fx, fy = flat(x), flat(y)
        assert len(fx) == len(fy), name
        for u, v in zip(fx, fy):
            if mask is not None and u.dim() == 3 and u.shape[1] == mask.shape[1]:
                real = mask.bool().repeat_interleave(u.shape[0] // mask.shape[0], 0)
                u, v = u[real], v[real]
            torch.testing.assert_close(v, u, atol=3e-5, rtol=3e-5)


@pytest.fixture(scope="module")
def twins():
    """The unpatched model and an identical copy patched to merge nothing."""
    base, patched = tiny_llava(), tiny_llava()
    apply_dymu(patched, NO_MERGE)
    return base, patched


@pytest.mark.parametrize("mode", sorted(MODES))
def test_mode_equals_unpatched_when_nothing_merges(twins, gen, mode):
    base, patched = twins
    # Left padding, one prompt with two images.
    ids, mask = left_padded(prompt(1, pre=2, post=2), prompt(2, pre=5, post=3, start=10))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(gen, 3))
    with torch.no_grad():
        assert_same_generation(run(base, mode, **inputs), run(patched, mode, **inputs), mask)


def test_assisted_decoding_and_right_padding_equal_unpatched(twins, gen):
    """Assisted decoding (the model as its own assistant) and prompt-lookup
    decoding (batch size 1, as transformers requires); a right-padded
    forward; the language model called directly on a patched model (its
    attention falls back to SDPA with transformers' own mask)."""
    base, patched = twins
    ids, pix = prompt(1), images(gen, 1)
    kwargs = dict(BASE, do_sample=False, output_scores=True)
    with torch.no_grad():
        assert_same_generation(base.generate(input_ids=ids, pixel_values=pix, assistant_model=base, **kwargs),
                               patched.generate(input_ids=ids, pixel_values=pix, assistant_model=patched, **kwargs))
        assert_same_generation(base.generate(input_ids=ids, pixel_values=pix, prompt_lookup_num_tokens=2, **kwargs),
                               patched.generate(input_ids=ids, pixel_values=pix, prompt_lookup_num_tokens=2, **kwargs))
        text, mask = left_padded(prompt(0, pre=5), prompt(0, pre=3, post=2, start=20))
        expected = base.model.language_model(input_ids=text, attention_mask=mask).last_hidden_state
        got = patched.model.language_model(input_ids=text, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], atol=1e-5, rtol=1e-5)
        ids2 = torch.cat([prompt(1, post=6), torch.cat([prompt(1, post=2), torch.zeros(1, 4, dtype=torch.long)], 1)])
        mask = (torch.arange(ids2.shape[1]) < torch.tensor([[ids2.shape[1]], [ids2.shape[1] - 4]])).long()
        pix2 = images(gen, 2)
        expected = base(input_ids=ids2, attention_mask=mask, pixel_values=pix2).logits
        got = patched(input_ids=ids2, attention_mask=mask, pixel_values=pix2).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=2e-5)


def continue_generation(model, inputs, new_text=None):
    """generate(), then generate() again from the returned cache (optionally
    after appending a new turn of text): what a chat loop does."""
    first = model.generate(**inputs, **BASE, do_sample=False)
    ids = first.sequences
    if new_text is not None:
        ids = torch.cat([ids, torch.tensor([new_text])], 1)
    return model.generate(input_ids=ids, past_key_values=first.past_key_values, **BASE, do_sample=False)


@pytest.mark.parametrize("new_text", [None, [5, 6, 7]])
def test_resuming_from_a_returned_cache_equals_unpatched(twins, gen, new_text):
    base, patched = twins
    inputs = dict(input_ids=prompt(1), pixel_values=images(gen, 1))
    with torch.no_grad():
        assert_same_generation(continue_generation(base, inputs, new_text), continue_generation(patched, inputs, new_text))


def test_forward_outputs_equal_unpatched(twins, gen):
    """Hidden states (at the full positions), image features in transformers'
    own output type, return_dict=False; attentions as the user's attention
    implementation gives them."""
    base, patched = twins
    ids, pix = prompt(2), images(gen, 2)
    with torch.no_grad():
        a = base(input_ids=ids, pixel_values=pix, output_hidden_states=True)
        b = patched(input_ids=ids, pixel_values=pix, output_hidden_states=True)
        assert len(a.hidden_states) == len(b.hidden_states) == 3
        for x, y in zip(a.hidden_states, b.hidden_states):
            torch.testing.assert_close(y, x, atol=2e-5, rtol=2e-5)
        fa, fb = base.model.get_image_features(pix), patched.model.get_image_features(pix)
        assert isinstance(fb, transformers.modeling_outputs.BaseModelOutputWithPooling)
        assert len(fb.pooler_output) == 2 and fb.pooler_output[0].shape == (P, 128)
        for x, y in zip(fa.pooler_output, fb.pooler_output):
            torch.testing.assert_close(y, x, atol=2e-5, rtol=2e-5)
        for x, y in zip(a.image_outputs.pooler_output, b.image_outputs.pooler_output):
            torch.testing.assert_close(y, x, atol=2e-5, rtol=2e-5)
        # sdpa (the user's implementation here) returns no weights, patched or not (eager: test_llava_correctness).
        out, plain = (m(input_ids=ids, pixel_values=pix, output_attentions=True) for m in (patched, base))
        assert out.attentions == plain.attentions == ()
        as_tuple = patched(input_ids=ids, pixel_values=pix, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], b.logits)


def test_inputs_embeds_finds_the_placeholders(gen):
    """inputs_embeds instead of input_ids: the image placeholders are found as
    transformers finds them (rows equal to the image token's embedding)."""
    model = tiny_llava()
    apply_dymu(model, [0.5, 0.5])
    ids, pix = prompt(2), images(gen, 2, flat=(0,))
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pix).logits
        embeds = model.get_input_embeddings()(ids)
        got = model(inputs_embeds=embeds, pixel_values=pix).logits
        assert dymu_stats(model).tokens_kept[0] < P
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="found 16 image placeholder tokens in input_ids but 2 image"):
            model(inputs_embeds=embeds[:, : 3 + P + 1], pixel_values=pix)


def test_merging_batch_equals_each_prompt_alone(gen):
    """With merging (one flat image that merges a lot), greedy, beam search with
    several return sequences and the static cache give each prompt of a
    left-padded batch what it gets alone."""
    model = tiny_llava()
    apply_dymu(model, [0.5, 0.5])
    a, b = prompt(1, pre=2, post=2), prompt(2, pre=5, post=3, start=10)
    pix = images(gen, 3, flat=(1,))
    ids, mask = left_padded(a, b)
    extra = {"greedy": {}, "beam": dict(num_return_sequences=2), "static_cache": {}}
    with torch.no_grad():
        for mode, more in extra.items():
            batch = run(model, mode, input_ids=ids, attention_mask=mask, pixel_values=pix, **more).sequences
            kept = dymu_stats(model).tokens_kept
            alone_a = run(model, mode, input_ids=a, pixel_values=pix[:1], **more).sequences
            alone_b = run(model, mode, input_ids=b, pixel_values=pix[1:], **more).sequences
            k = batch.shape[0] // 2
            assert torch.equal(batch[:k, -4:], alone_a[:, -4:]) and torch.equal(batch[k:, -4:], alone_b[:, -4:]), mode
            assert kept[1] < min(kept[0], kept[2]) < P


def assert_steps_equal_one_forward(model, out, prompt_mask, pixel_rows):
    """Every generated token's logits — under beam search its beam's, found
    through ``beam_indices`` — equal one forward of the merged model over the
    finished sequences (each with its prompt's images): the cached,
    step-by-step decoding is exact, beams included (generate() repeats the
    images for them). With ``output_hidden_states``, the steps' hidden states
    equal that forward's too (the prompt's at its real positions)."""
    seqs, steps = out.sequences, len(out.logits)
    rows, N = seqs.shape[0], seqs.shape[1] - steps
    mask = torch.cat([prompt_mask.repeat_interleave(rows // prompt_mask.shape[0], 0),
                      torch.ones(rows, steps - 1, dtype=prompt_mask.dtype)], 1)
    full = model(input_ids=seqs[:, :-1], attention_mask=mask, pixel_values=pixel_rows,
                 output_hidden_states=out.hidden_states is not None)
    beams = getattr(out, "beam_indices", None)
    for t, logits in enumerate(out.logits):
        src = torch.arange(rows) if beams is None else beams[:, t]
        live = src >= 0  # beam search pads a finished sequence's steps with -1
        assert live.any()
        torch.testing.assert_close(logits[src[live]], full.logits[live, N - 1 + t], atol=3e-5, rtol=3e-5)
    if out.hidden_states is not None:
        real = prompt_mask.bool()
        for layer, h in enumerate(out.hidden_states[0]):
            torch.testing.assert_close(h[real], full.hidden_states[layer][:, :N][real], atol=3e-5, rtol=3e-5)
        for t, step in enumerate(out.hidden_states[1:], start=1):
            for layer, h in enumerate(step):
                torch.testing.assert_close(h[:, 0], full.hidden_states[layer][:, N - 1 + t], atol=3e-5, rtol=3e-5)


def test_merging_every_mode_is_exact(gen):
    """With merging, in a left-padded batch (a flat image that merges a lot; a
    prompt with two images): sampling, beam sampling with several returned
    sequences and greedy with hidden states are exact (each step equals one
    forward of the merged model over the result); the C++ merge samples the
    reference's tokens from the same seed; prompt lookup and assisted decoding
    equal greedy (candidates are verified exactly)."""
    model = tiny_llava()
    a, b = prompt(1, pre=2, post=2), prompt(2, pre=5, post=3, start=10)
    ids, mask = left_padded(a, b)
    pix = images(gen, 3, flat=(0,))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pix)
    tokens = {}
    with torch.no_grad():
        for backend in ("torch", "cpp"):
            if backend == "cpp":
                needs_extension()
            apply_dymu(model, [0.5, 0.5], backend=backend)
            for mode in ("sample", "beam_sample", "hidden_states"):
                out = run(model, mode, **inputs, output_logits=True)
                per_prompt = out.sequences.shape[0] // 2
                kept = dymu_stats(model).tokens_kept
                assert kept[0] < min(kept[1:]) < P, kept
                if backend == "torch":
                    assert_steps_equal_one_forward(model, out, mask, torch.cat([pix[:1]] * per_prompt +
                                                                               [pix[1:]] * per_prompt))
                tokens[backend, mode] = out.sequences
        for mode in ("sample", "beam_sample", "hidden_states"):
            assert torch.equal(tokens["cpp", mode], tokens["torch", mode]), mode
        ids1, pix1 = prompt(1), pix[:1]
        greedy = run(model, "greedy", input_ids=ids1, pixel_values=pix1)
        assisted = model.generate(input_ids=ids1, pixel_values=pix1, assistant_model=model, **BASE, do_sample=False)
        assert torch.equal(assisted.sequences, greedy.sequences)
        lookup = model.generate(input_ids=ids1, pixel_values=pix1, prompt_lookup_num_tokens=2, **BASE, do_sample=False)
        assert torch.equal(lookup.sequences, greedy.sequences)


def test_one_image_for_several_prompts_raises_as_unpatched(twins, gen):
    """generate() with three prompts but one image's pixel values is a
    mismatch in both models (never silently copied to every prompt)."""
    base, patched = twins
    ids, pix = prompt(1).repeat(3, 1), images(gen, 1)
    with torch.no_grad():
        with pytest.raises(ValueError, match="Image features and image tokens do not match, tokens: 48,"):
            base.generate(input_ids=ids, pixel_values=pix, **BASE)
        # transformers' words first (code matching on them keeps working), then why.
        with pytest.raises(ValueError, match="^Image features and image tokens do not match, tokens: 48, features: 16; "
                                             "found 48 image placeholder tokens in input_ids but 1 image"):
            patched.generate(input_ids=ids, pixel_values=pix, **BASE)


def test_cache_length_crop_reset_and_new_images(gen):
    """The cache reports full positions; cropping generated tokens works (and
    continues exactly), cropping into merged image tokens raises; a static
    cache reset forgets the prompt; new images on a filled cache raise."""
    model = tiny_llava()
    apply_dymu(model, [0.5, 0.5])
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    with torch.no_grad():
        out = model.generate(input_ids=ids, pixel_values=pix, **BASE, do_sample=False)
        cache = out.past_key_values
        kept = dymu_stats(model).tokens_kept[0]
        full = out.sequences.shape[1] - 1  # the last token is not in the cache yet
        assert cache.get_seq_length() == full and cache.layers[0].get_seq_length() == full - P + kept
        cache.crop(-2)
        assert cache.get_seq_length() == full - 2 and cache.layers[0].get_seq_length() == full - 2 - P + kept
        again = model.generate(input_ids=out.sequences[:, : full - 1], past_key_values=cache, **BASE, do_sample=False)
        fresh = model.generate(input_ids=out.sequences[:, : full - 1], pixel_values=pix, **BASE, do_sample=False)
        assert torch.equal(again.sequences, fresh.sequences)
        with pytest.raises(ValueError, match="cannot crop .* not merged image tokens"):
            cache.crop(-(cache.get_seq_length() - 5))
        with pytest.raises(ValueError, match="new image placeholders on a DyMU KV cache"):
            model(input_ids=prompt(1), pixel_values=pix, past_key_values=again.past_key_values)
        static = model.generate(input_ids=ids, pixel_values=pix, cache_implementation="static", **BASE, do_sample=False)
        assert torch.equal(static.sequences, out.sequences)
        # The static cache's VTU state is preallocated: cropping turns its last columns back into padding.
        static.past_key_values.crop(-2)
        assert static.past_key_values.get_seq_length() == full - 2
        again = model.generate(input_ids=out.sequences[:, : full - 1], past_key_values=static.past_key_values,
                               **dict(BASE, max_new_tokens=2), do_sample=False)  # the static cache's length
        assert torch.equal(again.sequences, fresh.sequences[:, : full + 1])
        static.past_key_values.reset()
        assert static.past_key_values.get_seq_length() == 0
        assert torch.equal(model(input_ids=ids, pixel_values=pix, past_key_values=static.past_key_values).logits,
                           model(input_ids=ids, pixel_values=pix).logits)


def test_torch_compile_of_the_whole_model(gen):
    """torch.compile of the forward equals eager, its only graph breaks the
    data-dependent token count and the cache's one-time class swap — none in
    the kernels (all torch.library ops with matching fakes) — and fullgraph
    compiled generate() equals eager (check_compiled_whole_model); so does
    generate() with a compiled forward over transformers' default growing
    cache (the VTU state's length marked dynamic)."""
    from test_qwen_vl import check_compiled_whole_model

    model = tiny_llava()
    apply_dymu(model, [0.5, 0.5])
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    check_compiled_whole_model(model, dict(input_ids=ids, pixel_values=pix), [IMG])
    with torch.no_grad():
        eager = model.generate(input_ids=ids, pixel_values=pix, **BASE, do_sample=False).sequences
        model.forward = torch.compile(model.forward, backend="eager")  # dynamo's trace, symbolic lengths
        try:
            compiled = model.generate(input_ids=ids, pixel_values=pix, **BASE, do_sample=False).sequences
        finally:
            del model.forward
            torch._dynamo.reset()
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("thresholds", [NO_MERGE, [0.5, 0.5]], ids=["nothing merged", "merging"])
def test_fullgraph_static_generate_compiles_once(gen, thresholds):
    """A left-padded batch through generate() with a fullgraph static-shape
    compiled forward: equal to eager, from one graph (the padding mask comes
    padded to the static cache's length; check_fullgraph_static_generate)."""
    from test_qwen_vl import check_fullgraph_static_generate

    model = tiny_llava()
    apply_dymu(model, thresholds)
    ids, mask = left_padded(prompt(1), prompt(1, pre=1))
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=images(gen, 2, flat=(0,)), pad_token_id=0)
    check_fullgraph_static_generate(model, kwargs, [IMG])


@pytest.mark.parametrize("thresholds", [NO_MERGE, [0.5, 0.5]])
def test_gradient_checkpointing_in_both_towers(gen, thresholds, monkeypatch):
    """gradient_checkpointing_enable() applies in the merging vision tower (its
    blocks run again in backward) and the language model; gradients equal
    those without checkpointing, merges included."""
    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    results = []
    for checkpointing in (False, True):
        model = tiny_llava()
        apply_dymu(model, thresholds)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        encoder = model._dymu.encoder
        blocks = []
        real = encoder._block
        monkeypatch.setattr(encoder, "_block", lambda *a: blocks.append(1) or real(*a))
        loss = model(input_ids=ids, pixel_values=pix, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, grads, len(blocks)))
    (loss0, g0, n0), (loss1, g1, n1) = results
    assert (n0, n1) == (2, 4)  # two blocks; recomputed once each with checkpointing
    assert torch.equal(loss0, loss1) and g0.keys() == g1.keys()
    assert any("vision_tower" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-6)


def test_vtu_context_moves_like_a_tensor(gen):
    """accelerate's device hooks move unknown arguments with ``.to(device)``:
    the VTU context moves its tensors and keeps the map's integer dtype."""
    from dymu_kernels.hf.attention import VTUContext

    cos = randn(1, 5, 8, gen=gen)
    ctx = VTUContext(torch.arange(5, dtype=torch.int32)[None], cos, cos.sin(), decode=False, backend="torch")
    moved = ctx.to("meta")
    assert moved.merge_map.device.type == moved.cos.device.type == moved.sin.device.type == "meta"
    assert moved.merge_map.dtype == torch.int32 and moved.decode is False and moved.backend == "torch"
    assert ctx.merge_map.device.type == "cpu"  # the original is unchanged


def test_dtome_merge_with_gradients_uses_the_differentiable_reference(gen):
    import dymu_kernels

    x = randn(2, 9, 8, gen=gen).requires_grad_(True)
    size, lengths = torch.ones(2, 9), torch.tensor([9, 7])
    pos_map = torch.arange(9).expand(2, 9).contiguous()
    state = dymu_kernels.dtome_merge(x, size, lengths, pos_map, x.detach(), 0.1)
    state.x.sum().backward()
    assert int(state.lengths[0]) < 9  # something merged
    # Each kept token is a weighted mean (weights sum to 1) of its members, in each of the 8 channels.
    torch.testing.assert_close(x.grad.sum((1, 2)), 8.0 * state.lengths.to(x.dtype))
    with pytest.raises(ValueError, match="backend 'cpp' has no backward"):
        dymu_kernels.dtome_merge(x, size, lengths, pos_map, x.detach(), 0.1, backend="cpp")


def test_generate_under_accelerate_device_hooks(gen, monkeypatch):
    """accelerate's hooks (what ``device_map`` installs on every decoder layer)
    move each layer's arguments to its device; the VTU context goes along
    through ``.to`` and generation is unchanged."""
    hooks = pytest.importorskip("accelerate.hooks")
    from dymu_kernels.hf.attention import VTUContext

    ids, pix = prompt(1), images(gen, 1, flat=(0,))
    kwargs = dict(input_ids=ids, pixel_values=pix, **BASE, do_sample=False)
    with torch.no_grad():
        plain = apply_dymu(tiny_llava(), [0.5, 0.5]).generate(**kwargs).sequences
        model = tiny_llava()
        for layer in model.model.language_model.layers:
            hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu", io_same_device=True))
        apply_dymu(model, [0.5, 0.5])
        moved = []
        real = VTUContext.to
        monkeypatch.setattr(VTUContext, "to", lambda self, *a, **k: moved.append(1) or real(self, *a, **k))
        hooked = model.generate(**kwargs).sequences
    assert torch.equal(hooked, plain)
    assert len(moved) == 2 * 4  # every decoder layer (2), every forward (prompt + 3 steps)
