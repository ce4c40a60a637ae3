"""What ``apply_dymu(model, thresholds, r=...)`` accepts, read once against
the stages each family declares: no argument silently dropped or cut to
fit, and clear errors for what a user gets wrong (every family)."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dymu_kernels import Thresholds  # noqa: E402
from dymu_kernels.hf import apply_dymu, dymu_stats  # noqa: E402
from test_llava_integration import IMG, NO_MERGE, images, prompt, tiny_llava  # noqa: E402
from test_qwen_vl import tiny_qwen  # noqa: E402

INF = float("inf")


def untouched(model):
    return getattr(model, "_dymu", None) is None


def test_thresholds_and_r_together_raise():
    llava = tiny_llava()
    with pytest.raises(ValueError, match=r"give thresholds or r \(fixed-r merging\) for the 'vit' stage, not both"):
        apply_dymu(llava, [0.9, 0.9], r=2)
    with pytest.raises(ValueError, match="not both"):
        apply_dymu(llava, "openai/clip-vit-large-patch14-336:low", r=2)
    assert untouched(llava)
    apply_dymu(llava, r=2, backend="torch")  # the default thresholds give way to an explicit r
    assert llava._dymu.encoder.r == [2, 2] and llava._dymu.encoder.thresholds is None
    qwen = tiny_qwen("qwen2_5_vl")
    for both in ([0.5] * 4, {"vit": [0.5] * 4}, {"vit": [0.5] * 4, "merger": [0.5]}):
        with pytest.raises(ValueError, match="for the 'vit' stage, not both"):
            apply_dymu(qwen, both, r=1)
    assert untouched(qwen)
    # r in the tower and thresholds for the rounds after the merger: two stages, both kept.
    apply_dymu(qwen, {"merger": [0.5]}, r=1, backend="torch")
    enc = qwen._dymu.encoder
    assert enc.vit.r == [1] * 4 and enc.rounds.thresholds == [0.5]


def test_lists_and_files_for_another_tower_raise(tmp_path):
    llava = tiny_llava()  # CLIP of 3 blocks, LLaVA reads 2 (vision_feature_layer=-2)
    with pytest.raises(ValueError, match=r"thresholds has 12 entries but this tower takes 2 or 3 \(one per encoder "
                                         r"block\): thresholds for another tower are not cut to fit"):
        apply_dymu(llava, [0.9] * 12)
    with pytest.raises(ValueError, match="r has 4 entries but this tower takes 2 or 3"):
        apply_dymu(llava, r=[1] * 4)
    siglip = tmp_path / "siglip.json"  # a file for another tower (27 blocks)
    Thresholds(thresholds=[0.9] * 27, r=[4] * 27, model="google/siglip-so400m-patch14-384").save(siglip)
    with pytest.raises(ValueError, match=r"thresholds file '.*siglip.json' has 27 entries but this tower takes 2 or 3"):
        apply_dymu(llava, siglip)
    assert untouched(llava)
    # Exactly the documented extra entry: thresholds for the whole tower (the last one unused).
    apply_dymu(llava, [0.5, 0.6, 0.7], backend="torch")
    assert llava._dymu.encoder.thresholds == [0.5, 0.6]
    qwen = tiny_qwen("qwen2_vl")  # 4 blocks, no extra entry
    with pytest.raises(ValueError, match="thresholds has 5 entries but this tower takes 4"):
        apply_dymu(qwen, [0.5] * 5)
    with pytest.raises(ValueError, match=r"thresholds\['vit'\] has 12 entries but this tower takes 4"):
        apply_dymu(qwen, {"vit": [0.5] * 12})


def test_file_for_another_model_warns(tmp_path):
    llava = tiny_llava()
    llava.config._name_or_path = "me/my-llava"
    path = tmp_path / "t.json"
    Thresholds(thresholds=[0.9] * 3, r=[2] * 3, model="someone/other-llava").save(path)
    with pytest.warns(UserWarning, match=r"calibrated for 'someone/other-llava', not for this model \('me/my-llava'\)"):
        apply_dymu(llava, path, backend="torch")
    Thresholds(thresholds=[0.9] * 3, r=[2] * 3, model="me/my-llava").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_dymu(llava, str(path), backend="cpp")  # its own model: no warning
        apply_dymu(llava, Thresholds(thresholds=[0.9] * 3, r=[2] * 3), backend="cpp")  # no model recorded


def test_what_a_new_user_types():
    qwen = tiny_qwen("qwen2_5_vl")
    with pytest.raises(ValueError, match=r"r must be a non-negative int or one per vision block \(4\), got 2.5"):
        apply_dymu(qwen, r=2.5)
    with pytest.raises(ValueError, match=r"thresholds must be a list \(one per vision block\).*got the number 0.9; "
                                         r"for the same threshold everywhere pass \[0.9\] \* 4"):
        apply_dymu(qwen, 0.9)
    with pytest.raises(ValueError, match=r"thresholds\['merger'\] must be a list \(one per round\).* pass \[0.9\]"):
        apply_dymu(qwen, {"merger": 0.9})
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'triton', 'cpp', 'torch'\), got 'trition'"):
        apply_dymu(qwen, r=1, backend="trition")
    with pytest.raises(ValueError, match="trim must be 'auto', True or False"):
        apply_dymu(qwen, r=1, trim="yes")
    with pytest.raises(ValueError, match=r"thresholds stages \['tower'\] unknown for Qwen2_5_VLForConditionalGeneration"):
        apply_dymu(qwen, {"tower": [0.5] * 4})
    with pytest.raises(ValueError, match="asks for no DToMe stage"):
        apply_dymu(qwen, {"vit": None, "merger": None})
    assert untouched(qwen)
    llava = tiny_llava()
    with pytest.raises(ValueError, match=r"thresholds must be a list \(one per encoder block\).* \[0.9\] \* 2"):
        apply_dymu(llava, 0.9)
    with pytest.raises(ValueError, match="r must be a non-negative int"):
        apply_dymu(llava, r=True)
    assert untouched(llava)


def test_per_call_feature_layer_and_strategy(gen):
    """transformers honours vision_feature_layer / vision_feature_select_strategy
    per call; the patched model merges up to one block: anything else raises by name."""
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1)
    with torch.no_grad():
        stock = model.model.get_image_features(pix, vision_feature_layer=-1).pooler_output
        unpatched = model(input_ids=ids, pixel_values=pix).logits
        apply_dymu(model, NO_MERGE, backend="torch")
        merged = model.model.get_image_features(pix).pooler_output
        assert not torch.allclose(merged[0], stock[0], atol=1e-3)  # block -1's features differ: must not be returned
        with pytest.raises(ValueError, match=r"vision_feature_layer=-1 per call: this DyMU-patched model merges up to "
                                             r"the block config.vision_feature_layer=-2 selects"):
            model.model.get_image_features(pix, vision_feature_layer=-1)
        with pytest.raises(ValueError, match="vision_feature_layer=-1 per call"):
            model(input_ids=ids, pixel_values=pix, vision_feature_layer=-1)
        with pytest.raises(ValueError, match=r"vision_feature_select_strategy='full' per call"):
            model(input_ids=ids, pixel_values=pix, vision_feature_select_strategy="full")
        # The config's own values (or the same block counted from the front) are what it computes.
        with pytest.raises(ValueError, match=r"output_attentions=True: the DyMU vision tower does not return"):
            model.model.get_image_features(pix, output_attentions=True)
        same = model(input_ids=ids, pixel_values=pix, vision_feature_layer=2, vision_feature_select_strategy="default")
        torch.testing.assert_close(same.logits, unpatched, atol=2e-5, rtol=2e-5)
    assert dymu_stats(model).tokens_kept == [16]


def test_loss_keywords_reach_the_loss(gen):
    """Loss keywords (``shift_labels``) pass through the patched model to the
    loss, as in the unpatched model, instead of reaching VTU attention."""
    model = tiny_llava()
    ids, pix = prompt(1), images(gen, 1)
    labels = ids.masked_fill(ids == IMG, -100)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    reversed_shift = shift.flip(1)  # a loss that differs from the default shift: the keyword is read
    with torch.no_grad():
        ref = [model(input_ids=ids, pixel_values=pix, labels=labels, shift_labels=s).loss for s in (shift, reversed_shift)]
        apply_dymu(model, NO_MERGE, backend="torch")
        got = [model(input_ids=ids, pixel_values=pix, labels=labels, shift_labels=s).loss for s in (shift, reversed_shift)]
    assert not torch.allclose(ref[0], ref[1])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_selected_hidden_states(gen):
    """``output_hidden_states`` selecting some layers (transformers 5: an int
    or a list; the others None) comes back at the full positions as for the
    unpatched model (it crashed on the Nones)."""
    from test_qwen_vl import NO_MERGE as QWEN_NO_MERGE, PROMPTS, batch, sample

    model = tiny_qwen("qwen2_5_vl")
    kwargs = batch([sample(gen, PROMPTS["image"])])
    selections = ([1], -1, [0, 2])
    with torch.no_grad():
        refs = [model(**kwargs, output_hidden_states=sel).hidden_states for sel in selections]
        apply_dymu(model, QWEN_NO_MERGE, backend="torch")
        for sel, ref in zip(selections, refs):
            got = model(**kwargs, output_hidden_states=sel).hidden_states
            assert [h is None for h in got] == [h is None for h in ref] and any(h is None for h in ref), sel
            for a, b in zip(got, ref):
                if b is not None:
                    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)
