"""Micro-benchmarks of the CPU backends ("cpp" vs "torch") at LLaVA-like shapes.

Each test times one op with pytest-benchmark (``benchmark.pedantic``: one
warm-up round, then ``ROUNDS`` timed rounds of one call each) and then checks
the timed call's result against :mod:`dymu_kernels.reference` on fresh random
data, so every benchmark is also a correctness test. They run in the normal
``python3 -m pytest -q`` (a few seconds in all) and with
``--benchmark-disable`` (one call each, checked, not timed).

See the timing table (cpp and torch side by side per group: median, IQR, ...)::

    python3 -m pytest tests/test_micro_benchmarks.py --benchmark-only

and save the rows with ``--benchmark-json=benchmarks/results/micro_cpu.json``.

No test asserts a time: CPU timings vary with the machine and its load.
Speed claims live in benchmarks/ (scripts and their saved results), not in
assertions here. Triton is not benchmarked here (on a CPU it only runs in its
slow interpreter).
"""

import pytest
import torch

from conftest import randn
from merge_cases import assert_same_merge, threshold_with_margin
from slow_reference import loop_merge_one
from vtu_cases import check_fa_rule, make_inputs
from vtu_plain import plain_vtu_attention, plain_vtu_decode

import dymu_kernels
from dymu_kernels import _ext
from dymu_kernels import reference as ref

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark not installed (pip install -e '.[test]')")

ROUNDS = 20  # timed samples per benchmark (median and IQR need >= 3)

needs_ext = pytest.mark.skipif(_ext.extension() is None, reason="C++ extension not built")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "torch"]

# LLaVA-1.5 (CLIP ViT-L/14-336): 577 tokens, width 1024, 16 heads of 64.
MERGE_B, MERGE_N, MERGE_C, MERGE_HEADS, MERGE_DH = 2, 577, 1024, 16, 64
# Language model prefill over a text/image/text map: 642 positions, ~165 unique tokens.
VTU_H, VTU_H_KV, VTU_N, VTU_D = 8, 2, 642, 64
SEG_S = 160


