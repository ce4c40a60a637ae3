"""get_image_features / get_video_features of a patched model in transformers'
shapes and words: the tower's ``last_hidden_state`` and ``hidden_states`` at
every token (each token carrying its merged token), equal to the unpatched
model's when nothing merges; placeholder mismatches raise with transformers'
own message."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels.core.encoder import DToMeVisionEncoder
from dymu_kernels.hf import apply_dymu, dymu_stats, remove_dymu  # noqa: E402
from dymu_kernels.core.encoder import unmerge_tokens  # noqa: E402
from test_anyres_maps import CROP, tiny_onevision  # noqa: E402
from test_llava_integration import NO_MERGE, P, images, prompt, tiny_llava  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


def tiny_tower(kind):
    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=28,
               patch_size=7)
    if kind == "clip":
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg)).eval()
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg)).eval()


def distinct_rows(x):
    """Distinct rows of each item of ``[n, N, C]``."""
    return [torch.unique(item, dim=0).shape[0] for item in x]


def assert_states_close(got, expected):
    assert len(got) == len(expected)
    assert [g is None for g in got] == [e is None for e in expected]
    for g, e in zip(got, expected):
        if e is not None:
            torch.testing.assert_close(g, e, **TOL)


# --- The encoder ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["clip", "siglip"])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_encoder_states_equal_the_towers_when_nothing_merges(gen, kind, num_layers):
    """All L + 1 hidden states (the block after num_layers included) and the
    last hidden state (SigLIP: post_layernorm) equal the transformers tower's."""
    tower = tiny_tower(kind)
    pix = randn(2, 3, 28, 28, gen=gen)
    enc = DToMeVisionEncoder(tower, [float("inf")] * 3, num_layers=num_layers, backend="torch")
    with torch.no_grad():
        hf = tower(pix, output_hidden_states=True)
        out = enc(pix, output_hidden_states=True)
        last = enc.last_hidden_state(out)
        only = enc(pix, output_hidden_states=-2)
    assert_states_close(out.hidden_states, hf.hidden_states)
    expected_last = hf.hidden_states[num_layers]
    if kind == "siglip":
        expected_last = tower.post_layernorm(expected_last)
    torch.testing.assert_close(last, expected_last, **TOL)
    if num_layers == 3:  # the whole tower ran: transformers' own last_hidden_state
        torch.testing.assert_close(last, hf.last_hidden_state, **TOL)
    assert [h is None for h in only.hidden_states] == [True, True, False, True]
    torch.testing.assert_close(only.hidden_states[2], hf.hidden_states[2], **TOL)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_encoder_states_with_merging_carry_each_tokens_merged_row(gen, kind):
    """With merging, state k holds, at every token, the row of its merged token
    after block k: what an encoder stopping at block k returns, with as many
    distinct rows as tokens kept; the block after the merging ones merges
    nothing."""
    tower = tiny_tower(kind)
    pix = randn(3, 3, 28, 28, gen=gen)
    pix[1] = 0.2  # a flat image merges a lot
    thresholds = [0.3, 0.3, 0.3]
    with torch.no_grad():
        out = DToMeVisionEncoder(tower, thresholds, num_layers=2, backend="torch")(pix, output_hidden_states=True)
        for k in (1, 2):
            alone = DToMeVisionEncoder(tower, thresholds, num_layers=k, backend="torch")(pix)
            torch.testing.assert_close(out.hidden_states[k], unmerge_tokens(alone.features, alone.pos_map), **TOL)
            assert distinct_rows(out.hidden_states[k]) == out.tokens_per_layer[k - 1].tolist()
    kept = out.lengths.tolist()
    assert kept[1] < min(kept[0], kept[2]) < 16 + (kind == "clip")
    assert distinct_rows(out.hidden_states[3]) == kept


