"""DToMe reference vs the per-image, per-token loop of tests/slow_reference.py."""

import pytest
import torch

from conftest import randn
from merge_cases import (
    assert_chain_matches_reference,
    assert_score_order,
    assert_untouched_image_unchanged,
    chain_batch,
    chain_kwargs,
    random_merge_step,
    run_chain,
    score_tie_case,
    threshold_between_scores,
    untouched_image_batch,
)
from slow_reference import loop_merge_one

from dymu_kernels.reference import dtome_merge, init_merge_state, merge_tokens
from dymu_kernels.reference.dtome import bipartite_match, fixed_r_mask


def padded_state(xs, sizes=None, n_cap=None, n0=None):
    """Pack per-image token lists into a merge state with capacity n_cap."""
    B = len(xs)
    C = xs[0].shape[-1]
    n_cap = n_cap or max(x.shape[0] for x in xs)
    n0 = n0 or n_cap
    x = torch.zeros(B, n_cap, C, dtype=xs[0].dtype)
    size = torch.zeros(B, n_cap)
    for b, xb in enumerate(xs):
        x[b, : xb.shape[0]] = xb
        size[b, : xb.shape[0]] = 1.0 if sizes is None else sizes[b]
    lengths = torch.tensor([xb.shape[0] for xb in xs], dtype=torch.int32)
    # Each original patch points at some valid slot (many-to-one like after earlier merges).
    pos_map = torch.stack([torch.arange(n0) % max(int(l), 1) for l in lengths]).to(torch.int32)
    return x, size, lengths, pos_map


def check_against_loop(x, size, lengths, pos_map, metric, out, *, threshold=None, r=None, cls_token=True, atol=1e-12):
    for b in range(x.shape[0]):
        L = int(lengths[b])
        mb = metric[b, :, :L] if metric.dim() == 4 else metric[b, :L]
        rb = r if not isinstance(r, torch.Tensor) else int(r[b])
        ex, es, slot_of = loop_merge_one(x[b, :L], size[b, :L], mb, threshold=threshold, r=rb, cls_token=cls_token)
        n = ex.shape[0]
        assert int(out.lengths[b]) == n
        torch.testing.assert_close(out.x[b, :n].double(), ex, atol=atol, rtol=atol)
        torch.testing.assert_close(out.size[b, :n].double(), es)
        assert (out.size[b, n:] == 0).all() and (out.x[b, n:] == 0).all()
        expected_pos = torch.tensor([slot_of[int(s)] for s in pos_map[b]], dtype=torch.int32)
        assert torch.equal(out.pos_map[b], expected_pos)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 50, 63, 197])
@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("quantile", [None, 0.3, 0.8])
def test_threshold_merge_matches_loop(gen, n, cls_token, quantile):
    x = randn(2, n, 24, gen=gen, dtype=torch.float64)
    # Low-rank metric so that many pairs are similar and many merges happen.
    metric = randn(2, n, 3, gen=gen, dtype=torch.float64) @ randn(3, 16, gen=gen, dtype=torch.float64)
    x, size, lengths, pos_map = padded_state(list(x))
    size = size * torch.randint(1, 5, size.shape, generator=gen)  # tokens that already stand for several patches
    node_max, _ = bipartite_match(metric, lengths, cls_token=cls_token)
    thr = 0.5 if quantile is None else threshold_between_scores(node_max, quantile)
    out = dtome_merge(x, size, lengths, pos_map, metric, thr, cls_token=cls_token)
    check_against_loop(x, size, lengths, pos_map, metric, out, threshold=thr, cls_token=cls_token)


@pytest.mark.parametrize("cls_token", [True, False])
def test_merge_nothing_and_everything(gen, cls_token):
    x = randn(3, 40, 8, gen=gen)
    metric = randn(3, 4, 40, 16, gen=gen)
    x, size, lengths, pos_map = padded_state(list(x))
    none = dtome_merge(x, size, lengths, pos_map, metric, float("inf"), cls_token=cls_token)
    # Nothing merged (rule (a)): the state comes back unchanged, order included.
    assert torch.equal(none.lengths, lengths) and torch.equal(none.pos_map, pos_map)
    assert torch.equal(none.x, x) and torch.equal(none.size, size)
    everything = dtome_merge(x, size, lengths, pos_map, metric, -2.0, cls_token=cls_token)
    n_mergeable = 20 - (1 if cls_token else 0)
    assert (everything.lengths == 40 - n_mergeable).all()
    assert torch.equal(everything.size.sum(1), size.sum(1))  # no patch is lost
    check_against_loop(x, size, lengths, pos_map, metric, everything, threshold=-2.0, cls_token=cls_token, atol=1e-5)


