"""DToMe CLIP vision encoder on a small randomly initialised HF CLIPVisionModel."""

import pytest
import torch

from conftest import TRITON_DEVICE, randn

from dymu_kernels import Thresholds
from dymu_kernels.core.encoder import DToMeVisionEncoder

transformers = pytest.importorskip("transformers")


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        image_size=56, patch_size=8, attn_implementation="eager",
    )
    return transformers.CLIPVisionModel(config).eval()


def test_no_merging_equals_hf_forward(gen):
    model = tiny_clip()
    pixels = randn(2, 3, 56, 56, gen=gen)
    with torch.no_grad():
        hf = model(pixel_values=pixels, output_hidden_states=True)
        enc = DToMeVisionEncoder(model, num_layers=3, backend="torch")
        out = enc(pixels)
        none = DToMeVisionEncoder(model, [float("inf")] * 3, num_layers=3, backend="torch")(pixels)  # nothing merges
    torch.testing.assert_close(out.features, hf.hidden_states[3], atol=1e-5, rtol=1e-5)
    # Merging nothing leaves the sequence unchanged (docs/design.md §1.1 rule (a)); pos_map says where each went.
    back = none.features.gather(1, none.pos_map.long()[..., None].expand_as(out.features))
    torch.testing.assert_close(back, hf.hidden_states[3], atol=1e-5, rtol=1e-5)
    assert (none.lengths == 50).all()


def backend_device(backend):
    """The device a merge backend is tested on; skips one that cannot run here."""
    if backend == "cpp":
        from dymu_kernels import _ext

        if _ext.extension() is None:
            pytest.skip("C++ extension not built")
    if backend == "triton":
        pytest.importorskip("triton")
        return TRITON_DEVICE
    return "cpu"


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backends_equal_reference_encoder(gen, backend):
    device = backend_device(backend)
    model = tiny_clip()
    pixels = randn(3, 3, 56, 56, gen=gen)
    pixels[1] = 0.1  # a flat image merges much more
    thresholds = [0.8, 0.85, 0.9, 0.95]
    with torch.no_grad():
        ref = DToMeVisionEncoder(model, thresholds, backend="torch")(pixels)
        out = DToMeVisionEncoder(model.to(device), thresholds, backend=backend)(pixels.to(device))
    assert torch.equal(out.lengths.cpu(), ref.lengths)
    assert int(ref.lengths[1]) < int(ref.lengths.max())
    assert torch.equal(out.pos_map.cpu(), ref.pos_map)
    assert torch.equal(out.size.cpu(), ref.size)
    torch.testing.assert_close(out.features.cpu(), ref.features, atol=1e-4, rtol=1e-4)


def test_fixed_r_and_thresholds_file(tmp_path, gen):
    model = tiny_clip()
    pixels = randn(2, 3, 56, 56, gen=gen)
    thresholds = [0.7, 0.8, 0.9, 0.95]
    with torch.no_grad():
        tome = DToMeVisionEncoder(model, r=4, backend="torch")(pixels)
        assert tome.lengths.tolist() == [50 - 16] * 2
        path = tmp_path / "thr.json"
        Thresholds(thresholds=thresholds, r=[4] * 4).save(path)
        from_file = DToMeVisionEncoder(model, path, backend="torch")(pixels)
        from_list = DToMeVisionEncoder(model, thresholds, backend="torch")(pixels)
    assert torch.equal(from_file.features, from_list.features) and torch.equal(from_file.pos_map, from_list.pos_map)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_trimmed_encoder_equals_untrimmed(gen, backend):
    device = backend_device(backend)
    model = tiny_clip().to(device)
    pixels = randn(2, 3, 56, 56, gen=gen)
    pixels[1] = 0.1  # a flat image merges far more than a random one
    thresholds = [0.5] * 4
    with torch.no_grad():
        full = DToMeVisionEncoder(model, thresholds, backend=backend, trim=False)(pixels.to(device))
        trimmed = DToMeVisionEncoder(model, thresholds, backend=backend, trim=True)(pixels.to(device))
    n = int(full.lengths.max())
    assert full.features.shape[1] == 50 and trimmed.features.shape[1] == n < 50
    assert int(full.lengths.min()) < n  # the images keep different counts
    assert torch.equal(trimmed.lengths, full.lengths) and torch.equal(trimmed.pos_map, full.pos_map)
    assert torch.equal(trimmed.size, full.size[:, :n])
    assert [t.tolist() for t in trimmed.tokens_per_layer] == [t.tolist() for t in full.tokens_per_layer]
    valid = torch.arange(n, device=device)[None, :] < full.lengths[:, None]
    torch.testing.assert_close(trimmed.features[valid], full.features[:, :n][valid], atol=1e-4, rtol=1e-4)


