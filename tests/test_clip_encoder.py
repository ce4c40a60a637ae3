"""DToMe CLIP vision encoder on a small randomly initialised HF CLIPVisionModel."""

import pytest
import torch

from conftest import TRITON_DEVICE, randn

from dymu_kernels import Thresholds
from dymu_kernels.integrations import DToMeCLIPVisionEncoder

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
        enc = DToMeCLIPVisionEncoder(model, num_layers=3, backend="torch")
        out = enc(pixels)
        none = DToMeCLIPVisionEncoder(model, [1.5] * 3, num_layers=3, backend="torch")(pixels)  # cos score never > 1.5
    torch.testing.assert_close(out.features, hf.hidden_states[3], atol=1e-5, rtol=1e-5)
    # Merging nothing only reorders tokens; pos_map says where each went.
    back = none.features.gather(1, none.pos_map.long()[..., None].expand_as(out.features))
    torch.testing.assert_close(back, hf.hidden_states[3], atol=1e-5, rtol=1e-5)
    assert (none.lengths == 50).all()


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_backends_equal_reference_encoder(gen, backend):
    if backend == "cpp":
        from dymu_kernels import _ext

        if _ext.extension() is None:
            pytest.skip("C++ extension not built")
    pytest.importorskip("triton") if backend == "triton" else None
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    model = tiny_clip()
    pixels = randn(3, 3, 56, 56, gen=gen)
    pixels[1] = 0.1  # a flat image merges much more
    thresholds = [0.8, 0.85, 0.9, 0.95]
    with torch.no_grad():
        ref = DToMeCLIPVisionEncoder(model, thresholds, backend="torch")(pixels)
        out = DToMeCLIPVisionEncoder(model.to(device), thresholds, backend=backend)(pixels.to(device))
    assert torch.equal(out.lengths.cpu(), ref.lengths)
    assert int(ref.lengths[1]) < int(ref.lengths.max())
    assert torch.equal(out.pos_map.cpu(), ref.pos_map)
    assert torch.equal(out.size.cpu(), ref.size)
    torch.testing.assert_close(out.features.cpu(), ref.features, atol=1e-4, rtol=1e-4)


def test_fixed_r_thresholds_file_and_trim(tmp_path, gen):
    model = tiny_clip()
    pixels = randn(2, 3, 56, 56, gen=gen)
    with torch.no_grad():
        tome = DToMeCLIPVisionEncoder(model, r=4, backend="torch")(pixels)
        assert tome.lengths.tolist() == [50 - 16] * 2
        path = tmp_path / "thr.json"
        Thresholds(thresholds=[0.7, 0.8, 0.9, 0.95], r=[4] * 4).save(path)
        full = DToMeCLIPVisionEncoder(model, path, backend="torch")(pixels)
        trimmed = DToMeCLIPVisionEncoder(model, path, backend="torch", trim=True)(pixels)
    n = int(full.lengths.max())
    assert trimmed.features.shape[1] == n and full.features.shape[1] == 50
    torch.testing.assert_close(trimmed.features, full.features[:, :n], atol=1e-5, rtol=1e-5)
    assert [t.tolist() for t in trimmed.tokens_per_layer] == [t.tolist() for t in full.tokens_per_layer]


def test_encoder_errors():
    model = tiny_clip()
    with pytest.raises(ValueError, match="thresholds has 2 entries but 4 encoder blocks run"):
        DToMeCLIPVisionEncoder(model, [0.9, 0.9])
    with pytest.raises(ValueError, match="give thresholds \\(DyMU\\) or r \\(ToMe\\), not both"):
        DToMeCLIPVisionEncoder(model, [0.9] * 4, r=2)
    with pytest.raises(ValueError, match="num_layers must be in \\[1, 4\\]"):
        DToMeCLIPVisionEncoder(model, num_layers=5)
    with pytest.raises(ValueError, match="r must be a non-negative int or one per block"):
        DToMeCLIPVisionEncoder(model, r=[1, 2])
    with pytest.raises(TypeError, match="expected a transformers CLIPVisionModel"):
        DToMeCLIPVisionEncoder(torch.nn.Linear(2, 2))


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")


@cuda_only
def test_merged_forward_has_no_host_sync_and_captures_in_a_cuda_graph(gen):
    model = tiny_clip().cuda()
    enc = DToMeCLIPVisionEncoder(model, [0.8, 0.85, 0.9, 0.95], backend="triton")
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
