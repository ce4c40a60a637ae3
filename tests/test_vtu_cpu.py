"""VTU attention on the CPU: the C++ kernel (``backend="cpp"``) and the stock
PyTorch path (``backend="torch"``: expand + SDPA + segment mean) against the
references, by FlashAttention's rule (tests/vtu_cases.py)."""

import shutil
import subprocess

import pytest
import torch

from conftest import randn
from vtu_cases import check_fa_rule, make_inputs, run_case

import dymu_kernels
from dymu_kernels import _ext
from dymu_kernels import reference as ref

BACKENDS = ["torch"] + (["cpp"] if _ext.missing_reason() is None else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["identity", "one_group", "scattered", "text_image_text", "padding"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_matches_reference(gen, backend, kind, dtype):
    # N = 300 spans several 64-position query blocks and two 256-key blocks,
    # so causal block skipping and partial last blocks are exercised.
    run_case(*make_inputs(kind, gen, dtype, H=4, H_kv=2, N=300), dtype, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D", [32, 80, 128])
def test_head_dims_and_gqa(gen, backend, D):
    run_case(*make_inputs("scattered", gen, torch.float32, H=6, H_kv=2, N=70, D=D), torch.float32, backend=backend)
    run_case(*make_inputs("padding", gen, torch.bfloat16, H=4, H_kv=1, N=70, D=D), torch.bfloat16, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 2, 63, 257])
def test_tiny_sequences_and_single_unique_token(gen, backend, N):
    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float32, N=N)
    run_case(q, k, v, merge_map, cos, sin, torch.float32, backend=backend)
    one = torch.zeros_like(merge_map)  # N_un = 1: one giant group
    run_case(q[:, :, :1], k[:, :, :1], v[:, :, :1], one, cos, sin, torch.float32, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hf_layout_non_contiguous_non_causal_and_half_tables(gen, backend):
    q, k, v, merge_map, cos, sin = make_inputs("text_image_text", gen, torch.float32, H=6, H_kv=3, N=90)
    # HF hands attention q/k/v as [B, N, H, D] transposed to [B, H, N, D].
    qn = q.float().transpose(1, 2).contiguous().transpose(1, 2)
    kn = k.float().transpose(1, 2).contiguous().transpose(1, 2)
    vn = torch.cat([v.float(), v.float()], dim=-1)[..., :64]  # last dim strided by 1, rows by 128
    assert not (qn.is_contiguous() or kn.is_contiguous() or vn.is_contiguous())
    half = cos.shape[-1] // 2
    for causal in (True, False):
        exact = ref.vtu_attention_expand(q, k, v, merge_map, cos, sin, causal=causal)
        # A half table (one entry per frequency) says so with rotary_dim = D.
        for c, s, rd in ((cos[0], sin[0], None), (cos[..., :half], sin[..., :half], 2 * half)):
            out = dymu_kernels.vtu_attention(qn, kn, vn, merge_map.long(), c.float(), s.float(), causal=causal,
                                             backend=backend, rotary_dim=rd)
            assert out.is_contiguous() and out.shape == q.shape
            torch.testing.assert_close(out.double(), exact if c.dim() == 3 else
                                       ref.vtu_attention_expand(q, k, v, merge_map, cos[0], sin[0], causal=causal),
                                       atol=2e-5, rtol=2e-5)


def test_identity_map_equals_causal_rope_sdpa(gen):
    q, k, v, merge_map, cos, sin = make_inputs("identity", gen, torch.float32, H=4, H_kv=4, N=130)
    q, k, v = (t[:, :, :130].float() for t in (q, k, v))
    rot = lambda x: ref.apply_rope(x, cos[:, None].float(), sin[:, None].float())  # noqa: E731
    expected = torch.nn.functional.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=True)
    for backend in BACKENDS:
        out = dymu_kernels.vtu_attention(q, k, v, merge_map, cos.float(), sin.float(), backend=backend)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def _decode_inputs(gen, dtype, T, N=300):
    """A cache of unique rows (left padding on sample 0, right padding on sample 1) and T new singletons."""
    q, k, v, merge_map, cos, sin = make_inputs("padding", gen, torch.float64, N=N)
    n_un = q.shape[2]
    k = torch.cat([k, randn(2, 2, T, 64, gen=gen, dtype=torch.float64)], dim=2)
    v = torch.cat([v, randn(2, 2, T, 64, gen=gen, dtype=torch.float64)], dim=2)
    merge_map = torch.cat([merge_map, torch.arange(n_un, n_un + T, dtype=torch.int32).expand(2, T)], dim=1)
    cos, sin = ref.rope_cos_sin(torch.arange(N + T) + 3, 64, dtype=torch.float64)
    q_new = randn(2, 4, T, 64, gen=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (q_new, k, v)], merge_map, [t.to(dtype) for t in (cos, sin)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3])
