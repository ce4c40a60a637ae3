"""Fused VTU attention (Triton; interpreter on CPU) against the references, by
FlashAttention's rule: error vs a float64 reference at most 2x the error of the
reference computed in the same low dtype."""

import pytest
import torch

from conftest import TRITON_DEVICE, randn
from vtu_cases import EPS, check_fa_rule, make_inputs
from vtu_cases import run_case as _run_case
from vtu_plain import plain_vtu_attention

import dymu_kernels
from dymu_kernels import reference as ref
from dymu_kernels.ops.vtu import FVCORE_HANDLES, attention_flops

pytest.importorskip("triton")


def run_case(*args, **kwargs):
    return _run_case(*args, backend="triton", dev=TRITON_DEVICE, **kwargs)


@pytest.mark.parametrize("kind", ["identity", "one_group", "scattered", "text_image_text", "padding"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_kernel_matches_reference(gen, kind, dtype):
    # N = 150 spans two query tiles of the largest (128-row) config, so causal
    # block skipping and a partial last tile are exercised for every dtype.
    run_case(*make_inputs(kind, gen, dtype, H=2, H_kv=1, N=150), dtype)


@pytest.mark.parametrize("D", [80, 96, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dims(gen, D, dtype):
    run_case(*make_inputs("scattered", gen, dtype, N=70, D=D, H=2, H_kv=1), dtype)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("D", [64, 80])
def test_every_architecture_tile_config(gen, monkeypatch, arch, D):
    # Tile shapes differ per GPU generation (ops.vtu_triton.fwd_config); each
    # config must give the same answers, whichever machine runs the tests.
    from dymu_kernels.ops import vtu_triton

    monkeypatch.setattr(vtu_triton, "target_arch", lambda device: arch)
    assert vtu_triton.fwd_config(D, torch.bfloat16, False, arch)[0] == (128 if arch == 90 else 64)
    run_case(*make_inputs("text_image_text", gen, torch.bfloat16, H=2, H_kv=1, N=150, D=D), torch.bfloat16)
    run_case(*make_inputs("padding", gen, torch.float16, H=2, H_kv=2, N=90, D=D), torch.float16, deterministic=True)


@pytest.mark.parametrize("N", [1, 2, 63])
def test_tiny_sequences_and_single_unique_token(gen, N):
    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float32, N=N)
    run_case(q, k, v, merge_map, cos, sin, torch.float32)
    # N_un = 1: every position is the same unique token.
    one = torch.zeros_like(merge_map)
    run_case(q[:, :, :1], k[:, :, :1], v[:, :, :1], one, cos, sin, torch.float32)


def test_identity_map_equals_causal_rope_attention(gen):
    q, k, v, merge_map, cos, sin = make_inputs("identity", gen, torch.float32, H=4, H_kv=4)
    q, k, v = q[:, :, :80], k[:, :, :80], v[:, :, :80]
    rot = lambda x: ref.apply_rope(x, cos[:, None], sin[:, None])  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
    dev = [t.float().to(TRITON_DEVICE) for t in (q, k, v)]
    out = dymu_kernels.vtu_attention(*dev, merge_map.to(TRITON_DEVICE), cos.float().to(TRITON_DEVICE), sin.float().to(TRITON_DEVICE), backend="triton")
    torch.testing.assert_close(out.double().cpu(), expected, atol=2e-5, rtol=2e-5)


def test_gqa_non_causal_shared_tables_and_non_contiguous(gen):
    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float32, H=6, H_kv=2)
    qn = q.float().transpose(1, 2).contiguous().transpose(1, 2)
    kn = torch.cat([k.float(), k.float()], dim=-1)[..., :64]
    assert not qn.is_contiguous() and not kn.is_contiguous()
    for causal in (True, False):
        exact = ref.vtu_attention_expand(q, k, v, merge_map, cos[0], sin[0], causal=causal)
        out = dymu_kernels.vtu_attention(
            qn.to(TRITON_DEVICE), kn.to(TRITON_DEVICE), v.float().to(TRITON_DEVICE), merge_map.long().to(TRITON_DEVICE),
            cos[0].float().to(TRITON_DEVICE), sin[0].float().to(TRITON_DEVICE), causal=causal, backend="triton",
        )
        torch.testing.assert_close(out.double().cpu(), exact, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic_mode_is_bit_identical(gen, dtype):
    q, k, v, merge_map, cos, sin = (t.to(TRITON_DEVICE) for t in make_inputs("one_group", gen, dtype, H=2, H_kv=1))
    lo = [t.to(dtype) for t in (q, k, v)]
    a = dymu_kernels.vtu_attention(*lo, merge_map, cos.to(dtype), sin.to(dtype), deterministic=True, backend="triton")
    b = dymu_kernels.vtu_attention(*lo, merge_map, cos.to(dtype), sin.to(dtype), deterministic=True, backend="triton")
    assert torch.equal(a, b)
    fast = dymu_kernels.vtu_attention(*lo, merge_map, cos.to(dtype), sin.to(dtype), backend="triton")
    # The two paths differ only in the order the per-position outputs (fp32)
    # are summed into a unique token's mean: fp32 reordering, then one rounding
    # to the output dtype (bf16: at most one ulp, 2^-8..2^-7 relative).
    if dtype == torch.float32:
        torch.testing.assert_close(a, fast, atol=1e-6, rtol=1e-5)
    else:
        torch.testing.assert_close(a.float(), fast.float(), atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3])
def test_decode_path(gen, dtype, T):
    q, k, v, merge_map, cos, sin = make_inputs("padding", gen, torch.float64, N=60)
    n_un = q.shape[2]
    # The T newest tokens are singletons appended to the unique cache.
    k = torch.cat([k, randn(2, 2, T, 64, gen=gen, dtype=torch.float64)], dim=2)
    v = torch.cat([v, randn(2, 2, T, 64, gen=gen, dtype=torch.float64)], dim=2)
    new = torch.arange(n_un, n_un + T, dtype=torch.int32).expand(2, T)
    merge_map = torch.cat([merge_map, new], dim=1)
    cos, sin = ref.rope_cos_sin(torch.arange(60 + T), 64, dtype=torch.float64)
    q_new = randn(2, 4, T, 64, gen=gen, dtype=torch.float64)
    # Consistency: the decode reference is the full attention's output at the new singletons.
    q_full = torch.cat([randn(2, 4, n_un, 64, gen=gen, dtype=torch.float64), q_new], dim=2)
    full = ref.vtu_attention_expand(q_full, k, v, merge_map, cos, sin)
    torch.testing.assert_close(full[:, :, n_un:], ref.vtu_decode_attention_ref(q_new, k, v, merge_map, cos, sin))
    lo = [t.to(dtype) for t in (q_new, k, v, cos, sin)]
    exact = ref.vtu_decode_attention_ref(*[t.double() for t in lo[:3]], merge_map, *[t.double() for t in lo[3:]])
    low_ref = ref.vtu_decode_attention_ref(*lo[:3], merge_map, *lo[3:], upcast=False)
    out = dymu_kernels.vtu_decode_attention(*[t.to(TRITON_DEVICE) for t in lo[:3]], merge_map.to(TRITON_DEVICE),
                                            *[t.to(TRITON_DEVICE) for t in lo[3:]], backend="triton")
    assert out.shape == (2, 4, T, 64) and out.dtype == dtype
    check_fa_rule(out, exact, low_ref, dtype)


def test_torch_library_op_fake_and_autograd(gen):
    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float64, N=20, D=32)
    args = (q, k, v, merge_map, cos, sin, 32 ** -0.5, True, False, "torch")
    torch.library.opcheck(torch.ops.dymu_kernels.vtu_attention.default, args)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    # fp64 finite differences against the op's backward; fast_mode (random
    # projections of the Jacobian) keeps it to seconds: the full check runs one
    # backward per output element (minutes). tests/test_vtu_contract.py runs the
    # full one on a smaller case.
    assert torch.autograd.gradcheck(lambda a, b, c: dymu_kernels.vtu_attention(a, b, c, merge_map, cos, sin, backend="torch"),
                                    leaves, fast_mode=True)
    # The Triton path's backward against autograd through an independent fp64
    # expand written in the tests (tests/vtu_plain.py), not the reference the
    # backward recomputes through; a random upstream gradient, not .sum().
    grad = randn(*q.shape, gen=gen, dtype=torch.float64)
    lo = [t.float().to(TRITON_DEVICE).requires_grad_(True) for t in (q, k, v)]
    dymu_kernels.vtu_attention(*lo, merge_map.to(TRITON_DEVICE), cos.float().to(TRITON_DEVICE),
                               sin.float().to(TRITON_DEVICE), backend="triton").backward(grad.float().to(TRITON_DEVICE))
    plain = [t.clone().requires_grad_(True) for t in (q, k, v)]
    plain_vtu_attention(*plain, merge_map, cos, sin, q.shape[-1]).backward(grad)
    for name, a, b in zip("qkv", lo, plain):
        assert b.grad.abs().max() > 0.1
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, atol=2e-5, rtol=2e-5, msg=f"d{name}")
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fq = torch.empty(2, 4, 9, 32)
        fk = torch.empty(2, 2, 9, 32)
        out = torch.ops.dymu_kernels.vtu_attention(fq, fk, fk, torch.zeros(2, 20, dtype=torch.int32), torch.empty(20, 32), torch.empty(20, 32), 0.1, True, False, "triton")
        assert out.shape == (2, 4, 9, 32)


