"""The paper's Table 1, reproduced, with what each implementation really costs here.

    python3 benchmarks/table1.py                 # CPU (CUDA when present): counts + latencies
    python3 benchmarks/table1.py --counts-only   # fvcore counts only (seconds)

One attention layer of LLaVA-1.5-7B's language model over the image: batch 1,
32 heads, head dim 128, N = 576 positions, N_un = 89 / 195 / 394 unique
tokens (DyMU low / mid / high). Three kinds of numbers, side by side:

1. **MFLOPs as the paper counts them** (fvcore: multiply-adds of matrix
   products, elementwise ops skipped): original attention at N vs the
   decomposed VTU attention at N_un (``dymu_kernels.flops``).
2. **What the fused kernel computes** (``FlopCounterMode`` through the op's
   formula): the original attention's work — VTU does not save attention
   FLOPs in the fused form; its savings are in the projections and MLPs.
3. **Measured latency** on this device, median (min–max) of ``--samples`` calls:
   SDPA at N on pre-expanded Q/K/V (the floor for exact attention), the
   expand reference, the decomposed reference (timed over head chunks of 4 —
   its ``[N, N, D/2]`` intermediates at 32 heads would need ~10 GB), the
   package's fused op (C++ on the CPU, Triton on CUDA) and its torch backend.
   All causal, as in the language model.

Writes ``benchmarks/results/table1_<device>.jsonl`` (rows with device,
versions, commit), ``table1_<device>.md`` and ``table1_<device>.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dymu_kernels  # noqa: E402
from common import add_run_args, check_run_args, environment, sample_times, write_rows  # noqa: E402
from dymu_kernels import flops  # noqa: E402
from dymu_kernels import reference as ref  # noqa: E402

PROVIDERS = ("sdpa at N (expanded)", "reference expand", "reference decomposed", "fused", "torch backend")


def inputs(n: int, n_un: int, heads: int, head_dim: int, device: str, dtype: torch.dtype, seed: int = 0):
    """Unique-token q/k/v, a merge map of ``n`` positions onto ``n_un`` tokens
    (contiguous groups of random sizes, like merged image patches), RoPE tables."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(n - 1, generator=gen)[: n_un - 1].sort().values + 1
    merge_map = torch.zeros(n, dtype=torch.int32)
    merge_map[cuts] = 1
    merge_map = merge_map.cumsum(0).to(torch.int32)[None]
    q, k, v = (torch.randn(1, heads, n_un, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    cos, sin = ref.rope_cos_sin(torch.arange(n), head_dim)
    return q, k, v, merge_map.to(device), cos.to(device, dtype), sin.to(device, dtype)


def providers(q, k, v, merge_map, cos, sin, device: str) -> Dict[str, object]:
    """One callable per provider (all causal)."""
    fused = "triton" if device == "cuda" else "cpp"
    qf, kf, vf = (ref.unmerge(t, merge_map) for t in (q, k, v))
    qf, kf = ref.apply_rope(qf, cos, sin), ref.apply_rope(kf, cos, sin)  # [N, D] tables broadcast

    def decomposed():
        return torch.cat([ref.vtu_attention_decomposed(q[:, h : h + 4], k[:, h : h + 4], v[:, h : h + 4], merge_map,
                                                       cos, sin) for h in range(0, q.shape[1], 4)], dim=1)

    out = {
        "sdpa at N (expanded)": lambda: F.scaled_dot_product_attention(qf, kf, vf, is_causal=True),
        "reference expand": lambda: ref.vtu_attention_expand(q, k, v, merge_map, cos, sin),
        "reference decomposed": decomposed,
        "fused": lambda: dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend=fused),
        "torch backend": lambda: dymu_kernels.vtu_attention(q, k, v, merge_map, cos, sin, backend="torch"),
    }
    return out


def latency_rows(args, device: str, dtype: torch.dtype) -> List[Dict[str, object]]:
    rows = []
    fused = "triton" if device == "cuda" else "cpp"
    for name, n_un in flops.PAPER_N_UN.items():
        data = inputs(args.n, n_un, args.heads, args.head_dim, device, dtype)
        for provider, fn in providers(*data, device).items():
            with torch.inference_mode():
                t = sample_times(fn, device, samples=args.samples, warmup=1)
            rows.append({"op": "table1_latency", "setting": name, "n": args.n, "n_un": n_un, "heads": args.heads,
                         "head_dim": args.head_dim, "dtype": str(dtype).replace("torch.", ""),
                         "provider": provider if provider != "fused" else f"fused ({fused})",
                         "ms": t["median"] * 1e3, "ms_min": t["min"] * 1e3, "ms_max": t["max"] * 1e3,
                         "n_samples": t["n_samples"]})
            print(f"  {name:<5} {rows[-1]['provider']:<22} {rows[-1]['ms']:9.2f} ms "
                  f"({rows[-1]['ms_min']:.2f}–{rows[-1]['ms_max']:.2f})", flush=True)
    return rows


def markdown(count_rows, lat_rows, env) -> str:
    lines = [f"## Table 1: one attention layer, batch 1, {count_rows[0].get('heads', 32)} heads × 128, "
             f"N = {count_rows[0]['n']}",
             "", flops.table1_markdown(count_rows), "",
             "fvcore counts multiply-adds of matrix products and skips elementwise work: the decomposed form's "
             "N²·D/2-sized cos/sin combine and its expansion by indexing are real work it does not count.", ""]
    if lat_rows:
        settings = list(flops.PAPER_N_UN)
        names = list(dict.fromkeys(r["provider"] for r in lat_rows))
        lines += [f"Latency on {env['device']} ({lat_rows[0]['dtype']}, causal), median (min–max) ms of "
                  f"{lat_rows[0]['n_samples']} calls; torch {env['torch']}, commit {env['commit']}:", "",
                  "| provider | " + " | ".join(f"{s} (N_un {flops.PAPER_N_UN[s]})" for s in settings) + " |",
                  "|---|" + "---|" * len(settings)]
        for p in names:
            cells = []
            for s in settings:
                r = next(r for r in lat_rows if r["provider"] == p and r["setting"] == s)
                cells.append(f"{r['ms']:.1f} ({r['ms_min']:.1f}–{r['ms_max']:.1f})")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(count_rows, lat_rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if lat_rows else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    ax = axes[0, 0]
    names = [r["setting"] for r in count_rows]
    ax.bar(names, [r["fvcore_mflops"] for r in count_rows], color=["#888888"] + ["#3b7dd8"] * (len(names) - 1),
           label="fvcore (paper's counting)")
    ax.plot(names, [r["fused_causal_mflops"] for r in count_rows], "r_", markersize=30, mew=2.5,
            label="fused kernel, causal (FlopCounterMode)")
    for i, r in enumerate(count_rows):
        ax.annotate(f"{r['fvcore_mflops']:.1f}", (i, r["fvcore_mflops"]), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("MFLOPs (millions of multiply-adds)")
    ax.set_title("Table 1: attention MFLOPs", fontsize=9)
    ax.legend(fontsize=7)
    if lat_rows:
        ax = axes[0, 1]
        settings = list(flops.PAPER_N_UN)
        provs = list(dict.fromkeys(r["provider"] for r in lat_rows))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            ms = [next(r["ms"] for r in lat_rows if r["provider"] == p and r["setting"] == s) for s in settings]
            ax.bar([i + j * width for i in range(len(settings))], ms, width, label=p)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(settings))], settings)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log scale), median")
        ax.set_title(f"measured latency ({lat_rows[0]['dtype']}, causal)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--counts-only", action="store_true", help="fvcore / FlopCounterMode counts only")
    add_run_args(p, samples=5)
    args = p.parse_args(argv)
    check_run_args(p, args)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.n, args.heads, args.head_dim = flops.PAPER_SHAPE["n"], flops.PAPER_SHAPE["heads"], flops.PAPER_SHAPE["head_dim"]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    count_rows = [{**r, "op": "table1_mflops", "heads": args.heads, "head_dim": args.head_dim} for r in flops.table1()]
    print(flops.table1_markdown(count_rows))
    lat_rows = [] if args.counts_only else latency_rows(args, args.device, dtype)
    env = environment()
    text = markdown(count_rows, lat_rows, env)
    print()
    print(text)
    if not args.no_save:
        os.makedirs(args.results_dir, exist_ok=True)
        stem = os.path.join(args.results_dir, f"table1_{args.device}")
        write_rows(f"table1_{args.device}", count_rows + lat_rows, args.results_dir)
        with open(stem + ".md", "w") as f:
            f.write(text)
        try:
            chart(count_rows, lat_rows, stem + ".png")
        except ImportError:
            print("chart skipped: matplotlib is not installed")
        print(f"rows, table and chart: {stem}.jsonl / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