def test_decode_matches_reference(gen, backend, dtype, T):
    (q, k, v), merge_map, (cos, sin) = _decode_inputs(gen, dtype, T)
    exact = ref.vtu_decode_attention_ref(q.double(), k.double(), v.double(), merge_map, cos.double(), sin.double())
    low_ref = ref.vtu_decode_attention_ref(q, k, v, merge_map, cos, sin, upcast=False)
    # HF layout: q transposed from [B, T, H, D].
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    out = dymu_kernels.vtu_decode_attention(qt, k, v, merge_map, cos, sin, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    check_fa_rule(out, exact, low_ref, dtype)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_is_deterministic_and_thread_count_independent(gen):
    q, k, v, merge_map, cos, sin = (t.float() if t.is_floating_point() else t
                                    for t in make_inputs("one_group", gen, torch.float32, N=400))
    a = dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="cpp")
    assert torch.equal(a, dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="cpp"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(a, dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="cpp"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_auto_picks_cpp_on_cpu_and_torch_for_float64(gen, monkeypatch):
    from dymu_kernels.ops import vtu

    seen = []
    real = vtu._vtu_attention_op
    monkeypatch.setattr(vtu, "_vtu_attention_op", lambda *a: seen.append(a[-1]) or real(*a))
    q, k, v, merge_map, cos, sin = make_inputs("scattered", gen, torch.float64, N=30)
    dymu_kernels.vtu_attention(q.float(), k.float(), v.float(), merge_map, cos.float(), sin.float())
    dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin)
    assert seen == ["cpp", "torch"]
    with pytest.raises(ValueError, match="cpp: dtype torch.float64 is not supported"):
        dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="cpp")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="C++ extension not built")
def test_cpp_kernel_errors_for_direct_callers():
    """The extension's own checks (a second line of defence behind the Python ones)."""
    ext = _ext.extension()
    q = torch.randn(1, 4, 5, 64)
    k = torch.randn(1, 2, 5, 64)
    m = torch.zeros(1, 8, dtype=torch.int32)
    c = torch.ones(1, 8, 64)
    with pytest.raises(RuntimeError, match="merge_map values must lie in"):
        ext.vtu_attention(q, k, k, m + 7, c, c, 0.1, True)
    with pytest.raises(RuntimeError, match="cos/sin must be float32"):
        ext.vtu_attention(q, k, k, m, c.double(), c, 0.1, True)
    with pytest.raises(RuntimeError, match="KV heads must divide"):
        ext.vtu_attention(q, k[:, :1].expand(1, 3, 5, 64), k[:, :1].expand(1, 3, 5, 64), m, c, c, 0.1, True)