def test_flop_counters(gen):
    from torch.utils.flop_counter import FlopCounterMode

    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float32, N=40, D=32)
    q, k, v, cos, sin = (t.float() for t in (q, k, v, cos, sin))
    with FlopCounterMode(display=False) as counter:
        dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="torch")
    assert counter.get_total_flops() == attention_flops(2, 4, 40, 32, causal=True) == 4 * 2 * 4 * 40 * 40 * 32 // 2

    fvcore = pytest.importorskip("fvcore.nn")

    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="torch")

    analysis = fvcore.FlopCountAnalysis(Attn(), (q, k, v)).set_op_handle(**FVCORE_HANDLES)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    assert analysis.total() == attention_flops(2, 4, 40, 32, causal=True) // 2  # fvcore counts MACs


VTU_ERRORS = [
    (dict(q=torch.randn(2, 4, 5, 16)), ValueError, "the triton backend needs head dim D >= 32"),
    (dict(q=torch.randn(2, 4, 5, 64).double(), k=torch.randn(2, 2, 5, 64).double(), v=torch.randn(2, 2, 5, 64).double()),
     ValueError, "triton: dtype torch.float64 is not supported"),
    (dict(merge_map=torch.full((2, 8), 9, dtype=torch.int32)), ValueError, "merge_map values must lie in \\[-1, 4\\]"),
    (dict(cos=torch.ones(9, 64)), ValueError, "cos must have shape \\[8, 64\\]"),
    (dict(k=torch.randn(2, 3, 5, 64), v=torch.randn(2, 3, 5, 64)), ValueError, "k has 3 heads, which must divide the 4 heads"),
]