def test_trim_auto_trims_off_cuda_only():
    model = tiny_clip()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = DToMeVisionEncoder(model)  # the default
    assert auto.trim == "auto" and auto.trims_on(cpu) and not auto.trims_on(cuda)
    assert DToMeVisionEncoder(model, trim=True).trims_on(cuda)
    assert not DToMeVisionEncoder(model, trim=False).trims_on(cpu)


def test_encoder_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="thresholds has 2 entries but 4 encoder blocks run"):
        DToMeVisionEncoder(model, [0.9, 0.9])
    with pytest.raises(ValueError, match="give thresholds \\(DyMU\\) or r \\(ToMe\\), not both"):
        DToMeVisionEncoder(model, [0.9] * 4, r=2)
    with pytest.raises(ValueError, match="num_layers must be in \\[1, 4\\]"):
        DToMeVisionEncoder(model, num_layers=5)
    with pytest.raises(ValueError, match="r has 2 entries but 4 encoder blocks run"):
        DToMeVisionEncoder(model, r=[1, 2])
    with pytest.raises(ValueError, match=r"r must be a non-negative int or one per encoder block \(4\), got -1"):
        DToMeVisionEncoder(model, r=-1)
    with pytest.raises(ValueError, match="trim must be 'auto', True or False, got 'yes'"):
        DToMeVisionEncoder(model, trim="yes")
    with pytest.raises(TypeError, match="expected a transformers CLIPVisionModel or SiglipVisionModel"):
        DToMeVisionEncoder(torch.nn.Linear(2, 2))
    for bad in (1.5, -1.01, float("-inf")):
        with pytest.raises(ValueError, match=r"thresholds\[2\] = .* is outside \[-1, 1\]"):
            DToMeVisionEncoder(model, [0.9, 0.9, bad, 0.9])
    with pytest.raises(ValueError, match=r"thresholds\[0\] must be a number, got True"):
        DToMeVisionEncoder(model, [True, 0.9, 0.9, 0.9])
    assert DToMeVisionEncoder(model, [-1, 1, float("inf"), 0]).thresholds == [-1.0, 1.0, float("inf"), 0.0]


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@cuda_only
def test_merged_forward_has_no_host_sync_and_captures_in_a_cuda_graph(gen):
    model = tiny_clip().cuda()
    enc = DToMeVisionEncoder(model, [0.8, 0.85, 0.9, 0.95], backend="triton")  # trim="auto": none on CUDA
    static = randn(4, 3, 56, 56, gen=gen).cuda()
    with torch.no_grad():
        torch.cuda.set_sync_debug_mode("error")  # any host sync raises
        try:
            enc(static)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            enc(static)  # warm-up compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = enc(static)
        fresh = randn(4, 3, 56, 56, gen=gen).cuda()
        fresh[2] = 0.1
        static.copy_(fresh)
        graph.replay()
        eager = enc(fresh)
    assert torch.equal(captured.lengths, eager.lengths) and torch.equal(captured.pos_map, eager.pos_map)
    torch.testing.assert_close(captured.features, eager.features)


def test_calibration_on_a_clip_tower_hits_the_requested_merges(gen, tmp_path):
    """calibrate_thresholds runs the encoder with its policy; the thresholds it
    returns make the same encoder merge r tokens per image per block on the
    calibration images (one batch: the same edges, so ±1 for score ties), and
    survive a JSON round trip."""
    from dymu_kernels import calibrate_thresholds

    model = tiny_clip()
    pixels = randn(6, 3, 56, 56, gen=gen)
    enc = DToMeVisionEncoder(model, num_layers=4, backend="torch")
    with torch.no_grad():
        thr = calibrate_thresholds(enc, [pixels], r=5, num_layers=4, model="tiny-clip", progress=False)
        path = tmp_path / "thr.json"
        thr.save(path)
        assert Thresholds.load(path).thresholds == thr.thresholds
        out = DToMeVisionEncoder(model, path, num_layers=4, backend="torch")(pixels)
    kept = torch.stack(out.tokens_per_layer, dim=1).double().mean(0)  # [blocks], 50 tokens at the start
    expected = 50 - 5 * torch.arange(1, 5, dtype=torch.float64)
    assert (kept - expected).abs().max() <= 1, (kept.tolist(), expected.tolist())
