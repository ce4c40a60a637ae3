"""VTU attention benchmark (GPU): the fused kernel against its alternatives.

bf16, H=32, D=128, B=1 and 8, N in {640, 2944, 8192}; the sequence holds 64
text tokens per 576-token image block, and the image positions are merged so
that N_un = text + ratio * image tokens for ratio ~0.15 / 0.34 / 0.68 (DyMU
low / mid / high). Providers:

  (a) reference: gather Q/K/V through the map, RoPE, SDPA, segment mean;
  (b) floor: SDPA (FlashAttention) on pre-expanded, pre-rotated Q/K/V of
      length N — the same FLOPs without the gather;
  (c) the paper's decomposed form, where its N x N x D/2 products fit;
  (d) the fused Triton kernel;
  (e) the fused kernel given half RoPE tables ``[B, N, D/2]``.

Decode: one new token over the virtual sequence, fused decode kernel vs SDPA
over an expanded (N-long) cache. Reports µs, TFLOP/s (causal attention FLOPs
at N) and the fraction of the GPU's bf16 dense peak.

Run: ``python3 benchmarks/bench_vtu.py [--quick]`` on a CUDA machine;
``--deterministic``: the fused op with deterministic=False vs True.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, time_ms, write_rows  # noqa: E402

import dymu_kernels  # noqa: E402
from dymu_kernels import reference as ref  # noqa: E402
from dymu_kernels.ops.vtu import attention_flops  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def make_map(B, N, ratio, gen):
    """Text singletons and 576-token image blocks merged into ratio*576 groups each."""
    maps, n_un_max = [], 0
    for _ in range(B):
        ids, next_id, p = [], 0, 0
        while p < N:
            n_text = min(64, N - p)
            ids.extend(range(next_id, next_id + n_text))
            next_id += n_text
            p += n_text
            n_img = min(576, N - p)
            if n_img > 0:
                groups = max(1, round(ratio * n_img))
                # Contiguous runs of random length: neighbouring patches merge.
                cuts = torch.randperm(n_img - 1, generator=gen)[: groups - 1].sort().values + 1
                g = torch.zeros(n_img, dtype=torch.long)
                g[cuts] = 1
                ids.extend((next_id + g.cumsum(0)).tolist())
                next_id += groups
                p += n_img
        maps.append(torch.tensor(ids))
        n_un_max = max(n_un_max, next_id)
    return torch.stack(maps).to(torch.int32), n_un_max


def providers(q, k, v, merge_map, cos, sin, N):
    n_un = q.shape[2]
    out = {}

    def reference():
        rot = lambda x: ref.apply_rope(ref.unmerge(x, merge_map), cos[:, None], sin[:, None])  # noqa: E731
        o = F.scaled_dot_product_attention(rot(q), rot(k), ref.unmerge(v, merge_map), is_causal=True)
        return ref.segment_mean(o, merge_map, n_un)

    out["(a) gather+rope+sdpa+mean"] = reference
    qe = ref.apply_rope(ref.unmerge(q, merge_map), cos[:, None], sin[:, None])
    ke = ref.apply_rope(ref.unmerge(k, merge_map), cos[:, None], sin[:, None])
    ve = ref.unmerge(v, merge_map)
    out["(b) sdpa on expanded (floor)"] = lambda: F.scaled_dot_product_attention(qe, ke, ve, is_causal=True)
    bytes_needed = 2 * q.shape[0] * q.shape[1] * N * N * (q.shape[-1] // 2) * 4
    if bytes_needed < 8 * 2**30:
        out["(c) decomposed reference"] = lambda: ref.vtu_attention_decomposed(q, k, v, merge_map, cos, sin)
    out["(d) fused vtu_attention"] = lambda: dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="triton")
    half = q.shape[-1] // 2  # same rotation from [B, N, D/2] tables: half the table reads
    ch, sh = cos[..., :half], sin[..., :half]
    out["(e) fused, half rope tables"] = lambda: dymu_kernels.vtu_attention(
        q, k, v, merge_map, ch, sh, backend="triton", rotary_dim=2 * half)
    return out


def attention_rows(quick: bool):
    gen = torch.Generator().manual_seed(0)
    rows = []
    H, D = 32, 128
    peak = peak_flops()
    shapes = [(1, 640)] if quick else [(1, 640), (8, 640), (1, 2944), (8, 2944), (1, 8192)]
    for B, N in shapes:
        for ratio in (0.15, 0.34, 0.68):
            merge_map, n_un = make_map(B, N, ratio, gen)
            merge_map = merge_map.cuda()
            q = torch.randn(B, H, n_un, D, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            cos, sin = ref.rope_cos_sin(torch.arange(N, device="cuda"), D, dtype=torch.bfloat16)
            cos, sin = cos.expand(B, N, D), sin.expand(B, N, D)
            flops = attention_flops(B, H, N, D, causal=True)
            times, shape_rows = {}, {}
            for name, fn in providers(q, k, v, merge_map, cos, sin, N).items():
                t = time_ms(fn, "cuda")
                times[name] = t["ms"]
                tflops = flops / (t["ms"] * 1e-3) / 1e12
                shape_rows[name] = {"op": "vtu_attention", "provider": name, "shape": f"B={B} H={H} N={N} N_un={n_un} D={D}",
                                    "dtype": "bfloat16", "us": t["ms"] * 1e3, **t, "tflops": tflops, "peak_frac": tflops * 1e12 / peak}
            for name, row in shape_rows.items():
                if "fused" in name:  # ratios from this one run, side by side
                    row["vs_ref"] = times["(a) gather+rope+sdpa+mean"] / times[name]
                    row["vs_floor"] = times[name] / times["(b) sdpa on expanded (floor)"]
            rows += shape_rows.values()
            torch.cuda.empty_cache()
    return rows


def decode_rows(quick: bool):
    gen = torch.Generator().manual_seed(1)
    rows, H, D = [], 32, 128
    for B, N in [(1, 2944)] if quick else [(1, 640), (1, 2944), (8, 2944), (1, 8192)]:
        for ratio in (0.15, 0.34):
            merge_map, n_un = make_map(B, N, ratio, gen)
            merge_map = torch.cat([merge_map, torch.full((B, 1), n_un, dtype=torch.int32)], 1).cuda()
            k = torch.randn(B, H, n_un + 1, D, device="cuda", dtype=torch.bfloat16)
            v = torch.randn_like(k)
            q = torch.randn(B, H, 1, D, device="cuda", dtype=torch.bfloat16)
            cos, sin = ref.rope_cos_sin(torch.arange(N + 1, device="cuda"), D, dtype=torch.bfloat16)
            ke = ref.apply_rope(ref.unmerge(k, merge_map), cos, sin)
            ve = ref.unmerge(v, merge_map)
            qr = ref.apply_rope(q, cos[-1:], sin[-1:])
            t_exp = time_ms(lambda: F.scaled_dot_product_attention(qr, ke, ve), "cuda")
            t_vtu = time_ms(lambda: dymu_kernels.vtu_decode_attention(q, k, v, merge_map, cos, sin, backend="triton"), "cuda")
            shape = f"B={B} H={H} N={N + 1} N_un={n_un + 1} D={D} T=1"
            rows.append({"op": "vtu_decode", "provider": "sdpa on expanded cache", "shape": shape, "dtype": "bfloat16", "us": t_exp["ms"] * 1e3, **t_exp})
            rows.append({"op": "vtu_decode", "provider": "fused vtu_decode_attention", "shape": shape, "dtype": "bfloat16", "us": t_vtu["ms"] * 1e3,
                         **t_vtu, "vs_ref": t_exp["ms"] / t_vtu["ms"], "n_over_nun": (N + 1) / (n_un + 1)})
    return rows


def deterministic_rows(quick: bool):
    """The fused op's latency with ``deterministic=False`` (fp32 atomic
    re-merge) and ``deterministic=True`` (per-position outputs, then a
    segment-mean pass in position order), side by side at the prefill shapes."""
    gen = torch.Generator().manual_seed(3)
    rows, H, D = [], 32, 128
    for B, N in [(1, 2944)] if quick else [(1, 640), (8, 640), (1, 2944), (8, 2944)]:
        for ratio in (0.15, 0.34):
            merge_map, n_un = make_map(B, N, ratio, gen)
            merge_map = merge_map.cuda()
            q = torch.randn(B, H, n_un, D, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            cos, sin = ref.rope_cos_sin(torch.arange(N, device="cuda"), D, dtype=torch.bfloat16)
            times = {}
            for det in (False, True):
                t = time_ms(lambda: dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="triton",
                                                               deterministic=det), "cuda")
                times[det] = t["ms"]
                rows.append({"op": "vtu_attention deterministic", "provider": f"fused deterministic={det}",
                             "shape": f"B={B} H={H} N={N} N_un={n_un} D={D}", "dtype": "bfloat16",
                             "us": t["ms"] * 1e3, **t})
            rows[-1]["det_over_atomic"] = times[True] / times[False]
    return rows


SWEEP_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
                 (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3), (64, 32, 8, 3)]


def sweep_rows():
    """Time the fused forward under each candidate tile config (BLOCK_M,
    BLOCK_N, num_warps, num_stages) at three shapes, to retune
    ``vtu_triton.fwd_config`` from one GPU run."""
    from dymu_kernels.ops import vtu_triton

    gen = torch.Generator().manual_seed(2)
    rows, H, D = [], 32, 128
    default = vtu_triton.fwd_config
    try:
        for B, N, ratio in [(8, 640, 0.34), (1, 2944, 0.34), (1, 8192, 0.34)]:
            merge_map, n_un = make_map(B, N, ratio, gen)
            merge_map = merge_map.cuda()
            q = torch.randn(B, H, n_un, D, device="cuda", dtype=torch.bfloat16)
            k, v = torch.randn_like(q), torch.randn_like(q)
            cos, sin = ref.rope_cos_sin(torch.arange(N, device="cuda"), D, dtype=torch.bfloat16)
            cos, sin = cos.expand(B, N, D), sin.expand(B, N, D)
            flops = attention_flops(B, H, N, D, causal=True)
            chosen = default(D, torch.bfloat16, False, vtu_triton.target_arch(q.device))
            for cfg in SWEEP_CONFIGS:
                vtu_triton.fwd_config = lambda *a, cfg=cfg: cfg
                try:
                    t = time_ms(lambda: dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="triton"), "cuda")
                except Exception as e:  # a config the compiler rejects (shared memory) is a result too
                    rows.append({"op": "vtu_config_sweep", "provider": str(cfg), "shape": f"B={B} N={N} N_un={n_un}", "error": str(e)[:120]})
                    continue
                rows.append({"op": "vtu_config_sweep", "provider": str(cfg), "shape": f"B={B} H={H} N={N} N_un={n_un} D={D}",
                             "dtype": "bfloat16", "us": t["ms"] * 1e3, **t, "tflops": flops / (t["ms"] * 1e-3) / 1e12,
                             "default": cfg == chosen})
    finally:
        vtu_triton.fwd_config = default
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--sweep", action="store_true", help="time candidate tile configs of the fused kernel instead")
    p.add_argument("--deterministic", action="store_true",
                   help="time the fused op with deterministic=False (atomic re-merge) vs True instead")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_vtu.py needs a CUDA GPU (the fused kernel only runs interpreted on the CPU); nothing measured.")
        return 0
    if args.sweep:
        rows = sweep_rows()
        print_table(rows, ["op", "provider", "shape", "us", "tflops", "default", "error"])
        if not args.no_save:
            print("results appended to", write_rows("vtu_sweep_cuda", rows))
        return 0
    if args.deterministic:
        rows = deterministic_rows(args.quick)
        print_table(rows, ["op", "provider", "shape", "us", "det_over_atomic"])
        if not args.no_save:
            print("results appended to", write_rows("vtu_deterministic_cuda", rows))
        return 0
    rows = attention_rows(args.quick) + decode_rows(args.quick)
    print_table(rows, ["op", "provider", "shape", "us", "tflops", "peak_frac", "vs_ref", "vs_floor", "n_over_nun"])
    if not args.no_save:
        print("results appended to", write_rows("vtu_cuda", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