def test_encoder_records_and_runs_extra_blocks_only_on_request(gen, monkeypatch):
    tower = tiny_tower("clip")
    enc = DToMeVisionEncoder(tower, [0.3, 0.3], num_layers=2, backend="torch")
    blocks = []
    real = enc._block
    monkeypatch.setattr(enc, "_block", lambda *a, **k: blocks.append(1) or real(*a, **k))
    pix = randn(1, 3, 28, 28, gen=gen)
    with torch.no_grad():
        assert enc(pix).hidden_states is None and len(blocks) == 2
        assert enc(pix, output_hidden_states=2).hidden_states[2] is not None and len(blocks) == 4
        assert len(enc(pix, output_hidden_states=True).hidden_states) == 4 and len(blocks) == 7
        for bad in (4, -5, [0, 9], "all"):
            with pytest.raises(ValueError, match=r"output_hidden_states must be True/False or entry indices in "
                                                 r"\[-4, 4\) of the tower's 4 hidden states"):
                enc(pix, output_hidden_states=bad)


# --- LLaVA ------------------------------------------------------------------------


def llava_pair(layer):
    base, patched = tiny_llava(), tiny_llava()
    for m in (base, patched):
        m.config.vision_feature_layer = m.model.config.vision_feature_layer = layer
    return base, patched


@pytest.mark.parametrize("layer", [-2, -1])
def test_llava_image_features_equal_unpatched_when_nothing_merges(gen, layer):
    """Default call (only the selected block's state, as transformers selects
    it) and output_hidden_states=True (all of them): equal to the unpatched
    model's. last_hidden_state is that of the tower DyMU runs, which ends at
    the selected block: transformers' own with vision_feature_layer=-1."""
    base, patched = llava_pair(layer)
    apply_dymu(patched, [float("inf")] * (3 if layer == -1 else 2), backend="torch")
    pix = images(gen, 2)
    with torch.no_grad():
        for flag in (None, True):
            kw = {} if flag is None else dict(output_hidden_states=flag)
            a = base.model.get_image_features(pixel_values=pix, **kw)
            b = patched.model.get_image_features(pixel_values=pix, **kw)
            assert b.last_hidden_state.shape == a.last_hidden_state.shape == (2, P + 1, 32)
            torch.testing.assert_close(b.last_hidden_state, a.hidden_states[layer] if layer == -2 else
                                       a.last_hidden_state, **TOL)
            assert_states_close(b.hidden_states, a.hidden_states)
            for x, y in zip(a.pooler_output, b.pooler_output):
                torch.testing.assert_close(y, x, **TOL)
        # The forward's image_outputs: the default selection too.
        a, b = (m(input_ids=prompt(2), pixel_values=pix).image_outputs for m in (base, patched))
        assert_states_close(b.hidden_states, a.hidden_states)


def test_llava_image_features_with_merging_carry_each_patchs_merged_token(gen):
    """Each patch position holds its merged token's row: projected, the
    patch rows are the placeholders' features (pooler_output); an image has
    as many distinct rows as tokens kept at each block."""
    model = tiny_llava()
    apply_dymu(model, [0.5, 0.5], backend="torch")
    pix = images(gen, 2, flat=(1,))
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pix, output_hidden_states=True)
        projected = model.model.multi_modal_projector(out.last_hidden_state[:, 1:])
    stats = dymu_stats(model)
    assert stats.tokens_kept[1] < stats.tokens_kept[0] <= P
    torch.testing.assert_close(projected, torch.stack(out.pooler_output), **TOL)
    assert distinct_rows(out.last_hidden_state[:, 1:]) == stats.tokens_kept
    for k in (1, 2):
        assert distinct_rows(out.hidden_states[k]) == [t[k - 1] for t in stats.tokens_per_layer]
    assert out.hidden_states[2] is not None and torch.equal(out.hidden_states[2], out.last_hidden_state)
    assert distinct_rows(out.hidden_states[3]) == [t[-1] for t in stats.tokens_per_layer]  # runs, merges nothing


