"""Bad input gets a clear TypeError/ValueError naming the argument."""

import pytest
import torch

import dymu_kernels
from dymu_kernels import set_debug
from dymu_kernels.reference import (
    init_merge_state,
    proportional_attention,
    segment_mean,
    unmerge,
    vtu_attention_decomposed,
    vtu_attention_expand,
)


def state(B=2, N=9, C=4):
    x = torch.randn(B, N, C)
    s = init_merge_state(x)
    return dict(x=s.x, size=s.size, lengths=s.lengths, pos_map=s.pos_map, metric=torch.randn(B, N, 8))


def merge(**overrides):
    args = state()
    args.update(overrides)
    threshold = args.pop("threshold", 0.5)
    r = args.pop("r", None)
    if r is not None:
        threshold = None
    return dymu_kernels.dtome_merge(**args, threshold=threshold, r=r)


DTOME_CASES = [
    (dict(x=torch.randn(9, 4)), ValueError, "x must have 3 dimensions"),
    (dict(x=torch.randn(2, 9, 4).long()), TypeError, "x must have dtype in"),
    (dict(x=[1, 2]), TypeError, "x must be a torch.Tensor"),
    (dict(size=torch.ones(2, 8)), ValueError, "size must have shape \\[2, 9\\]"),
    (dict(lengths=torch.tensor([9, 9])), None, None),  # int64 lengths are fine
    (dict(lengths=torch.tensor([9.0, 9.0])), TypeError, "lengths must have dtype in"),
    (dict(lengths=torch.tensor([9, 10], dtype=torch.int32)), ValueError, "lengths values must lie in \\[0, 9\\]"),
    (dict(pos_map=torch.full((2, 9), 9, dtype=torch.int32)), ValueError, "pos_map values must lie in \\[-1, 8\\]"),
    (dict(pos_map=torch.zeros(3, 9, dtype=torch.int32)), ValueError, "pos_map must have batch size 2"),
    (dict(metric=torch.randn(2, 8, 8)), ValueError, "metric must be \\[B, N, Dm\\] or \\[B, H, N, Dh\\] with B=2, N=9"),
    (dict(metric=torch.full((2, 9, 8), float("nan"))), ValueError, "metric must be finite"),
    (dict(metric=torch.randn(2, 9, 8).index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(float("inf")))), ValueError, "metric must be finite"),
    (dict(metric=torch.randn(2, 9, 8).to("meta")), ValueError, "metric is on meta but x is on cpu"),
    (dict(threshold=float("nan")), ValueError, "threshold must not be NaN"),
    (dict(threshold="0.5"), TypeError, "threshold must be a float"),
    (dict(threshold=torch.tensor([0.5, 0.5])), ValueError, "threshold must be a scalar"),
    (dict(threshold=None), ValueError, "give exactly one of threshold"),
    (dict(r=-1), ValueError, "r must be >= 0"),
    (dict(r=2.5), TypeError, "r must be an int or an int tensor"),
    (dict(r=torch.tensor([1, 2, 3])), ValueError, "r must have shape \\[2\\]"),
]


@pytest.mark.parametrize("overrides,exc,match", DTOME_CASES)
def test_dtome_merge_errors(overrides, exc, match):
    if exc is None:
        merge(**overrides)
        return
    with pytest.raises(exc, match=match):
        merge(**overrides)


def vtu_args(B=2, H=4, H_kv=2, n_un=5, N=8, D=16):
    m = torch.randint(0, n_un, (B, N), dtype=torch.int32)
    return dict(
        q=torch.randn(B, H, n_un, D), k=torch.randn(B, H_kv, n_un, D), v=torch.randn(B, H_kv, n_un, D),
        merge_map=m, cos=torch.ones(N, D), sin=torch.zeros(N, D),
    )


VTU_CASES = [
    (dict(q=torch.randn(2, 5, 16)), ValueError, "q must have 4 dimensions"),
    (dict(k=torch.randn(2, 2, 5, 16).double()), TypeError, "k must have dtype in \\(float32\\)"),
    (dict(k=torch.randn(2, 3, 5, 16), v=torch.randn(2, 3, 5, 16)), ValueError, "k has 3 heads, which must divide the 4 heads of q"),
    (dict(v=torch.randn(2, 2, 6, 16)), ValueError, "v must have shape \\[2, 2, 5, 16\\]"),
    (dict(q=torch.randn(2, 4, 5, 15), k=torch.randn(2, 2, 5, 15), v=torch.randn(2, 2, 5, 15)), ValueError, "head dim D must be even"),
    (dict(merge_map=torch.zeros(2, 8)), TypeError, "merge_map must have dtype in"),
    (dict(merge_map=torch.full((2, 8), 5, dtype=torch.int32)), ValueError, "merge_map values must lie in \\[-1, 4\\]"),
    (dict(merge_map=torch.full((2, 8), -2, dtype=torch.int32)), ValueError, "merge_map values must lie in \\[-1, 4\\]"),
    (dict(merge_map=torch.zeros(3, 8, dtype=torch.int32)), ValueError, "merge_map must have batch size 2"),
    (dict(cos=torch.ones(7, 16)), ValueError, "cos must have shape \\[8, 16\\]"),
    (dict(sin=torch.zeros(3, 8, 16)), ValueError, "sin batch size must be 1 or 2"),
    (dict(sin=torch.zeros(8, 16, dtype=torch.int64)), TypeError, "sin must have dtype in"),
    (dict(cos=torch.ones(8, 16, device="meta")), ValueError, "cos is on meta but q is on cpu"),
    (dict(cos=torch.ones(8, 12), sin=torch.zeros(8, 12)), ValueError,
     "cos/sin have width 12, narrower than the head dim D=16: ambiguous without rotary_dim"),
    (dict(cos=torch.ones(8, 12)), ValueError, "cos and sin must have the same width, got 12 and 16"),
    (dict(cos=torch.ones(8, 8)), ValueError, "cos and sin must have the same width, got 8 and 16"),
]