@pytest.mark.parametrize("overrides,exc,match", VTU_ERRORS)
def test_public_op_errors(overrides, exc, match):
    args = dict(q=torch.randn(2, 4, 5, 64), k=torch.randn(2, 2, 5, 64), v=torch.randn(2, 2, 5, 64),
                merge_map=torch.zeros(2, 8, dtype=torch.int32), cos=torch.ones(8, 64), sin=torch.zeros(8, 64))
    if overrides.get("q") is not None and overrides["q"].shape[-1] == 16:
        args.update(k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16), cos=torch.ones(8, 16), sin=torch.zeros(8, 16))
    args.update(overrides)
    args = {n: t.to(TRITON_DEVICE) for n, t in args.items()}
    dymu_kernels.set_debug(True)  # index ranges on GPU tensors are checked in debug mode only
    try:
        with pytest.raises(exc, match=match):
            dymu_kernels.vtu_attention(**args, backend="triton")
    finally:
        dymu_kernels.set_debug(False)


def test_decode_errors():
    k = torch.randn(1, 2, 5, 64)
    with pytest.raises(ValueError, match="q has 9 new tokens but merge_map has only 8 positions"):
        dymu_kernels.vtu_decode_attention(torch.randn(1, 4, 9, 64), k, k, torch.zeros(1, 8, dtype=torch.int32), torch.ones(8, 64), torch.zeros(8, 64))
    with pytest.raises(ValueError, match="q must be a \\[B, H, T, D\\] tensor"):
        dymu_kernels.vtu_decode_attention(torch.randn(4, 9, 64), k, k, torch.zeros(1, 8, dtype=torch.int32), torch.ones(8, 64), torch.zeros(8, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_half_rope_tables_equal_full_tables(gen, dtype):
    # Half tables [N, D/2] hold each frequency once; the kernel reads them for
    # both halves, so results are bit-identical to the HF-format tables.
    q, k, v, merge_map, cos, sin = (
        t.to(TRITON_DEVICE, dtype) if t.is_floating_point() else t.to(TRITON_DEVICE)
        for t in make_inputs("text_image_text", gen, dtype, H=2, H_kv=1, N=70)  # two 64-row query tiles
    )
    half = q.shape[-1] // 2
    ch, sh = cos[..., :half], sin[..., :half]
    D = 2 * half  # a half table says so: rotary_dim = D
    for kwargs in ({}, {"deterministic": True}, {"causal": False}):
        full = dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="triton", **kwargs)
        got = dymu_kernels.vtu_attention(q, k, v, merge_map, ch, sh, backend="triton", rotary_dim=D, **kwargs)
        if kwargs.get("deterministic"):
            assert torch.equal(got, full)
        else:  # fp32 atomics may add in another order
            torch.testing.assert_close(got, full, atol=EPS[dtype], rtol=0)
    ref_full = ref.vtu_attention_expand(*(t.cpu() for t in (q, k, v, merge_map, cos, sin)))
    assert torch.equal(ref.vtu_attention_expand(*(t.cpu() for t in (q, k, v, merge_map, ch, sh)), rotary_dim=D), ref_full)
    T = 2
    dec = dict(q=q[:, :, :T], k=k, v=v, merge_map=merge_map)
    torch.testing.assert_close(
        dymu_kernels.vtu_decode_attention(**dec, cos=ch, sin=sh, backend="triton", rotary_dim=D),
        dymu_kernels.vtu_decode_attention(**dec, cos=cos, sin=sin, backend="triton"), atol=0, rtol=0,
    )


def test_decode_split_k_with_an_all_padding_slice(gen):
    """A long cache is split over several key slices; the first slice here is
    entirely left padding, so its partial result must drop out of the combine."""
    from dymu_kernels.ops.vtu_triton import decode_splits

    N, n_pad, T = 300, 140, 2
    splits, per_split = decode_splits(2, 4, T, N, torch.device(TRITON_DEVICE))
    if TRITON_DEVICE == "cpu":  # the interpreter uses 3 slices of 128 keys: slice 0 is all padding
        assert (splits, per_split) == (3, 128)
    body = torch.randint(0, 40, (N - n_pad - T,), generator=gen)
    body[:40] = torch.arange(40)
    merge_map = torch.cat([torch.full((n_pad,), -1), body, torch.tensor([40, 41])]).to(torch.int32).expand(2, N).contiguous()
    k = randn(2, 2, 42, 64, gen=gen)
    v = randn(2, 2, 42, 64, gen=gen)
    q = randn(2, 4, T, 64, gen=gen)
    cos, sin = ref.rope_cos_sin(torch.arange(N), 64)
    exact = ref.vtu_decode_attention_ref(q.double(), k.double(), v.double(), merge_map, cos.double(), sin.double())
    out = dymu_kernels.vtu_decode_attention(*(t.to(TRITON_DEVICE) for t in (q, k, v, merge_map, cos, sin)), backend="triton")
    torch.testing.assert_close(out.double().cpu(), exact, atol=2e-5, rtol=2e-5)


def test_torch_compile_traces_the_op_without_graph_breaks(gen):
    q, k, v, merge_map, cos, sin = (t.float() if t.is_floating_point() else t for t in make_inputs("scattered", gen, torch.float32, N=24, D=32))

    def layer(q, k, v):
        return dymu_kernels.vtu_attention(q * 2, k, v, merge_map, cos, sin, backend="torch") + 1

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="large shapes run on the GPU machine")