# --- LLaVA-OneVision --------------------------------------------------------------


def onevision_inputs(model, gen):
    num = transformers.models.llava_onevision.modeling_llava_onevision
    crops = num.image_size_to_num_patches((50, 120), model.config.image_grid_pinpoints, CROP)
    return randn(1, crops, 3, CROP, CROP, gen=gen), torch.tensor([[50, 120]]), randn(1, 3, 3, CROP, CROP, gen=gen)


def test_onevision_image_and_video_features_equal_unpatched_when_nothing_merges(gen):
    base, patched = tiny_onevision(), tiny_onevision()
    apply_dymu(patched, [float("inf")] * 2, backend="torch")
    pix, sizes, video = onevision_inputs(base, gen)
    with torch.no_grad():
        for flag in (None, True):
            kw = {} if flag is None else dict(output_hidden_states=flag)
            for call, args in (("get_image_features", dict(pixel_values=pix, image_sizes=sizes)),
                               ("get_video_features", dict(pixel_values_videos=video))):
                a = getattr(base.model, call)(**args, **kw)
                b = getattr(patched.model, call)(**args, **kw)
                torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, **TOL)  # SigLIP: post-norm
                assert_states_close(b.hidden_states, a.hidden_states)


def test_onevision_features_with_merging_carry_each_patchs_merged_token(gen):
    model = tiny_onevision()
    apply_dymu(model, [0.3, 0.3], backend="torch")
    pix, sizes, video = onevision_inputs(model, gen)
    video[0, 1:] = video[0, :1]  # a static scene
    norm = model.model.vision_tower.post_layernorm
    with torch.no_grad():
        for call, args, modality in (("get_image_features", dict(pixel_values=pix, image_sizes=sizes), "image"),
                                     ("get_video_features", dict(pixel_values_videos=video), "video")):
            out = getattr(model.model, call)(**args, output_hidden_states=True)
            stats = dymu_stats(model, modality)
            assert out.last_hidden_state.shape == (len(stats.tokens_kept), 36, 32)
            assert min(stats.tokens_kept) < 36
            torch.testing.assert_close(out.last_hidden_state, norm(out.hidden_states[-1]), **TOL)
            assert distinct_rows(out.hidden_states[-1]) == stats.tokens_kept
            assert distinct_rows(out.hidden_states[1]) == [t[0] for t in stats.tokens_per_layer]


# --- Mismatch errors in transformers' words ---------------------------------------


def raised(fn):
    with pytest.raises(ValueError) as exc:
        fn()
    return str(exc.value)


def test_llava_image_mismatch_raises_with_transformers_phrase(gen):
    base, patched = tiny_llava(), tiny_llava()
    apply_dymu(patched, [0.5, 0.5], backend="torch")
    ids, pix = prompt(1), images(gen, 2)  # 16 placeholders, 2 images
    with torch.no_grad():
        theirs = raised(lambda: base(input_ids=ids, pixel_values=pix))
        ours = raised(lambda: patched(input_ids=ids, pixel_values=pix))
    phrase = "Image features and image tokens do not match, tokens: 16, features: "
    assert theirs.startswith(phrase)
    assert ours.startswith(phrase + "32; found 16 image placeholder tokens in input_ids but 2 image(s)"), ours


def test_onevision_video_mismatch_raises_with_transformers_message(gen):
    """The whole unpatched message (tokens and features counted alike), then ours."""
    base, patched = tiny_onevision(), tiny_onevision()
    apply_dymu(patched, [0.3, 0.3], backend="torch")
    video = randn(1, 3, 3, CROP, CROP, gen=gen)
    ids = torch.tensor([[1, 2] + [97] * (3 * 9) + [3, 4]])  # one placeholder short of 3 x 9 pooled + newline
    with torch.no_grad():
        theirs = raised(lambda: base(input_ids=ids, pixel_values_videos=video))
        ours = raised(lambda: patched(input_ids=ids, pixel_values_videos=video))
    assert theirs == "Video features and video tokens do not match, tokens: 27, features: 28"
    assert ours.startswith(theirs + "; found 27 video placeholder tokens in input_ids but 1 video(s) with 28"), ours


