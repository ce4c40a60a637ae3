"""Inputs and checks shared by the DToMe backend tests (C++, Triton)."""

import torch

from conftest import randn

import dymu_kernels
from dymu_kernels.reference import init_merge_state

TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def mixed_batch(gen, N, C, dtype, B=3, device="cpu"):
    """A merge state of images with different lengths and earlier merges (sizes 1-3);
    image 0 is 'simple' (near rank-1 keys, merges a lot), the rest are noise."""
    x = randn(B, N, C, gen=gen, dtype=dtype)
    lengths = torch.tensor([N] + [max(1, N - 7 * b) for b in range(1, B)], dtype=torch.int32)
    state = init_merge_state(x, lengths)
    size = state.size * torch.randint(1, 4, state.size.shape, generator=gen)
    metric = randn(B, 2, N, 32, gen=gen, dtype=dtype)
    metric[0] = (randn(2, N, 1, gen=gen) @ randn(1, 32, gen=gen) + 0.05 * metric[0].float()).to(dtype)
    return [t.to(device) for t in (state.x, size, state.lengths, state.pos_map, metric)]


def threshold_between_scores(node_max, quantile):
    """A threshold halfway between two neighbouring scores near ``quantile``, so that
    rounding differences between implementations cannot flip a decision."""
    v = node_max[torch.isfinite(node_max)].sort().values
    if v.numel() == 0:
        return 0.5
    k = min(int(quantile * (v.numel() - 1)), v.numel() - 1)
    return float((v[k] + v[k + 1]) / 2) if k + 1 < v.numel() else float(v[k]) + 1e-3


def threshold_with_margin(metric, lengths, quantile):
    node_max, _ = dymu_kernels.reference.bipartite_match(metric.cpu(), lengths.cpu())
    return threshold_between_scores(node_max, quantile)


def assert_same_merge(out, ref, dtype):
    """Same merges (lengths, pos_map, sizes exactly); features within dtype tolerance."""
    assert torch.equal(out.lengths.cpu(), ref.lengths) and out.lengths.dtype == ref.lengths.dtype
    assert torch.equal(out.pos_map.cpu(), ref.pos_map) and out.pos_map.dtype == ref.pos_map.dtype
    assert torch.equal(out.size.cpu(), ref.size)
    assert out.x.dtype == dtype
    torch.testing.assert_close(out.x.cpu(), ref.x, atol=TOL[dtype], rtol=TOL[dtype])


def assert_batch_equals_alone(args, threshold, backend):
    """Each image of a batch gets bit-identically what it gets alone (same merges,
    features gathered in a fixed order)."""
    x, size, lengths, pos_map, metric = args
    batch = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, threshold, backend=backend)
    for b in range(x.shape[0]):
        L = int(lengths[b])
        one = slice(b, b + 1)
        alone = dymu_kernels.dtome_merge(
            x[one, :L], size[one, :L], lengths[one], pos_map[one], metric[one, :, :L], threshold, backend=backend
        )
        n = int(alone.lengths[0])
        assert int(batch.lengths[b]) == n and torch.equal(batch.pos_map[b, :L], alone.pos_map[0, :L])
        assert torch.equal(batch.x[b, :n], alone.x[0, :n])
