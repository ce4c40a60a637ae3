"""The two VTU references agree with each other and with a brute-force float64
construction that uses Hugging Face's own apply_rotary_pos_emb."""

import pytest
import torch

from conftest import randn
from slow_reference import loop_vtu_attention

from dymu_kernels.reference import rope_cos_sin, segment_mean, unmerge, vtu_attention_decomposed, vtu_attention_expand

hf_llama = pytest.importorskip("transformers.models.llama.modeling_llama")


def hf_brute_force(q, k, v, merge_map, cos, sin, scale):
    """Expand explicitly, rotate with HF's apply_rotary_pos_emb, plain softmax
    attention with HF's repeat_kv, then average each group: all in float64."""
    q, k, v, cos, sin = (t.double() for t in (q, k, v, cos, sin))
    qf, kf, vf = (unmerge(t, merge_map) for t in (q, k, v))
    qr, kr = hf_llama.apply_rotary_pos_emb(qf, kf, cos, sin)
    n_rep = q.shape[1] // k.shape[1]
    kr, vf = hf_llama.repeat_kv(kr, n_rep), hf_llama.repeat_kv(vf, n_rep)
    N = merge_map.shape[1]
    logits = (qr @ kr.transpose(-1, -2)) * scale
    allowed = torch.ones(N, N, dtype=torch.bool).tril() & (merge_map >= 0)[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num()
    return segment_mean(probs @ vf, merge_map, q.shape[2])


def make_case(kind, gen, B=2, H=4, H_kv=2, D=16, N=24):
    """Merge maps for the situations docs/design.md names, with HF-format cos/sin."""
    maps = []
    for b in range(B):
        if kind == "identity":
            m = torch.arange(N)
        elif kind == "one_group":
            m = torch.zeros(N, dtype=torch.long)
        elif kind == "n1":
            m = torch.zeros(1, dtype=torch.long)
        elif kind == "scattered":  # groups spread over the sequence, random order
            m = torch.randint(0, 7, (N,), generator=gen)
            m[:7] = torch.randperm(7, generator=gen)  # every unique token is used
        elif kind == "text_image_text":  # text singletons around an image block merged in groups
            n_img = N - 8
            img = 4 + torch.randint(0, 5, (n_img,), generator=gen)
            img[:5] = torch.arange(4, 9)
            m = torch.cat([torch.arange(4), img, torch.arange(9, 13)])
        elif kind == "padding":  # left padding for one sample, right for the other
            n_pad = 5 + 3 * b
            body = torch.randint(0, 9, (N - n_pad,), generator=gen)
            n_used = min(9, body.numel())
            body[:n_used] = torch.arange(n_used)
            pad = torch.full((n_pad,), -1)
            m = torch.cat([pad, body]) if b == 0 else torch.cat([body, pad])
        maps.append(m)
    merge_map = torch.stack(maps).to(torch.int32)
    n_un = int(merge_map.max()) + 1 + (2 if kind == "padding" else 0)  # unused padded unique slots too
    q = randn(B, H, n_un, D, gen=gen, dtype=torch.float64)
    k = randn(B, H_kv, n_un, D, gen=gen, dtype=torch.float64)
    v = randn(B, H_kv, n_un, D, gen=gen, dtype=torch.float64)
    positions = torch.stack([torch.arange(merge_map.shape[1]) + 3 * b for b in range(B)])  # offsets, like left padding
    cos, sin = rope_cos_sin(positions, D, base=100.0, dtype=torch.float64)
    return q, k, v, merge_map, cos, sin


CASES = ["identity", "one_group", "n1", "scattered", "text_image_text", "padding"]


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
def test_references_agree_with_hf_brute_force(gen, kind, heads):
    q, k, v, merge_map, cos, sin = make_case(kind, gen, H=heads[0], H_kv=heads[1])
    scale = q.shape[-1] ** -0.5
    brute = hf_brute_force(q, k, v, merge_map, cos, sin, scale)
    a = vtu_attention_expand(q, k, v, merge_map, cos, sin)
    b = vtu_attention_decomposed(q, k, v, merge_map, cos, sin)
    torch.testing.assert_close(a, brute, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(b, brute, atol=1e-12, rtol=1e-10)
    used = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool)
    rows = torch.arange(q.shape[0])[:, None].expand_as(merge_map)
    used[rows[merge_map >= 0], merge_map[merge_map >= 0].long()] = True
    assert (a[~used[:, None].expand_as(a[..., 0])] == 0).all()  # unused unique slots are zero


def test_loop_construction_agrees(gen):
    """A third, loop-only construction (no HF, no vectorisation) for one mixed case."""
    q, k, v, merge_map, cos, sin = make_case("padding", gen, B=2, H=2, H_kv=1, D=8, N=12)
    scale = 0.3
    loop = loop_vtu_attention(q, k, v, merge_map, cos, sin, scale)
    torch.testing.assert_close(vtu_attention_expand(q, k, v, merge_map, cos, sin, scale=scale), loop)
    torch.testing.assert_close(vtu_attention_decomposed(q, k, v, merge_map, cos, sin, scale=scale), loop)


def test_identity_map_is_causal_rope_attention(gen):
    q, k, v, merge_map, cos, sin = make_case("identity", gen, H=4, H_kv=4, N=33)
    qr = q * cos[:, None] + torch.cat([-q[..., 8:], q[..., :8]], -1) * sin[:, None]
    kr = k * cos[:, None] + torch.cat([-k[..., 8:], k[..., :8]], -1) * sin[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, is_causal=True)
    torch.testing.assert_close(vtu_attention_expand(q, k, v, merge_map, cos, sin), expected)
    torch.testing.assert_close(vtu_attention_decomposed(q, k, v, merge_map, cos, sin), expected)


def test_non_causal_and_shared_tables(gen):
    q, k, v, merge_map, cos, sin = make_case("scattered", gen)
    shared_cos, shared_sin = cos[0], sin[0]  # [N, D] tables used by every sample
    a = vtu_attention_expand(q, k, v, merge_map, shared_cos, shared_sin, causal=False)
    b = vtu_attention_decomposed(q, k, v, merge_map, shared_cos, shared_sin, causal=False)
    torch.testing.assert_close(a, b)
    loop = loop_vtu_attention(q, k, v, merge_map, cos[:1].expand_as(cos), sin[:1].expand_as(sin), q.shape[-1] ** -0.5, causal=False)
    torch.testing.assert_close(a, loop)


def test_non_contiguous_inputs(gen):
    q, k, v, merge_map, cos, sin = make_case("scattered", gen, D=32)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)
    kn = torch.cat([k, k], dim=-1)[..., :32]
    assert not qn.is_contiguous() and not kn.is_contiguous()
    mn = torch.stack([merge_map, merge_map], -1)[..., 0]
    expected = vtu_attention_expand(q, k, v, merge_map, cos, sin)
    torch.testing.assert_close(vtu_attention_expand(qn, kn, v, mn, cos, sin), expected)
    torch.testing.assert_close(vtu_attention_decomposed(qn, kn, v, mn, cos, sin), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_inputs(gen, dtype):
    q, k, v, merge_map, cos, sin = make_case("text_image_text", gen, D=64, N=40)
    exact = vtu_attention_expand(q, k, v, merge_map, cos, sin)
    lo = [t.to(dtype) for t in (q, k, v)]
    for out in (
        vtu_attention_expand(*lo, merge_map, cos.to(dtype), sin.to(dtype)),
        vtu_attention_expand(*lo, merge_map, cos.to(dtype), sin.to(dtype), upcast=False),
        vtu_attention_decomposed(*lo, merge_map, cos.float(), sin.float()),
    ):
        assert out.dtype == dtype
        tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}[dtype]
        torch.testing.assert_close(out.double(), exact, atol=tol, rtol=tol)


def test_rope_tables_match_hf_rotary_embedding():
    config = hf_llama.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    rotary = hf_llama.LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 1, 2, 7, 100, 4095]])
    cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = rope_cos_sin(positions, 16, base=500.0)
    # HF forms the angles in fp32 (error ~ position * 1e-7); ours are fp64.
    torch.testing.assert_close(cos, cos_hf, atol=5e-4, rtol=0)
    torch.testing.assert_close(sin, sin_hf, atol=5e-4, rtol=0)
    small = positions < 200
    torch.testing.assert_close(cos[small], cos_hf[small], atol=1e-5, rtol=0)