def timed(benchmark, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` timed over ROUNDS rounds; returns its result."""
    return benchmark.pedantic(fn, args=args, kwargs=kwargs, rounds=ROUNDS, iterations=1, warmup_rounds=1)


# --- DToMe: one CLIP block's threshold merge ------------------------------------


@pytest.mark.benchmark(group=f"dtome_merge B={MERGE_B} N={MERGE_N} C={MERGE_C} fp32")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_dtome_merge(benchmark, gen, backend):
    x = randn(MERGE_B, MERGE_N, MERGE_C, gen=gen)
    state = dymu_kernels.init_merge_state(x)
    # Keys with a shared direction per image (like CLIP keys), so scores spread out.
    metric = randn(MERGE_B, MERGE_HEADS, MERGE_N, MERGE_DH, gen=gen)
    metric += randn(MERGE_B, MERGE_HEADS, 1, MERGE_DH, gen=gen)
    # About 40% of the A tokens merge; the threshold sits between two scores.
    threshold = threshold_with_margin(metric, state.lengths, 0.6)
    benchmark.extra_info["shape"] = f"x {list(x.shape)}, metric {list(metric.shape)}"

    out = timed(benchmark, dymu_kernels.dtome_merge, *state, metric, threshold, backend=backend)

    expected = ref.dtome_merge(*state, metric, threshold)
    assert_same_merge(out, expected, torch.float32)
    assert (expected.lengths < MERGE_N).all() and (expected.lengths > MERGE_N // 2).all()  # really merged
    # The torch backend *is* the reference: also check against the independent
    # per-image loop (tests/slow_reference.py), sharing no code with either.
    for b in range(MERGE_B):
        ex, es, slot_of = loop_merge_one(x[b], state.size[b], metric[b], threshold=threshold)
        n = ex.shape[0]
        assert int(out.lengths[b]) == n
        torch.testing.assert_close(out.x[b, :n].double(), ex, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.size[b, :n].double(), es)
        assert torch.equal(out.pos_map[b].long(), torch.tensor([slot_of[int(t)] for t in state.pos_map[b]]))


# --- VTU attention: prefill and one decode step ----------------------------------


def vtu_prefill_inputs(gen):
    """float32 ``q, k, v [1, H(_kv), N_un, D]``, a text/image/text merge map ``[1, N]``, cos/sin."""
    q, k, v, merge_map, cos, sin = make_inputs("text_image_text", gen, torch.float32, B=1, H=VTU_H,
                                               H_kv=VTU_H_KV, N=VTU_N, D=VTU_D)
    return [t.float() for t in (q, k, v)], merge_map, [t.float() for t in (cos, sin)]


def assert_fa_close(reference, out, q, k, v, merge_map, cos, sin):
    """fp32 ``out`` against ``reference`` by FlashAttention's rule (fp64 exact, fp32 baseline)."""
    assert out.shape == q.shape and out.dtype == torch.float32
    exact = reference(q.double(), k.double(), v.double(), merge_map, cos.double(), sin.double())
    check_fa_rule(out, exact, reference(q, k, v, merge_map, cos, sin, upcast=False), torch.float32)


@pytest.mark.benchmark(group=f"vtu_attention prefill H={VTU_H} H_kv={VTU_H_KV} N={VTU_N} D={VTU_D} fp32")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_vtu_prefill(benchmark, gen, backend):
    (q, k, v), merge_map, (cos, sin) = vtu_prefill_inputs(gen)
    n_unique = int(merge_map.max()) + 1
    assert 150 <= n_unique <= 180
    benchmark.extra_info["shape"] = f"q {list(q.shape)}, merge_map {list(merge_map.shape)}, unique {n_unique}"

    out = timed(benchmark, dymu_kernels.vtu_attention, q, k, v, merge_map, cos, sin, backend=backend)

    assert_fa_close(ref.vtu_attention_expand, out, q, k, v, merge_map, cos, sin)
    # and against the expand written plainly in the tests (tests/vtu_plain.py)
    torch.testing.assert_close(out.double(), plain_vtu_attention(q, k, v, merge_map, cos, sin, VTU_D),
                               atol=2e-5, rtol=2e-5)
    assert out[:, :, :n_unique].abs().amax(-1).gt(0).all()  # every used unique token got an output


@pytest.mark.benchmark(group=f"vtu_decode_attention T=1 H={VTU_H} H_kv={VTU_H_KV} N={VTU_N + 1} D={VTU_D} fp32")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_vtu_decode(benchmark, gen, backend):
    (_, k, v), merge_map, _ = vtu_prefill_inputs(gen)
    # Append the new token's K/V row to the cache and its position to the map.
    row = k.shape[2]
    k = torch.cat([k, randn(1, VTU_H_KV, 1, VTU_D, gen=gen)], dim=2)
    v = torch.cat([v, randn(1, VTU_H_KV, 1, VTU_D, gen=gen)], dim=2)
    merge_map = torch.cat([merge_map, torch.tensor([[row]], dtype=merge_map.dtype)], dim=1)
    cos, sin = ref.rope_cos_sin(torch.arange(VTU_N + 1), VTU_D)
    q = randn(1, VTU_H, 1, VTU_D, gen=gen)
    benchmark.extra_info["shape"] = f"q {list(q.shape)}, cache {list(k.shape)}, merge_map {list(merge_map.shape)}"

    out = timed(benchmark, dymu_kernels.vtu_decode_attention, q, k, v, merge_map, cos, sin, backend=backend)

    assert_fa_close(ref.vtu_decode_attention_ref, out, q, k, v, merge_map, cos, sin)
    torch.testing.assert_close(out.double(), plain_vtu_decode(q, k, v, merge_map, cos, sin, VTU_D), atol=2e-5, rtol=2e-5)


# --- Segment mean: attention outputs at full positions back to unique tokens -----


@pytest.mark.benchmark(group=f"segment_mean [1, {VTU_H}, {VTU_N}, {VTU_D}] -> {SEG_S} fp32")
@pytest.mark.parametrize("backend", BACKENDS)
def test_bench_segment_mean(benchmark, gen, backend):
    src = randn(1, VTU_H, VTU_N, VTU_D, gen=gen)
    index = torch.randint(0, SEG_S, (1, VTU_N), generator=gen)
    index[0, :SEG_S] = torch.randperm(SEG_S, generator=gen)  # every segment used
    index[0, -3:] = -1  # padding rows
    benchmark.extra_info["shape"] = f"src {list(src.shape)}, segments {SEG_S}"

    out = timed(benchmark, dymu_kernels.segment_mean, src, index, SEG_S, backend=backend)

    torch.testing.assert_close(out, ref.segment_mean(src, index, SEG_S), atol=1e-6, rtol=1e-6)
    # The torch backend calls the reference: also check against a mean written
    # out here (one-hot membership, fp64; padding -1 belongs to no segment).
    members = (index[0, :, None] == torch.arange(SEG_S)[None, :]).double()  # [N, S]
    expected = torch.einsum("bhnd,ns->bhsd", src.double(), members) / members.sum(0)[None, None, :, None]
    torch.testing.assert_close(out.double(), expected, atol=1e-6, rtol=1e-6)
