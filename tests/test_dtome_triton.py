"""Triton DToMe merge against the reference (interpreter on CPU, real kernels on a GPU)."""

import pytest
import torch

from conftest import TRITON_DEVICE
from merge_cases import assert_batch_equals_alone, assert_same_merge, threshold_with_margin
from merge_cases import assert_chain_matches_reference, assert_score_order, assert_untouched_image_unchanged
from merge_cases import random_merge_step, untouched_image_batch
from merge_cases import mixed_batch as _mixed_batch

import dymu_kernels
from dymu_kernels.reference import MergeState, init_merge_state, merge_tokens


def mixed_batch(gen, N, C, dtype, B=3):
    return _mixed_batch(gen, N, C, dtype, B, device=TRITON_DEVICE)

pytest.importorskip("triton")

def run_both(args, **kwargs):
    ref = dymu_kernels.dtome_merge(*[a.cpu() for a in args], **kwargs, backend="torch")
    out = dymu_kernels.dtome_merge(*args, **kwargs, backend="triton")
    return out, ref


SHAPES = [(5, 1024), (50, 256), (577, 64), (1025, 64)]


# The half dtypes at the two short shapes (their loads, fp32 accumulation and stores are the same code at any
# length); the long ones (several match tiles; 1025: the plan's tiles, B=2) in fp32: the interpreter runs
# them for seconds per call.
DTYPE_SHAPES = [(N, C, dtype) for N, C in SHAPES for dtype in (torch.float32, torch.float16, torch.bfloat16)
                if N <= 100 or dtype == torch.float32]


@pytest.mark.parametrize("N,C,dtype", DTYPE_SHAPES)
@pytest.mark.parametrize("cls_token", [True, False])
def test_triton_threshold_merge_matches_reference(gen, N, C, dtype, cls_token):
    args = mixed_batch(gen, N, C, dtype, B=2 if N > 600 else 3)
    thr = threshold_with_margin(args[4], args[2], 0.5)
    out, ref = run_both(args, threshold=thr, cls_token=cls_token)
    assert_same_merge(out, ref, dtype)


# 161 tokens: three A tiles of 32 and two B chunks of 64 in the match (577 tokens, 36 s in the interpreter, runs
# r in the plan-tiles test below).
@pytest.mark.parametrize("N,C", [*SHAPES[:2], (161, 64)])
def test_triton_fixed_r_and_extremes(gen, N, C):
    args = mixed_batch(gen, N, C, torch.float32)
    for kwargs in ({"r": 16}, {"r": 0}, {"threshold": float("inf")}, {"threshold": -2.0}):
        out, ref = run_both(args, **kwargs)
        assert_same_merge(out, ref, torch.float32)
    none = dymu_kernels.dtome_merge(*args, threshold=float("inf"), backend="triton")
    ref_none = dymu_kernels.dtome_merge(*[a.cpu() for a in args], threshold=float("inf"), backend="torch")
    assert torch.equal(none.x.cpu(), ref_none.x)  # nothing merged: rows moved bit-exactly


@pytest.mark.parametrize("D", [200, 1024])
def test_triton_wide_metric_in_feature_chunks(gen, D):
    # Metrics wider than one 64-feature chunk (e.g. the hidden states
    # themselves, one "head" of C features) are matched chunk by chunk.
    x, size, lengths, pos_map, _ = mixed_batch(gen, 77, 32, torch.float32, B=2)
    metric = torch.randn(2, 1, 77, D, generator=gen).to(TRITON_DEVICE)
    metric[1] = metric[1, :, :1] + 0.3 * metric[1]  # one image far more redundant
    thr = threshold_with_margin(metric, lengths, 0.5)
    out, ref = run_both([x, size, lengths, pos_map, metric], threshold=thr)
    assert_same_merge(out, ref, torch.float32)
    assert 0 < int(ref.lengths.min()) < 77  # something merged, not everything


def test_triton_ties_and_several_sources():
    metric = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2, 1, 3, 4, 4, 2]]), 5).float() * 3
    x = torch.randn(1, 9, 16)
    state = [t.to(TRITON_DEVICE) for t in init_merge_state(x)]
    for thr in (1.0, 0.5, -1.0):  # score == threshold does not merge
        out, ref = run_both(state + [metric.to(TRITON_DEVICE)], threshold=thr, cls_token=False)
        assert_same_merge(out, ref, torch.float32)
    # One giant group: every A token merges into B0 (identical keys everywhere).
    same = torch.ones(1, 37, 8)
    x = torch.randn(1, 37, 16)
    out, ref = run_both([t.to(TRITON_DEVICE) for t in init_merge_state(x)] + [same.to(TRITON_DEVICE)], threshold=0.5)
    assert int(out.lengths[0]) == 19 and float(out.size[0, 1]) == 19.0  # CLS kept; B0 got 17 A tokens
    assert_same_merge(out, ref, torch.float32)


def test_triton_non_contiguous_and_deterministic(gen):
    x, size, lengths, pos_map, metric = mixed_batch(gen, 101, 96, torch.bfloat16)
    xn = x.transpose(1, 2).contiguous().transpose(1, 2)
    mn = metric.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xn.is_contiguous() and not mn.is_contiguous()
    a, ref = run_both([xn, size, lengths, pos_map, mn], threshold=0.2)
    b = dymu_kernels.dtome_merge(xn, size, lengths, pos_map, mn, 0.2, backend="triton")
    assert_same_merge(a, ref, torch.bfloat16)
    assert torch.equal(a.x, b.x) and torch.equal(a.size, b.size)


