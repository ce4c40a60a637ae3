"""CPU baselines: the reference ops at the paper's shapes, and the C++ segment mean.

- segment mean (VTU re-merge of the attention output, [B, H, N, D] -> [B, H, N_un, D]):
  C++ extension vs the torch reference.
- one DToMe block merge at the CLIP ViT-L/14-336 shape (577 tokens, C=1024,
  16 heads), B = 1, 8, 32: C++ backend vs the torch reference.

Run: ``python3 benchmarks/bench_reference_cpu.py`` (``--quick`` for fewer shapes).
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


def segment_mean_rows(quick: bool):
    rows = []
    shapes = [(1, 32, 640, 128, 0.34)] if quick else [(1, 32, 640, 128, 0.15), (1, 32, 640, 128, 0.68), (1, 32, 2944, 128, 0.34), (8, 32, 640, 128, 0.34)]
    providers = {"torch": "torch"}
    if _ext.extension() is not None:
        providers["cpp"] = "cpp"
    for B, H, N, D, ratio in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            n_un = max(1, int(N * ratio))
            src = torch.randn(B, H, N, D).to(dtype)
            index = torch.randint(0, n_un, (B, N), dtype=torch.int32)
            times = {}
            for name, backend in providers.items():
                times[name] = time_ms(lambda: dymu_kernels.segment_mean(src, index, n_un, backend=backend), "cpu")
                rows.append({"op": "segment_mean", "provider": name, "shape": f"B={B} H={H} N={N} N_un={n_un} D={D}", "dtype": str(dtype).replace("torch.", ""), **times[name]})
            if "cpp" in times:
                rows[-1]["speedup_vs_torch"] = times["torch"]["ms"] / times["cpp"]["ms"]
    return rows


def dtome_rows(quick: bool):
    """One block's merge at CLIP ViT-L/14-336 (577 tokens, C=1024, 16 heads x 64)."""
    rows = []
    providers = ["torch"] + (["cpp"] if _ext.extension() is not None else [])
    for B in (1,) if quick else (1, 8, 32):
        x = torch.randn(B, 577, 1024)
        keys = torch.randn(B, 16, 577, 64)
        state = dymu_kernels.init_merge_state(x)
        times = {}
        for backend in providers:
            times[backend] = time_ms(lambda: dymu_kernels.dtome_merge(*state, keys, 0.05, backend=backend), "cpu")
            rows.append({"op": "dtome_merge", "provider": backend, "shape": f"B={B} N=577 C=1024 H=16", "dtype": "float32", **times[backend]})
        if "cpp" in times:
            rows[-1]["speedup_vs_torch"] = times["torch"]["ms"] / times["cpp"]["ms"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = segment_mean_rows(args.quick) + dtome_rows(args.quick)
    print_table(rows, ["op", "provider", "shape", "dtype", "ms", "ms_p20", "ms_p80", "speedup_vs_torch"])
    if not args.no_save:
        print("results appended to", write_rows("reference_cpu", rows))


if __name__ == "__main__":
    main()
