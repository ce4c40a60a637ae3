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


# ---------------------------------------------------------------------------
# Order rules (docs/design.md §1.1): (a) an image that merges nothing is unchanged;
# (b) without CLS the unmerged A tokens follow in descending score order.
# ---------------------------------------------------------------------------

# Per block: a threshold, and per-image r for fixed-r ToMe. Block 2 merges
# nothing anywhere; image 2 (orthogonal keys) never merges; r = 0 spares others.
CHAIN_THRESHOLDS = [0.3, 0.6, float("inf"), 0.2, 0.5]
CHAIN_R = [[5, 3, 0, 2], [0, 6, 0, 4], [0, 0, 0, 0], [7, 2, 0, 0], [2, 5, 0, 3]]


def chain_batch(gen, N, C, dtype, D=None, device="cpu"):
    """A merge state of 4 images and one metric ``[4, N, D]`` per block of
    CHAIN_THRESHOLDS: image 0 'simple' (keys near one direction: merges a lot),
    1 and 3 noise (3 shorter, with padding), 2 orthogonal keys (every score ~0,
    so it merges nothing while the others do). Scores are spread widely, so
    rounding differences between backends cannot swap two of them."""
    D = D or max(32, N)
    x = randn(4, N, C, gen=gen, dtype=dtype)
    state = init_merge_state(x, torch.tensor([N, N, N, max(1, N - 9)], dtype=torch.int32))
    metrics = []
    for _ in CHAIN_THRESHOLDS:
        m = randn(4, N, D, gen=gen)
        m[0] = randn(N, 1, gen=gen).abs() @ randn(1, D, gen=gen) + 0.7 * m[0]
        m[2] = torch.linalg.qr(randn(D, N, gen=gen, dtype=torch.float64)).Q.T.float()
        metrics.append(m.to(dtype).to(device))
    return [t.to(device) for t in state], metrics


def chain_kwargs(block, mode):
    """Selection of one chain block: ``threshold`` (DyMU) or per-image ``r`` (ToMe)."""
    if mode == "threshold":
        return {"threshold": CHAIN_THRESHOLDS[block]}
    return {"r": torch.tensor(CHAIN_R[block])}


def run_chain(state, metrics, mode, cls_token, backend):
    """The merge states after each block of a chain, merged with ``backend``."""
    out = []
    for block, metric in enumerate(metrics):
        kwargs = chain_kwargs(block, mode)
        if "r" in kwargs:
            kwargs["r"] = kwargs["r"].to(metric.device)
        state = dymu_kernels.dtome_merge(*state, metric, **kwargs, cls_token=cls_token, backend=backend)
        out.append(state)
    return out


def assert_chain_matches_reference(gen, N, C, dtype, mode, cls_token, backend, device="cpu"):
    """Every block of a chain: ``backend`` makes the reference's merges in the
    reference's order; the chain really exercises both order rules."""
    state, metrics = chain_batch(gen, N, C, dtype, device=device)
    refs = run_chain([t.cpu() for t in state], [m.cpu() for m in metrics], mode, cls_token, "torch")
    outs = run_chain(state, metrics, mode, cls_token, backend)
    for out, ref in zip(outs, refs):
        assert_same_merge(out, ref, dtype)
    lengths = torch.stack([s.lengths for s in refs])
    assert (lengths[:, 2] == lengths[0, 2]).all() and int(lengths[0, 2]) == N  # image 2 never merges
    assert torch.equal(lengths[2], lengths[1])  # block 2 merges nothing
    assert mode != "threshold" or int(lengths[-1, 0]) < N // 4  # the simple image merges a lot