@pytest.mark.parametrize("fn", [vtu_attention_expand, vtu_attention_decomposed])
@pytest.mark.parametrize("overrides,exc,match", VTU_CASES)
def test_vtu_reference_errors(fn, overrides, exc, match):
    args = vtu_args()
    args.update(overrides)
    with pytest.raises(exc, match=match):
        fn(**args)


def test_vtu_scale_and_table_format_errors():
    with pytest.raises(ValueError, match="scale must be a positive float"):
        vtu_attention_expand(**vtu_args(), scale=-1.0)
    args = vtu_args()
    args["cos"] = torch.rand(8, 16)  # halves differ: not HF format
    with pytest.raises(ValueError, match="cos must repeat its first half"):
        vtu_attention_decomposed(**args)


def test_segment_and_unmerge_errors():
    with pytest.raises(ValueError, match="index has 4 positions but src has 5 rows"):
        segment_mean(torch.randn(1, 5, 2), torch.zeros(1, 4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="num_segments must be a non-negative int"):
        segment_mean(torch.randn(1, 5, 2), torch.zeros(1, 5, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="index values must lie in \\[-1, 1\\]"):
        segment_mean(torch.randn(1, 5, 2), torch.full((1, 5), 2), 2)
    with pytest.raises(ValueError, match="merge_map has batch size 2 but the input has 1"):
        unmerge(torch.randn(1, 3, 2), torch.zeros(2, 4, dtype=torch.long))


def test_proportional_attention_errors():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="size must have shape \\[1, 5\\]"):
        proportional_attention(q, q, q, torch.ones(1, 4))
    with pytest.raises(TypeError, match="k must have dtype in \\(float32\\)"):
        proportional_attention(q, q.double(), q, torch.ones(1, 5))


def test_value_checks_on_gpu_tensors_follow_debug_mode(monkeypatch):
    """Value checks cost a host sync on GPU, so they run there only in debug mode.
    Meta tensors stand in for GPU tensors: they are not CPU tensors either."""
    from dymu_kernels import _validation

    bad = torch.full((1, 4), 7, dtype=torch.long, device="meta")
    _validation.check_index_range("merge_map", bad, -1, 3)  # skipped: not checkable without a sync
    set_debug(True)
    try:
        assert _validation.values_checkable(bad)
    finally:
        set_debug(False)
    assert not _validation.values_checkable(bad)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("mode", ["threshold", "r"])
def test_nonfinite_metric_rows_merge_nothing_when_serving(backend, mode, gen):
    """Inside ``unmerged_if_nonfinite`` (what the vLLM plugin encodes under) an
    image whose metric holds NaN or inf merges nothing in that block — its
    state comes back as it went in — and the other images merge exactly as
    alone; the rows are counted. Outside it the same call raises."""
    from conftest import TRITON_DEVICE, needs_extension, randn

    from dymu_kernels.reference.dtome import unmerged_if_nonfinite

    if backend == "cpp":
        needs_extension()
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    B, N, C = 3, 21, 8
    state = dymu_kernels.init_merge_state(randn(B, N, C, gen=gen).to(device))
    metric = randn(B, N, C, gen=gen).to(device)
    metric[1, 6, 2] = float("nan")
    metric[2, 3, 0] = float("inf")
    sel = dict(threshold=-0.5) if mode == "threshold" else dict(r=4)  # both merge every clean image
    with pytest.raises(ValueError, match="metric must be finite"):
        dymu_kernels.dtome_merge(*state, metric, backend=backend, **sel)
    with unmerged_if_nonfinite() as rows:
        out = dymu_kernels.dtome_merge(*state, metric, backend=backend, **sel)
    assert rows() == 2
    alone = dymu_kernels.dtome_merge(*(t[:1] for t in state), metric[:1], backend=backend, **sel)
    assert int(alone.lengths[0]) < N  # the clean image merged
    for got, want in zip(out, state):
        torch.testing.assert_close(got[1:], want[1:], rtol=0, atol=0)  # unmerged: bit for bit
    for got, want in zip(out, alone):
        torch.testing.assert_close(got[:1], want, rtol=0, atol=0)