@pytest.mark.skipif("cpp" not in BACKENDS or shutil.which("objdump") is None, reason="needs the extension and objdump")
def test_cpp_inner_loops_are_vectorised():
    """The softmax loops are compiled for AVX-512 / AVX2 and GCC vectorises them:
    the clones of exp2_shifted hold zmm / ymm instructions."""
    import dymu_kernels._C as C

    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", C.__file__], capture_output=True, text=True).stdout
    bodies = {}
    current = None
    for line in dis.splitlines():
        if line.endswith(">:"):
            current = line.split("<", 1)[1][:-2]
            bodies[current] = []
        elif current:
            bodies[current].append(line)
    clones = {name: body for name, body in bodies.items() if "exp2_shifted" in name}
    if not clones:
        pytest.skip("symbols stripped from the extension")
    v4 = [b for n, b in clones.items() if "x86_64_v4" in n]
    v3 = [b for n, b in clones.items() if "x86_64_v3" in n]
    assert v4 and any("zmm" in l for l in v4[0]), "AVX-512 clone of exp2_shifted is not vectorised"
    assert v3 and any("ymm" in l for l in v3[0]), "AVX2 clone of exp2_shifted is not vectorised"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_pass_opcheck(gen, backend):
    """Schema, fake tensors (strides included) and autograd registration of both ops."""
    q, k, v, merge_map, cos, sin = (t.float() if t.is_floating_point() else t
                                    for t in make_inputs("padding", gen, torch.float32, N=40, D=32))
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # HF layout
    torch.library.opcheck(torch.ops.dymu_kernels.vtu_attention.default,
                          (qt, k, v, merge_map, cos, sin, 32 ** -0.5, True, False, backend))
    (q1, k1, v1), map1, (cos1, sin1) = _decode_inputs(gen, torch.float32, 2, N=40)
    torch.library.opcheck(torch.ops.dymu_kernels.vtu_decode_attention.default,
                          (q1.transpose(1, 2).contiguous().transpose(1, 2), k1, v1, map1, cos1, sin1, 0.1, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,U", [(0, 8, 5), (2, 0, 5), (2, 8, 0)])
def test_empty_batches_and_sequences(backend, B, N, U):
    """An empty batch, no positions or no unique tokens give zeros shaped like q."""
    q, k = torch.randn(B, 4, U, 64), torch.randn(B, 2, U, 64)
    merge_map = torch.full((B, N), -1, dtype=torch.int32)
    out = dymu_kernels.vtu_attention(q, k, k, merge_map, torch.ones(N, 64), torch.zeros(N, 64), backend=backend)
    assert out.shape == q.shape and out.is_contiguous() and not out.any()
    if U:  # decode with no new tokens
        q0 = torch.randn(B, 4, 0, 64)
        out = dymu_kernels.vtu_decode_attention(q0, k, k, merge_map, torch.ones(N, 64), torch.zeros(N, 64), backend=backend)
        assert out.shape == q0.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_accepts_a_padding_new_token(gen, backend):
    """Batched continuation: a new token that is padding (-1 at its position)
    attends the tokens before it (it has no key of its own); once rejected.
    tests/test_vtu_contract.py covers random padding patterns and T > 1."""
    k, v = randn(1, 2, 5, 64, gen=gen), randn(1, 2, 5, 64, gen=gen)
    q = randn(1, 4, 1, 64, gen=gen)
    merge_map = torch.tensor([[0, 1, 2, 3, -1]], dtype=torch.int32)
    cos, sin = ref.rope_cos_sin(torch.arange(5), 64)
    out = dymu_kernels.vtu_decode_attention(q, k, v, merge_map, cos, sin, backend=backend)
    # The same query at the last position of a sequence whose last token is real and attended.
    with_token = dymu_kernels.vtu_decode_attention(q, k, v, torch.tensor([[0, 1, 2, 3, 4]], dtype=torch.int32), cos,
                                                   sin, backend=backend)
    exact = ref.vtu_decode_attention_ref(q.double(), k.double(), v.double(), merge_map, cos.double(), sin.double())
    torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)
    assert (out - with_token).abs().max() > 1e-3  # key 4 really is left out
