"""DToMe benchmarks: one block's merge, and a whole CLIP ViT-L/14-336 forward.

1. Merge at the CLIP ViT-L/14-336 shape (577 tokens, C=1024, 16 heads x 64),
   B = 1, 8, 32: Triton vs the torch reference on a GPU; C++ vs the reference
   on the CPU.
2. Whole CLIP ViT-L/14-336 vision tower (random weights; bf16 on GPU, fp32 on
   CPU) with DToMe merging r = 21 / 16 / 8 tokens per block (fixed-r mode, so
   every image keeps the paper's average count) vs the unmodified HF encoder
   with SDPA: images/s. On the CPU later blocks run on the shorter sequence
   (trim=True); on CUDA trim=True (a host sync per block) and trim=False
   (padded, sync-free, graph-capturable) are both timed, so a GPU run decides
   the default there.

Run: ``python3 benchmarks/bench_dtome.py`` (GPU when present; ``--quick`` for
a CPU-sized subset). Rows go to benchmarks/results/dtome_<device>.jsonl.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, time_ms, write_rows  # noqa: E402

import dymu_kernels  # noqa: E402
from dymu_kernels import _ext  # noqa: E402


def merge_rows(device: str, batches):
    rows = []
    fast = "triton" if device == "cuda" else "cpp"
    providers = ["torch"] + ([fast] if device == "cuda" or _ext.extension() is not None else [])
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for B in batches:
        x = torch.randn(B, 577, 1024, device=device, dtype=dtype)
        keys = torch.randn(B, 16, 577, 64, device=device, dtype=dtype)
        state = dymu_kernels.init_merge_state(x)
        times = {}
        for p in providers:
            times[p] = time_ms(lambda: dymu_kernels.dtome_merge(*state, keys, 0.05, backend=p), device)
            rows.append({"op": "dtome_merge", "provider": p, "shape": f"B={B} N=577 C=1024 H=16", "dtype": str(dtype)[6:], **times[p]})
        if len(times) == 2:
            rows[-1]["speedup"] = times["torch"]["ms"] / times[fast]["ms"]
    return rows


def clip_l_336(device, dtype):
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(config).to(device=device, dtype=dtype).eval()


def encoder_rows(device: str, batches, rs):
    from dymu_kernels.core.encoder import DToMeVisionEncoder

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = clip_l_336(device, dtype)
    backend = "triton" if device == "cuda" else "auto"
    rows = []
    for B in batches:
        pixels = torch.randn(B, 3, 336, 336, device=device, dtype=dtype)
        with torch.no_grad():
            base = time_ms(lambda: model(pixel_values=pixels), device)
            rows.append({"op": "clip_vit_l_336", "provider": "hf-sdpa (no merging)", "shape": f"B={B}", "dtype": str(dtype)[6:],
                         **base, "images_per_s": B / base["ms"] * 1e3, "tokens_kept": 577})
            # On CUDA both schemes are timed: one host sync per block that
            # shrinks the capacity (trim=True) vs full capacity, sync-free and
            # graph-capturable (trim=False); the CPU always trims.
            for r in rs:
                for trim in (True, False) if device == "cuda" else (True,):
                    enc = DToMeVisionEncoder(model, r=r, backend=backend, trim=trim)
                    kept = int(enc(pixels).lengths[0])
                    t = time_ms(lambda: enc(pixels), device)
                    rows.append({"op": "clip_vit_l_336", "provider": f"dtome r={r} ({backend}, trim={trim})", "shape": f"B={B}",
                                 "dtype": str(dtype)[6:], **t, "images_per_s": B / t["ms"] * 1e3, "tokens_kept": kept,
                                 "speedup": base["ms"] / t["ms"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="small subset: merge B=1,8; encoder B=1, r=21")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--results-dir", default=None, help="where rows go (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        merge_b, enc_b, rs = (1, 8), (1,), (21,)
    elif args.device == "cpu":  # a ViT-L forward takes seconds per image on a small CPU
        merge_b, enc_b, rs = (1, 8, 32), (1,), (21, 16, 8)
    else:
        merge_b, enc_b, rs = (1, 8, 32), (1, 8, 32), (21, 16, 8)
    rows = merge_rows(args.device, merge_b)
    rows += encoder_rows(args.device, enc_b, rs)
    print_table(rows, ["op", "provider", "shape", "dtype", "ms", "ms_p20", "ms_p80", "n_samples", "images_per_s", "tokens_kept",
                       "speedup"])
    if not args.no_save:
        print("results appended to", write_rows(f"dtome_{args.device}", rows, args.results_dir))


if __name__ == "__main__":
    main()