# --- The returned object, as transformers' suites and users read it ---------------


def _feature_calls(gen):
    """(family, model, no-merge thresholds, [(method, args)]) of LLaVA, Qwen2.5-VL and Qwen3-VL."""
    import test_qwen3_vl as q3
    import test_qwen_vl as q2

    llava = tiny_llava()
    out = [("llava", llava, NO_MERGE, [("get_image_features", (images(gen, 2),))])]
    for name, model, sample, prompts, no_merge in (
            ("qwen2_5_vl", q2.tiny_qwen("qwen2_5_vl"), q2.sample, q2.PROMPTS, q2.NO_MERGE),
            ("qwen3_vl", q3.tiny_qwen3("qwen3_vl"), q3.sample, q3.PROMPTS, q3.NO_MERGE)):
        kw = q2.batch([sample(gen, prompts["two images"]), sample(gen, prompts["video"])])
        out.append((name, model, no_merge, [("get_image_features", (kw["pixel_values"], kw["image_grid_thw"])),
                                            ("get_video_features", (kw["pixel_values_videos"], kw["video_grid_thw"]))]))
    return out


def _same_structure(got, want, where):
    """Equal types and lengths all the way down, and equal tensors."""
    assert type(got) is type(want), f"{where}: {type(got).__name__}, unpatched {type(want).__name__}"
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: {len(got)} entries, unpatched {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same_structure(g, w, f"{where}[{i}]")
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, **TOL, msg=where)


@pytest.mark.parametrize("return_dict", [True, False, None])
def test_feature_methods_return_what_the_unpatched_model_returns(gen, return_dict):
    """With nothing merged, get_image_features / get_video_features return
    the unpatched model's object: the same output class (a subclass of it),
    the same keys in the same order, the same containers (tuples of items);
    with ``return_dict=False`` the same tuple — a user's ``out[2]`` (Qwen3-VL:
    the deepstack features) means the same thing patched or not. DyMU's own
    fields are attributes after transformers' ones, never in the tuple."""
    for family, model, no_merge, calls in _feature_calls(gen):
        for hidden in (False, True):
            kw = {"output_hidden_states": hidden}
            if return_dict is not None:
                kw["return_dict"] = return_dict
            with torch.no_grad():
                want = [getattr(model.model, m)(*args, **kw) for m, args in calls]
                keys = [list(getattr(model.model, m)(*args, output_hidden_states=hidden).keys()) for m, args in calls]
                apply_dymu(model, no_merge, backend="torch")
                try:
                    got = [getattr(model.model, m)(*args, **kw) for m, args in calls]
                finally:
                    remove_dymu(model)
            # LLaVA's last_hidden_state is that of the tower DyMU runs, which ends at the selected block, and its
            # default hidden_states only the selected block's, as transformers selects it (tests above).
            skip = {"last_hidden_state"} | ({"hidden_states"} if not hidden else set()) if family == "llava" else set()
            for (method, _), g, w, names in zip(calls, got, want, keys):
                where = f"{family}.{method}(output_hidden_states={hidden}, return_dict={return_dict})"
                if return_dict is False:
                    assert type(g) is tuple and len(g) == len(w) == len(names), f"{where}: {len(g)} entries"
                    g, w = dict(zip(names, g)), dict(zip(names, w))
                else:
                    assert isinstance(g, type(w)), f"{where}: {type(g).__name__} is not a {type(w).__name__}"
                    assert list(g.keys())[:len(w.keys())] == list(w.keys()) == names, f"{where}: {list(g.keys())}"
                for key in names:
                    if key not in skip:
                        _same_structure(g[key], w[key], f"{where}.{key}")
