"""The DToMe TinyViT end to end, and the demo's claim: flat images keep fewer tokens."""

import pytest
import torch

from conftest import randn

from dymu_kernels.models import TinyViT
from dymu_kernels.reference import FixedRPolicy, ThresholdPolicy


def vit(trim):
    torch.manual_seed(0)
    return TinyViT(image_size=64, patch_size=8, width=48, depth=3, heads=2, trim=trim).eval()


@pytest.mark.parametrize("trim", [True, False])
def test_batch_equals_each_image_alone(gen, trim):
    model = vit(trim)
    images = randn(4, 3, 64, 64, gen=gen)
    images[1] = 0.3  # a flat image merges much more than the others
    policy = ThresholdPolicy([0.6, 0.7, 0.8])
    with torch.no_grad():
        batch = model(images, policy)
        for b in range(4):
            alone = model(images[b : b + 1], policy)
            n = int(alone.lengths[0])
            assert int(batch.lengths[b]) == n
            assert [int(t[b]) for t in batch.tokens_per_layer] == [int(t[0]) for t in alone.tokens_per_layer]
            assert torch.equal(batch.pos_map[b], alone.pos_map[0])
            torch.testing.assert_close(batch.features[b, :n], alone.features[0, :n], atol=1e-5, rtol=1e-5)
    assert int(batch.lengths[1]) < int(batch.lengths.max())


def test_threshold_above_one_equals_no_merging(gen):
    model = vit(True)
    images = randn(2, 3, 64, 64, gen=gen)
    with torch.no_grad():
        plain = model(images)
        none = model(images, ThresholdPolicy([1.5] * 3))
    assert (none.lengths == model.num_tokens).all()
    # Only the order changes (kept A tokens first, then B): map it back.
    order = none.pos_map.long()
    torch.testing.assert_close(none.features.gather(1, order[..., None].expand_as(plain.features)), plain.features)


def test_fixed_r_keeps_the_same_count_for_every_image(gen):
    model = vit(True)
    out = model(randn(3, 3, 64, 64, gen=gen), FixedRPolicy([5, 5, 5]))
    assert out.lengths.tolist() == [model.num_tokens - 15] * 3


def test_vit_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match="images must be \\[B, 3, 64, 64\\]"):
        vit(True)(torch.randn(1, 3, 32, 32))


def test_demo_flat_image_keeps_fewer_tokens_than_photographs(capsys):
    pytest.importorskip("skimage")
    from dymu_kernels import demo

    res = demo.run_demo("cpu", r=12, progress=False)
    kept = dict(zip(res["names"], res["dymu_per_layer"][:, -1].tolist()))
    flat = kept.pop("flat blue (synthetic)")
    photos = [kept[n] for n in demo.PHOTOS]
    assert flat < min(photos)
    assert max(photos) - min(photos) > 10  # counts depend on the image
    assert len(set(res["tome_kept"].tolist())) == 1  # the ToMe baseline does not adapt

    assert demo.main(["--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "flat blue (synthetic)" in printed and "astronaut" in printed and "DyMU kept" in printed
