"""C++ DToMe merge (backend="cpp") against the reference (backend="torch")."""

import pytest
import torch

from conftest import needs_extension
from merge_cases import (
    assert_batch_equals_alone,
    assert_chain_matches_reference,
    assert_same_merge,
    assert_score_order,
    assert_untouched_image_unchanged,
    mixed_batch,
    random_merge_step,
    untouched_image_batch,
)

import dymu_kernels
from dymu_kernels import _ext
from dymu_kernels.reference import init_merge_state, merge_tokens


@pytest.fixture(autouse=True)
def _extension():
    """Every test here needs the extension: a missing one fails them (skips only under DYMU_NO_EXT=1)."""
    needs_extension()


@pytest.mark.parametrize("N", [1, 5, 50, 577, 1025])
@pytest.mark.parametrize("C", [64, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("cls_token", [True, False])
def test_cpp_merge_matches_reference(gen, N, C, dtype, cls_token):
    x, size, lengths, pos_map, metric = mixed_batch(gen, N, C, dtype)
    for kwargs in ({"threshold": 0.05}, {"threshold": 0.9}, {"r": 16}):
        ref = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, **kwargs, cls_token=cls_token, backend="torch")
        out = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, **kwargs, cls_token=cls_token, backend="cpp")
        assert_same_merge(out, ref, dtype)


def test_cpp_merge_nothing_is_bit_exact_and_everything_matches(gen):
    x, size, lengths, pos_map, metric = mixed_batch(gen, 197, 128, torch.bfloat16)
    none_ref = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, float("inf"), backend="torch")
    none = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, float("inf"), backend="cpp")
    assert torch.equal(none.x, none_ref.x) and torch.equal(none.lengths, lengths)
    all_ref = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, -2.0, backend="torch")
    everything = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, -2.0, backend="cpp")
    assert_same_merge(everything, all_ref, torch.bfloat16)


def test_cpp_merge_ties_and_several_sources():
    metric = torch.nn.functional.one_hot(torch.tensor([[0, 1, 1, 2, 1, 3, 4, 4, 2]]), 5).float()
    x = torch.randn(1, 9, 16)
    state = init_merge_state(x)
    for thr in (1.0, 0.5, -1.0):
        ref = dymu_kernels.dtome_merge(*state, metric, thr, cls_token=False, backend="torch")
        out = dymu_kernels.dtome_merge(*state, metric, thr, cls_token=False, backend="cpp")
        assert_same_merge(out, ref, torch.float32)


def test_cpp_merge_non_contiguous_and_deterministic(gen):
    x, size, lengths, pos_map, metric = mixed_batch(gen, 101, 64, torch.float32)
    xn = x.transpose(1, 2).contiguous().transpose(1, 2)
    mn = metric.transpose(2, 3).contiguous().transpose(2, 3)
    assert not xn.is_contiguous() and not mn.is_contiguous()
    ref = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, 0.1, backend="torch")
    a = dymu_kernels.dtome_merge(xn, size, lengths, pos_map, mn, 0.1, backend="cpp")
    b = dymu_kernels.dtome_merge(xn, size, lengths, pos_map, mn, 0.1, backend="cpp")
    assert_same_merge(a, ref, torch.float32)
    assert torch.equal(a.x, b.x)


def test_cpp_merge_batch_equals_alone(gen):
    assert_batch_equals_alone(mixed_batch(gen, 577, 64, torch.float32, B=4), 0.2, "cpp")


def test_cpp_backend_errors(gen):
    x, size, lengths, pos_map, metric = mixed_batch(gen, 9, 8, torch.float32)
    with pytest.raises(ValueError, match="dtome_merge cannot run with backend='cpp': cpp: inputs are on meta"):
        dymu_kernels.dtome_merge(x.to("meta"), size.to("meta"), lengths.to("meta"), pos_map.to("meta"), metric.to("meta"), 0.5, backend="cpp")
    C = _ext.extension()
    with pytest.raises(RuntimeError, match="node_idx must be"):
        C.merge_tokens(x, size, lengths, pos_map, torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.bool),
                       torch.zeros(3, 4), True)
    idx, mask = torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="node_max must be a float tensor"):
        C.merge_tokens(x, size, lengths, pos_map, idx, mask, torch.zeros(3, 4), False)
    mask[0, 1] = True
    with pytest.raises(RuntimeError, match="node_max must not be NaN"):
        C.merge_tokens(x, size, lengths, pos_map, idx, mask, torch.full((3, 5), float("nan")), False)


# --- Order rules (docs/design.md §1.1) ---------------------------------------------


@pytest.mark.parametrize("mode", ["threshold", "r"])
@pytest.mark.parametrize("cls_token", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_chain_of_blocks_matches_reference(gen, mode, cls_token, dtype):
    assert_chain_matches_reference(gen, 101, 48, dtype, mode, cls_token, "cpp")


@pytest.mark.parametrize("cls_token", [True, False])
def test_cpp_image_merging_nothing_is_unchanged(gen, cls_token):
    args = untouched_image_batch(gen, 30, 8, torch.bfloat16)
    assert_untouched_image_unchanged(args, "cpp", threshold=0.5, cls_token=cls_token)
    assert_untouched_image_unchanged(args, "cpp", r=torch.tensor([0, 4]), cls_token=cls_token)


def test_cpp_unmerged_a_tokens_follow_score_order():
    assert_score_order("cpp")


@pytest.mark.parametrize("cls_token", [True, False])
def test_cpp_merge_step_identical_to_reference_with_tied_scores(gen, cls_token):
    state, node_idx, mask, node_max = random_merge_step(gen)
    ref = merge_tokens(state, node_idx, mask, node_max, cls_token=cls_token)
    out = _ext.extension().merge_tokens(*state, node_idx, mask, node_max, cls_token)
    assert_same_merge(type(ref)(*out), ref, torch.float32)


def test_cpp_merge_op_passes_opcheck_and_compiles(gen):
    """The C++ merge step is ``torch.ops.dymu_kernels.merge_tokens_cpp``: its
    fake matches the real outputs (shapes, dtypes, strides), so
    torch.compile traces a merging block without a graph break."""
    from dymu_kernels.reference.dtome import bipartite_match, select_merges

    x, size, lengths, pos_map, metric = mixed_batch(gen, 77, 32, torch.float32)
    node_max, node_idx = bipartite_match(metric, lengths, cls_token=True)
    mask = select_merges(node_max, 0.2, None)
    args = (x, size, lengths, pos_map, node_idx, mask, node_max, True)
    torch.library.opcheck(torch.ops.dymu_kernels.merge_tokens_cpp.default, args)
    expected = dymu_kernels.dtome_merge(x, size, lengths, pos_map, metric, 0.2, backend="cpp")
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: dymu_kernels.dtome_merge(*a, 0.2, backend="cpp"), fullgraph=True)
    got = compiled(x, size, lengths, pos_map, metric)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
