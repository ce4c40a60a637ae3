"""DToMe in a SigLIP tower (LLaVA-OneVision's): no CLS token, no pre-layernorm."""

import pytest
import torch

from conftest import randn

transformers = pytest.importorskip("transformers")

from dymu_kernels import reference as ref  # noqa: E402
from dymu_kernels.core.encoder import DToMeVisionEncoder  # noqa: E402

SIDE = 6  # 6 x 6 patches of 7 px: 36 tokens, an even count (SigLIP has no CLS)


def tiny_siglip(seed=0):
    torch.manual_seed(seed)
    config = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                             num_attention_heads=4, image_size=7 * SIDE, patch_size=7,
                                             attn_implementation="eager")
    return transformers.SiglipVisionModel(config).eval()


@pytest.mark.parametrize("layers", [2, 4])
def test_no_merging_equals_hf_hidden_states(gen, layers):
    """Nothing merged: the encoder's features equal SiglipVisionModel's
    hidden_states[k] (before post_layernorm); without CLS every slot can merge."""
    model = tiny_siglip()
    pixels = randn(3, 3, 7 * SIDE, 7 * SIDE, gen=gen)
    with torch.no_grad():
        hf = model(pixel_values=pixels, output_hidden_states=True)
        enc = DToMeVisionEncoder(model, [float("inf")] * layers, num_layers=layers, backend="torch")
        out = enc(pixels)
    assert not enc.cls_token
    back = out.features.gather(1, out.pos_map.long()[..., None].expand(-1, -1, out.features.shape[-1]))
    torch.testing.assert_close(back, hf.hidden_states[layers], atol=1e-5, rtol=1e-5)
    assert (out.lengths == SIDE * SIDE).all() and torch.equal(out.size.sum(1), torch.full((3,), float(SIDE * SIDE)))


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_crop_in_a_batch_equals_the_crop_alone(gen, backend):
    """Crops merge independently: each crop of a batch gets what it gets alone;
    sizes sum to the patch count per crop; slot 0 merges too (no CLS)."""
    if backend == "cpp":
        from dymu_kernels import _ext

        if _ext.extension() is None:
            pytest.skip("C++ extension not built")
    model = tiny_siglip()
    crops = randn(4, 3, 7 * SIDE, 7 * SIDE, gen=gen)
    crops[2] = 0.3  # a flat crop merges almost everything
    thresholds = [0.5, 0.6, 0.7]
    with torch.no_grad():
        enc = DToMeVisionEncoder(model, thresholds, num_layers=3, backend=backend)
        batch = enc(crops)
        alone = [enc(crops[i : i + 1]) for i in range(4)]
    assert int(batch.lengths[2]) < int(batch.lengths.max()) < SIDE * SIDE
    torch.testing.assert_close(batch.size.sum(1), torch.full((4,), float(SIDE * SIDE)))
    for i, a in enumerate(alone):
        n = int(a.lengths[0])
        assert int(batch.lengths[i]) == n
        assert torch.equal(batch.pos_map[i], a.pos_map[0]) and torch.equal(batch.size[i, :n], a.size[0, :n])
        torch.testing.assert_close(batch.features[i, :n], a.features[0, :n], atol=1e-5, rtol=1e-5)
    # Without CLS, slot 0 is an ordinary A token: in the flat crop it merged into a B token.
    assert int(batch.pos_map[2, 0]) != 0 or int(batch.size[2, 0]) > 1


def test_siglip_merge_follows_rule_b_like_the_reference(gen):
    """One block of the encoder equals the reference merge with cls_token=False
    (unmerged A tokens in descending score order)."""
    model = tiny_siglip()
    pixels = randn(2, 3, 7 * SIDE, 7 * SIDE, gen=gen)
    with torch.no_grad():
        enc = DToMeVisionEncoder(model, [0.4], num_layers=1, backend="torch", trim=False)
        out = enc(pixels)
        layer = model.vision_model.encoder.layers[0] if hasattr(model, "vision_model") else model.encoder.layers[0]
        x = model.vision_model.embeddings(pixels) if hasattr(model, "vision_model") else model.embeddings(pixels)
        state = ref.init_merge_state(x)
        attn = layer.self_attn
        B, N, C = x.shape
        h = layer.layer_norm1(x)
        q, k, v = (p(h).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        x = x + attn.out_proj(ref.proportional_attention(q, k, v, state.size, scale=attn.scale).transpose(1, 2).reshape(B, N, C))
        merged = ref.dtome_merge(x, state.size, state.lengths, state.pos_map, k, 0.4, cls_token=False)
        expected_x = merged.x + layer.mlp(layer.layer_norm2(merged.x))
    assert torch.equal(out.lengths, merged.lengths) and torch.equal(out.pos_map, merged.pos_map)
    torch.testing.assert_close(out.features, expected_x, atol=1e-5, rtol=1e-5)
    assert int(merged.lengths.min()) < N


def test_calibration_on_a_siglip_tower(gen):
    """Calibrating a SigLIP tower (one batch) gives thresholds that merge the
    requested tokens per block on those crops (exactly, up to one per block)."""
    import dymu_kernels

    model = tiny_siglip()
    crops = randn(6, 3, 7 * SIDE, 7 * SIDE, gen=gen)
    crops[1] = 0.2
    enc = DToMeVisionEncoder(model, num_layers=3, backend="torch")
    thr = dymu_kernels.calibrate_thresholds(enc, [crops], 4, num_layers=3, progress=False)
    with torch.no_grad():
        counts = torch.stack(DToMeVisionEncoder(model, thr, num_layers=3)(crops).tokens_per_layer, 1).double()
    before = torch.cat([torch.full_like(counts[:, :1], SIDE * SIDE), counts[:, :-1]], 1)
    merged = (before - counts).mean(0)
    assert torch.all((merged - 4).abs() <= 1), merged
