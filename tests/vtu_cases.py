"""VTU attention test cases shared by every backend's tests: merge maps of the
kinds docs/design.md names, inputs, and FlashAttention's tolerance rule (error vs a
float64 reference at most 2x the error of the reference computed in the same
low dtype)."""

import torch

from conftest import randn

import dymu_kernels
from dymu_kernels import reference as ref

EPS = {torch.float32: 2e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def make_map(kind, gen, B, N):
    maps, n_un = [], 1
    for b in range(B):
        if kind == "identity":
            m = torch.arange(N)
        elif kind == "one_group":
            m = torch.zeros(N, dtype=torch.long)
        elif kind == "scattered":
            n_u = max(1, N // 3)
            m = torch.randint(0, n_u, (N,), generator=gen)
            m[:n_u] = torch.randperm(n_u, generator=gen)[: min(n_u, N)]
        elif kind == "text_image_text":
            n_img = N - 10
            img = 5 + torch.randint(0, max(1, n_img // 4), (n_img,), generator=gen)
            m = torch.cat([torch.arange(5), img, img.max() + 1 + torch.arange(5)])
            m = torch.unique(m, return_inverse=True)[1]  # compact unique ids, order kept
        elif kind == "padding":  # mixed lengths: left padding for b=0, right padding for b=1
            n_pad = 7 + 9 * b
            body = torch.randint(0, max(1, (N - n_pad) // 2), (N - n_pad,), generator=gen)
            body = torch.unique(body, return_inverse=True)[1]
            m = torch.cat([torch.full((n_pad,), -1), body]) if b % 2 == 0 else torch.cat([body, torch.full((n_pad,), -1)])
        maps.append(m)
        n_un = max(n_un, int(m.max()) + 1)
    return torch.stack(maps).to(torch.int32), n_un + 3  # padded unique dim (unused slots)


def make_inputs(kind, gen, dtype, B=2, H=4, H_kv=2, N=80, D=64):
    merge_map, n_un = make_map(kind, gen, B, N)
    q = randn(B, H, n_un, D, gen=gen, dtype=torch.float64)
    k = randn(B, H_kv, n_un, D, gen=gen, dtype=torch.float64)
    v = randn(B, H_kv, n_un, D, gen=gen, dtype=torch.float64)
    positions = torch.stack([torch.arange(N) + 5 * b for b in range(B)])
    cos, sin = ref.rope_cos_sin(positions, D, dtype=torch.float64)
    return q, k, v, merge_map, cos, sin


def check_fa_rule(out, exact, low_ref, dtype):
    err = (out.double().cpu() - exact).abs().max().item()
    ref_err = (low_ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + EPS[dtype], f"kernel error {err:.3g} > 2 x reference error {ref_err:.3g}"


def run_case(q, k, v, merge_map, cos, sin, dtype, deterministic=False, backend="triton", dev="cpu", **kwargs):
    """Backend vs float64 reference by FlashAttention's rule; references run on the
    test device ``dev`` too (on a GPU that keeps large shapes fast)."""
    merge_map = merge_map.to(dev)
    lo = [t.to(dev, dtype) for t in (q, k, v, cos, sin)]
    # As in FlashAttention's tests, the float64 reference sees the same rounded inputs.
    exact = ref.vtu_attention_expand(*[t.double() for t in lo[:3]], merge_map, *[t.double() for t in lo[3:]], **kwargs)
    low_ref = ref.vtu_attention_expand(*lo[:3], merge_map, *lo[3:], upcast=False, **kwargs)
    out = dymu_kernels.vtu_attention(*lo[:3], merge_map, *lo[3:], backend=backend, deterministic=deterministic, **kwargs)
    assert out.dtype == dtype and out.shape == q.shape
    check_fa_rule(out, exact.cpu(), low_ref.cpu(), dtype)
    return out