def test_ties_go_to_lowest_b_and_threshold_is_strict():
    # One-hot metrics make every score exactly 0 or 1, so ties are exact.
    L, C = 9, 5
    rows = [0, 1, 1, 2, 1, 3, 4, 4, 2]  # A slots 0,2,4,6,8 -> keys 0,1,1,4,2; B slots -> 1,2,3,4
    metric = torch.nn.functional.one_hot(torch.tensor(rows), C).double()[None] * 3.0
    x = torch.randn(1, L, 6, dtype=torch.float64)
    x, size, lengths, pos_map = padded_state(list(x))
    _, node_idx = bipartite_match(metric, lengths, cls_token=False)
    # A slot 2 (key 1) matches B slot 1 (key 1): B index 0; A slot 4 likewise.
    assert node_idx[0, 1] == 0 and node_idx[0, 2] == 0
    # A slot 0 (key 0) scores 0 with every B: first B wins.
    assert node_idx[0, 0] == 0
    strict = dtome_merge(x, size, lengths, pos_map, metric, 1.0, cls_token=False)
    assert int(strict.lengths[0]) == L  # score == threshold does not merge
    merged = dtome_merge(x, size, lengths, pos_map, metric, 0.5, cls_token=False)
    check_against_loop(x, size, lengths, pos_map, metric, merged, threshold=0.5, cls_token=False)
    assert int(merged.lengths[0]) == L - 4  # A slots 2, 4 -> B0; 6 -> B3; 8 -> B1 (key 2)


def test_several_sources_into_one_destination(gen):
    # All A tokens share B0's key: every A merges into B0, size-weighted.
    C = 4
    metric = torch.zeros(1, 11, C, dtype=torch.float64)
    metric[0, :, 0] = 1.0
    metric[0, 3::2, 1] = 5.0  # other B tokens point elsewhere
    x = randn(1, 11, 3, gen=gen, dtype=torch.float64)
    x, size, lengths, pos_map = padded_state(list(x))
    size[0, :11] = torch.arange(1, 12, dtype=torch.float32)
    out = dtome_merge(x, size, lengths, pos_map, metric, 0.9, cls_token=True)
    a_sources = [2, 4, 6, 8, 10]
    members = [1] + a_sources
    w = size[0, members].double()
    expected = (x[0, members] * w[:, None]).sum(0) / w.sum()
    # New order: CLS, then B tokens 1,3,5,7,9 -> B0 sits at slot 1.
    assert int(out.lengths[0]) == 6
    torch.testing.assert_close(out.x[0, 1], expected)
    assert float(out.size[0, 1]) == float(w.sum())
    check_against_loop(x, size, lengths, pos_map, metric, out, threshold=0.9)