def untouched_image_batch(gen, N, C, dtype, device="cpu"):
    """Two images: 0 has orthogonal keys (merges nothing at threshold 0.5 or
    r = 0), 1 has keys near one direction (merges). Capacity N + 3 (padding)."""
    x = randn(2, N + 3, C, gen=gen, dtype=dtype)
    state = init_merge_state(x, torch.tensor([N, N + 3], dtype=torch.int32))
    size = state.size * torch.randint(1, 4, state.size.shape, generator=gen)
    pos_map = torch.randperm(N + 3, generator=gen)[None].repeat(2, 1).int()
    pos_map[0] = pos_map[0] % N  # many-to-one, like after earlier merges
    metric = randn(2, N + 3, N + 3, gen=gen)
    metric[0] = torch.linalg.qr(randn(N + 3, N + 3, gen=gen, dtype=torch.float64)).Q.T.float()
    metric[1] = randn(N + 3, 1, gen=gen).abs() @ randn(1, N + 3, gen=gen) + 0.1 * metric[1]
    return [t.to(device) for t in (state.x, size, state.lengths, pos_map, metric.to(dtype))]


def assert_untouched_image_unchanged(args, backend, **kwargs):
    """Rule (a): image 0 merges nothing and keeps x, size and pos_map bit-exactly
    (order included) while image 1 of the same batch merges."""
    x, size, lengths, pos_map, metric = args
    out = dymu_kernels.dtome_merge(*args, **kwargs, backend=backend)
    L = int(lengths[0])
    assert int(out.lengths[0]) == L and int(out.lengths[1]) < int(lengths[1])
    assert torch.equal(out.x[0, :L], x[0, :L]) and torch.equal(out.size[0, :L], size[0, :L])
    assert torch.equal(out.pos_map[0], pos_map[0])


def score_tie_case(device="cpu"):
    """Nine tokens whose keys give exact scores (slots: A = 0,2,4,6,8 and
    B = 1,3,5,7 with keys e1, e2, -e1, -e2). A0 -> B1 and A2 -> B0 both score
    0.8 (a tie), A1 scores 1 (merges into B0 at threshold 0.99 or r = 1), A3
    scores 0.96, A4 scores 0. Returns (state, metric, expected pos_map by
    cls_token): without CLS the kept A order is A3, A0, A2 (tie: position), A4."""
    keys = [[3, 4, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [4, 3, 0], [-1, 0, 0], [-7, 24, 0], [0, -1, 0], [0, 0, 1]]
    metric = torch.tensor(keys, dtype=torch.float32)[None]
    x = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(7))
    state = [t.to(device) for t in init_merge_state(x)]
    #            slot: 0  1  2  3  4  5  6  7  8
    expected = {False: [1, 4, 4, 5, 2, 6, 0, 7, 3],  # [A3, A0, A2, A4, B0+A1, B1, B2, B3]
                True: [0, 4, 4, 5, 1, 6, 2, 7, 3]}  # [A0, A2, A3, A4, B0+A1, B1, B2, B3]
    return state, metric.to(device), {k: torch.tensor([v], dtype=torch.int32) for k, v in expected.items()}


def assert_score_order(backend, device="cpu"):
    """Rule (b) with a tie, threshold and fixed-r, with and without CLS."""
    state, metric, expected = score_tie_case(device)
    for cls_token in (False, True):
        for kwargs in ({"threshold": 0.99}, {"r": 1}):
            out = dymu_kernels.dtome_merge(*state, metric, **kwargs, cls_token=cls_token, backend=backend)
            assert torch.equal(out.pos_map.cpu(), expected[cls_token]), (cls_token, kwargs)
            assert int(out.lengths[0]) == 8


def random_merge_step(gen, B=5, N=41, C=24, dtype=torch.float32):
    """Inputs of one merge step with many exact score ties (scores in quarters),
    image 1 merging nothing and image 3 padded: ``(state, node_idx, mask, node_max)``."""
    x = randn(B, N, C, gen=gen, dtype=dtype)
    lengths = torch.tensor([N - 11 * (b == 3) for b in range(B)], dtype=torch.int32)
    state = init_merge_state(x, lengths)
    state = state._replace(size=state.size * torch.randint(1, 4, state.size.shape, generator=gen))
    n_a = (N + 1) // 2
    node_max = torch.randint(0, 4, (B, n_a), generator=gen).float() / 4
    node_idx = torch.randint(0, N // 2 - 6, (B, n_a), generator=gen)
    mask = torch.rand(B, n_a, generator=gen) < 0.4
    mask[1] = False
    return state, node_idx, mask, node_max
