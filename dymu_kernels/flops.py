"""The paper's Table 1, counted: attention FLOPs at the full sequence vs VTU.

The paper compares one attention layer of LLaVA-1.5-7B's language model
(batch 1, 32 heads, head dim 128, N = 576 image positions) with its VTU
attention at the unique-token counts of the three settings (N_un = 89 / 195 /
394 for low / mid / high), counted with **fvcore**. fvcore counts
multiply-adds (MACs) of matrix products (matmul, einsum, linear, …) and skips
elementwise operations, softmax and indexing. Counted so (docs/design.md §1.3):

- original attention at N: ``QKᵀ`` and ``AV``, ``2·N²·D`` MACs per head;
- decomposed VTU attention (:func:`dymu_kernels.reference.vtu_attention_decomposed`):
  two unique-token products (dot and cross, over both halves) ``N_un²·D``
  each plus ``AV`` at the full
  positions ``N²·D``, i.e. ``2·N_un²·D + N²·D`` per head. Its ``N²·D``
  elementwise combine of the expanded products with cos/sin is real work that
  fvcore does not count.

Beside these, :func:`fused_attention_macs` is what this package's fused VTU
kernel computes (``FlopCounterMode`` through the op's registered formula,
converted to MACs): the original attention's ``2·N²·D`` per head (half with
the causal mask) — the fused kernel does not save attention work; its savings
are that every projection and MLP runs on N_un tokens and the expanded Q/K/V
never exist in memory.

Counting runs per head (every counted product is per head) and scales by the
number of heads, so the decomposed form's ``[N, N, D/2]`` intermediates stay
small.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

# The paper's settings: unique image tokens kept on average, of 576 (docs/design.md §1.2).
PAPER_N_UN = {"low": 89, "mid": 195, "high": 394}
# LLaVA-1.5-7B's attention: batch 1, 32 heads of dim 128, 576 image positions.
PAPER_SHAPE = {"n": 576, "heads": 32, "head_dim": 128}


class _Attention(torch.nn.Module):
    """Ordinary attention at the full positions, as matrix products fvcore sees."""

    def forward(self, q, k, v):
        probs = torch.softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1)
        return probs @ v


class _DecomposedVTU(torch.nn.Module):
    def __init__(self, merge_map, cos, sin):
        super().__init__()
        self.merge_map, self.cos, self.sin = merge_map, cos, sin

    def forward(self, q, k, v):
        from .reference import vtu_attention_decomposed

        return vtu_attention_decomposed(q, k, v, self.merge_map, self.cos, self.sin, causal=False)


def _merge_map(n: int, n_un: int, gen: torch.Generator) -> torch.Tensor:
    """``[1, n]`` map using every one of ``n_un`` unique tokens (counts do not depend on which)."""
    if not 1 <= n_un <= n:
        raise ValueError(f"n_un must be in [1, n={n}], got {n_un}")
    extra = torch.randint(0, n_un, (n - n_un,), generator=gen)
    return torch.cat([torch.arange(n_un), extra]).sort().values[None].to(torch.int32)


def _fvcore_macs(module: torch.nn.Module, inputs) -> int:
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        raise ImportError("counting FLOPs as the paper did needs fvcore: pip install fvcore") from None
    analysis = FlopCountAnalysis(module, inputs)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return int(analysis.total())


def original_attention_macs(n: int, heads: int, head_dim: int) -> int:
    """fvcore MACs of attention over ``n`` positions (batch 1)."""
    q = torch.randn(1, 1, n, head_dim)
    return heads * _fvcore_macs(_Attention(), (q, q, q))


def decomposed_vtu_macs(n: int, n_un: int, heads: int, head_dim: int, seed: int = 0) -> int:
    """fvcore MACs of the decomposed VTU attention (``n`` positions, ``n_un`` unique tokens)."""
    from .reference import rope_cos_sin

    gen = torch.Generator().manual_seed(seed)
    merge_map = _merge_map(n, n_un, gen)
    cos, sin = rope_cos_sin(torch.arange(n), head_dim)
    q = torch.randn(1, 1, n_un, head_dim, generator=gen)
    return heads * _fvcore_macs(_DecomposedVTU(merge_map, cos, sin), (q, q, q))


def fused_attention_macs(n: int, n_un: int, heads: int, head_dim: int, causal: bool) -> int:
    """MACs of ``dymu_kernels.vtu_attention`` as ``FlopCounterMode`` counts them
    (its registered formula; counted on the meta device, nothing runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .ops.vtu import vtu_attention

    q = torch.empty(1, heads, n_un, head_dim, device="meta")
    merge_map = torch.zeros(1, n, dtype=torch.int32, device="meta")
    cos = torch.empty(n, head_dim, device="meta")
    with FlopCounterMode(display=False) as counter:
        vtu_attention(q, q, q, merge_map, cos, cos, causal=causal, backend="torch")
    return counter.get_total_flops() // 2


def table1(n_un: Dict[str, int] = PAPER_N_UN, n: int = PAPER_SHAPE["n"], heads: int = PAPER_SHAPE["heads"],
           head_dim: int = PAPER_SHAPE["head_dim"]) -> List[Dict[str, object]]:
    """Rows of the paper's Table 1 (MFLOPs = millions of MACs, as fvcore and the paper report them).

    One row for the original attention at ``n`` and one per setting of
    ``n_un``, each with the fvcore count and, for comparison, the fused
    kernel's (non-causal and causal) count.
    """
    original = original_attention_macs(n, heads, head_dim)
    rows = [{"setting": "original", "n": n, "n_un": n, "fvcore_mflops": original / 1e6,
             "ratio_to_original": 1.0, "fused_mflops": original / 1e6, "fused_causal_mflops": original / 2e6}]
    for name, u in n_un.items():
        macs = decomposed_vtu_macs(n, u, heads, head_dim)
        rows.append({"setting": f"VTU {name}", "n": n, "n_un": u, "fvcore_mflops": macs / 1e6,
                     "ratio_to_original": macs / original,
                     "fused_mflops": fused_attention_macs(n, u, heads, head_dim, causal=False) / 1e6,
                     "fused_causal_mflops": fused_attention_macs(n, u, heads, head_dim, causal=True) / 1e6})
    return rows


def table1_markdown(rows: Sequence[Dict[str, object]]) -> str:
    """The rows of :func:`table1` as a Markdown table."""
    lines = ["| attention | N | N_un | MFLOPs, fvcore (paper's counting) | × original | fused kernel MFLOPs (non-causal / causal) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['n']} | {r['n_un']} | {r['fvcore_mflops']:.1f} | "
                     f"{r['ratio_to_original']:.2f} | {r['fused_mflops']:.1f} / {r['fused_causal_mflops']:.1f} |")
    return "\n".join(lines)