def test_triton_batch_equals_alone(gen):
    assert_batch_equals_alone(mixed_batch(gen, 200, 64, torch.float32), 0.2, "triton")


def test_triton_device_threshold_tensor(gen):
    args = mixed_batch(gen, 50, 64, torch.float32)
    thr = threshold_with_margin(args[4], args[2], 0.3)
    out = dymu_kernels.dtome_merge(*args, threshold=torch.tensor(thr, device=TRITON_DEVICE), backend="triton")
    _, ref = run_both(args, threshold=thr)
    assert_same_merge(out, ref, torch.float32)


def test_triton_backend_errors(gen):
    args = mixed_batch(gen, 9, 8, torch.float32)
    with pytest.raises(ValueError, match="triton: dtype torch.float64 is not supported"):
        dymu_kernels.dtome_merge(args[0].double(), *args[1:], threshold=0.5, backend="triton")
    meta = [a.to("meta") for a in args]
    with pytest.raises(ValueError, match="triton: inputs are on meta but it runs on cuda"):
        dymu_kernels.dtome_merge(*meta, threshold=0.5, backend="triton")


def test_auto_never_picks_the_interpreter(gen, monkeypatch):
    from dymu_kernels.backends import select_backend, TRITON, CPP, TORCH

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select_backend("dtome_merge", "auto", (TRITON, CPP, TORCH), torch.device("cpu"), torch.float32) in ("cpp", "torch")
    assert select_backend("dtome_merge", "triton", (TRITON, CPP, TORCH), torch.device("cpu"), torch.float32) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="triton: inputs are on cpu but it runs on cuda \\(or under TRITON_INTERPRET=1\\)"):
        select_backend("dtome_merge", "triton", (TRITON, CPP, TORCH), torch.device("cpu"), torch.float32)


# --- Order rules (docs/design.md §1.1) ---------------------------------------------


@pytest.mark.parametrize("mode", ["threshold", "r"])
@pytest.mark.parametrize("cls_token", [True, False])
def test_triton_chain_of_blocks_matches_reference(gen, mode, cls_token):
    assert_chain_matches_reference(gen, 101, 48, torch.float32, mode, cls_token, "triton", device=TRITON_DEVICE)


def test_triton_chain_bf16(gen):
    assert_chain_matches_reference(gen, 64, 32, torch.bfloat16, "threshold", False, "triton", device=TRITON_DEVICE)


@pytest.mark.parametrize("cls_token", [True, False])
def test_triton_image_merging_nothing_is_unchanged(gen, cls_token):
    args = untouched_image_batch(gen, 30, 8, torch.bfloat16, device=TRITON_DEVICE)
    assert_untouched_image_unchanged(args, "triton", threshold=0.5, cls_token=cls_token)
    r = torch.tensor([0, 4], device=TRITON_DEVICE)
    assert_untouched_image_unchanged(args, "triton", r=r, cls_token=cls_token)


def test_triton_unmerged_a_tokens_follow_score_order():
    assert_score_order("triton", TRITON_DEVICE)


@pytest.mark.parametrize("cls_token", [True, False])
def test_triton_merge_step_identical_to_reference_with_tied_scores(gen, cls_token):
    from dymu_kernels.ops import dtome_triton

    state, node_idx, mask, node_max = random_merge_step(gen)
    ref = merge_tokens(state, node_idx, mask, node_max, cls_token=cls_token)
    dev = [t.to(TRITON_DEVICE) for t in (*state, node_idx, mask, node_max)]
    out = dtome_triton.merge_tokens(MergeState(*dev[:4]), *dev[4:], cls_token=cls_token)
    assert_same_merge(out, ref, torch.float32)
    with pytest.raises(ValueError, match="needs node_max"):
        dtome_triton.merge_tokens(MergeState(*dev[:4]), dev[4], dev[5], cls_token=False)


@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("mode", [dict(threshold=None), dict(r=40), dict(threshold=float("inf"))])
def test_triton_plan_in_several_tiles_matches_reference(gen, monkeypatch, cls_token, mode):
    """Images longer than one plan tile (here forced: 64 A slots a tile, so a
    577-token image runs in 5): kept A tokens ranked across tiles, rule (a)
    (nothing merged: unchanged) and rule (b) (score order) over the whole
    image, padded images in the batch; equal to the reference."""
    from dymu_kernels.ops import dtome_triton

    monkeypatch.setattr(dtome_triton, "PLAN_BLOCK_MAX", 64)
    assert dtome_triton.plan_tiles(289) == (64, 5)
    args = mixed_batch(gen, 577, 32, torch.float32, B=3)
    kwargs = dict(mode)
    if "threshold" in kwargs and kwargs["threshold"] is None:
        kwargs["threshold"] = threshold_with_margin(args[4], args[2], 0.5)
    out, ref = run_both(args, cls_token=cls_token, **kwargs)
    assert_same_merge(out, ref, torch.float32)