@cuda_only
@pytest.mark.parametrize("B,H,N,D", [(2, 8, 2944, 128), (1, 2, 8192, 128), (2, 4, 1000, 80)])
def test_large_shapes_on_gpu(gen, B, H, N, D):
    q, k, v, merge_map, cos, sin = make_inputs("text_image_text", gen, torch.float64, B=B, H=H, H_kv=H // 2, N=N, D=D)
    run_case(q, k, v, merge_map, cos, sin, torch.bfloat16)
    run_case(q, k, v, merge_map, cos, sin, torch.float16, deterministic=True)


def test_auto_passes_over_triton_for_small_head_dims(gen, monkeypatch):
    """Where "auto" would pick Triton (CUDA) but the head dim is below its
    minimum, it runs the torch backend instead of raising after choosing."""
    import dymu_kernels.ops.vtu as vtu_ops

    picked = []
    real = vtu_ops._vtu_attention_op
    monkeypatch.setattr(vtu_ops, "select_backend", lambda *a, **k: "triton")
    monkeypatch.setattr(vtu_ops, "_vtu_attention_op", lambda *a: picked.append(a[-1]) or real(*a))
    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float32, N=40, D=16)
    got = dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin)
    assert picked == ["torch"]
    torch.testing.assert_close(got, ref.vtu_attention_expand(q, k, v, merge_map, cos, sin), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="the triton backend needs head dim D >= 32, got 16"):
        dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="triton")