def test_batch_equals_each_image_alone(gen):
    lengths_list = [577, 1, 2, 64, 301]
    xs = [randn(L, 32, gen=gen) for L in lengths_list]
    ms = [randn(L, 2, gen=gen) @ randn(2, 16, gen=gen) + 0.3 * randn(L, 16, gen=gen) for L in lengths_list]
    x, size, lengths, pos_map = padded_state(xs, n0=577)
    metric = torch.zeros(len(xs), 577, 16)
    for b, m in enumerate(ms):
        metric[b, : m.shape[0]] = m
    metric[:, :, :] += torch.where(size[..., None] > 0, 0.0, 7.0)  # garbage in padding must not matter
    for kwargs in ({"threshold": 0.6}, {"r": 40}):
        batch = dtome_merge(x, size, lengths, pos_map, metric, **kwargs)
        for b, L in enumerate(lengths_list):
            alone = dtome_merge(x[b : b + 1, :L], size[b : b + 1, :L], lengths[b : b + 1], pos_map[b : b + 1], metric[b : b + 1, :L], **kwargs)
            n = int(alone.lengths[0])
            assert int(batch.lengths[b]) == n
            assert torch.equal(batch.pos_map[b], alone.pos_map[0])
            assert torch.equal(batch.size[b, :n], alone.size[0, :n])
            torch.testing.assert_close(batch.x[b, :n], alone.x[0, :n], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls_token", [True, False])
def test_fixed_r_matches_loop(gen, cls_token):
    xs = [randn(L, 16, gen=gen, dtype=torch.float64) for L in (30, 17, 5, 1)]
    x, size, lengths, pos_map = padded_state(xs)
    metric = randn(4, 2, 30, 8, gen=gen, dtype=torch.float64)
    for r in (0, 3, 8, 100):  # 100 exceeds what can merge: clamps to mergeable
        out = dtome_merge(x, size, lengths, pos_map, metric, r=r, cls_token=cls_token)
        check_against_loop(x, size, lengths, pos_map, metric, out, r=r, cls_token=cls_token)
    per_image = torch.tensor([4, 0, 2, 1])
    out = dtome_merge(x, size, lengths, pos_map, metric, r=per_image, cls_token=cls_token)
    check_against_loop(x, size, lengths, pos_map, metric, out, r=per_image, cls_token=cls_token)


def test_fixed_r_ties_prefer_lower_a_index():
    node_max = torch.tensor([[float("-inf"), 0.5, 0.9, 0.5, 0.5]])
    assert fixed_r_mask(node_max, 2).tolist() == [[False, True, True, False, False]]


def test_composition_over_layers_keeps_means_and_sizes(gen):
    """Merging only (no transform between blocks): every final token is the plain mean of
    the original patches that pos_map sends to it, and its size is their count."""
    B, N0, C = 3, 101, 12
    x0 = randn(B, N0, C, gen=gen, dtype=torch.float64)
    state = init_merge_state(x0, torch.tensor([101, 57, 12], dtype=torch.int32))
    for layer in range(6):
        metric = randn(B, state.x.shape[1], 6, gen=gen, dtype=torch.float64)
        state = dtome_merge(*state, metric, 0.2)
    for b in range(B):
        L0 = [101, 57, 12][b]
        for slot in range(int(state.lengths[b])):
            members = (state.pos_map[b, :L0] == slot).nonzero().flatten()
            assert float(state.size[b, slot]) == members.numel() > 0
            torch.testing.assert_close(state.x[b, slot], x0[b, members].mean(0))


def test_non_contiguous_and_low_precision(gen):
    base = randn(2, 64, 80, gen=gen)
    x = base.transpose(1, 2).contiguous().transpose(1, 2)[:, ::2]  # strided view
    metric = randn(2, 64, 2, 16, gen=gen).permute(0, 2, 1, 3)[:, :, ::2]  # [B, H, N, Dh] non-contiguous
    assert not x.is_contiguous() and not metric.is_contiguous()
    x, size, lengths, pos_map = x, torch.ones(2, 32), torch.tensor([32, 20], dtype=torch.int32), torch.arange(32).repeat(2, 1).int()
    size[1, 20:] = 0
    ref = dtome_merge(x.double(), size, lengths, pos_map, metric, 0.1)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = dtome_merge(x.to(dtype), size, lengths, pos_map, metric, 0.1)
        assert out.x.dtype == dtype and out.lengths.dtype == lengths.dtype and out.pos_map.dtype == torch.int32
        assert torch.equal(out.lengths, ref.lengths) and torch.equal(out.pos_map, ref.pos_map)
        tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(out.x.double(), ref.x, atol=tol, rtol=tol)


def test_no_host_sync_meta_tensors():
    """On meta tensors (shapes only, no data) any .item() or data-dependent shape
    would raise: the op must run and keep its fixed-capacity shapes."""
    x = torch.empty(4, 577, 1024, device="meta", dtype=torch.bfloat16)
    size = torch.empty(4, 577, device="meta")
    lengths = torch.empty(4, device="meta", dtype=torch.int32)
    pos_map = torch.empty(4, 577, device="meta", dtype=torch.int32)
    metric = torch.empty(4, 16, 577, 64, device="meta", dtype=torch.bfloat16)
    for kwargs in ({"threshold": 0.9}, {"threshold": torch.tensor(0.9, device="meta")}, {"r": 21}, {"r": 21, "cls_token": False}):
        out = dtome_merge(x, size, lengths, pos_map, metric, **kwargs)
        assert out.x.shape == x.shape and out.x.dtype == x.dtype
        assert out.size.shape == size.shape and out.lengths.shape == (4,) and out.pos_map.shape == (4, 577)


def test_merge_tokens_ignores_masks_on_padding(gen):
    x = randn(1, 6, 4, gen=gen)
    size = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    lengths = torch.tensor([4], dtype=torch.int32)
    pos_map = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    mask = torch.ones(1, 3, dtype=torch.bool)  # asks to merge the padding A slot 4 too
    out = merge_tokens(init_merge_state(x, lengths)._replace(size=size, pos_map=pos_map), torch.zeros(1, 3, dtype=torch.long), mask)
    assert int(out.lengths[0]) == 2 and float(out.size.sum()) == 4.0


# --- Order rules over chains of blocks (docs/design.md §1.1) -----------------------


def loop_chain(x, size, lengths, pos_map, metrics, mode, cls_token):
    """The slow loop chained over blocks, image by image: per block the
    (x, size, pos_map) of every image. Each block reads the same metric slots
    as the batched op, so any difference in order shows up downstream."""
    per_block = [[] for _ in metrics]
    for b in range(x.shape[0]):
        L = int(lengths[b])
        xb, sb, pos = x[b, :L], size[b, :L], [int(s) for s in pos_map[b]]
        for block, metric in enumerate(metrics):
            kwargs = chain_kwargs(block, mode)
            if "r" in kwargs:
                kwargs["r"] = int(kwargs["r"][b])
            xb, sb, slot_of = loop_merge_one(xb, sb, metric[b, : xb.shape[0]], **kwargs, cls_token=cls_token)
            pos = [slot_of[s] if s >= 0 else -1 for s in pos]
            per_block[block].append((xb, sb, pos))
    return per_block


@pytest.mark.parametrize("mode", ["threshold", "r"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_chain_of_blocks_matches_loop(gen, mode, cls_token):
    state, metrics = chain_batch(gen, 64, 12, torch.float64)
    outs = run_chain(state, metrics, mode, cls_token, "torch")
    expected = loop_chain(*state, metrics, mode, cls_token)
    for out, per_image in zip(outs, expected):
        for b, (ex, es, pos) in enumerate(per_image):
            n = ex.shape[0]
            assert int(out.lengths[b]) == n
            assert torch.equal(out.pos_map[b], torch.tensor(pos, dtype=torch.int32))
            torch.testing.assert_close(out.size[b, :n].double(), es)
            torch.testing.assert_close(out.x[b, :n], ex, atol=1e-12, rtol=1e-12)
    assert_chain_matches_reference(gen, 64, 12, torch.float64, mode, cls_token, "torch")  # sanity of the helper


@pytest.mark.parametrize("cls_token", [True, False])
def test_image_merging_nothing_is_unchanged(gen, cls_token):
    args = untouched_image_batch(gen, 30, 8, torch.float32)
    assert_untouched_image_unchanged(args, "torch", threshold=0.5, cls_token=cls_token)
    assert_untouched_image_unchanged(args, "torch", r=torch.tensor([0, 4]), cls_token=cls_token)


def test_unmerged_a_tokens_follow_score_order_without_cls():
    assert_score_order("torch")
    state, metric, expected = score_tie_case()
    node_max, node_idx = bipartite_match(metric, state[2], cls_token=False)
    assert node_max[0].tolist() == pytest.approx([0.8, 1.0, 0.8, 0.96, 0.0])
    assert node_max[0, 0] == node_max[0, 2]  # an exact tie, broken by position


def test_merge_tokens_needs_scores_without_cls(gen):
    state, node_idx, mask, node_max = random_merge_step(gen)
    with pytest.raises(ValueError, match="needs node_max"):
        merge_tokens(state, node_idx, mask, cls_token=False)
    out = merge_tokens(state, node_idx, mask, node_max, cls_token=False)
    assert torch.equal(out.x[1], state.x[1]) and torch.equal(out.pos_map[1], state.pos_map[1])
