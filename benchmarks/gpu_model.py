"""GPU performance model (roofline) of this package's kernels and of the DyMU
release's VTU path, at LLaVA-1.5-7B and CLIP ViT-L/14-336 shapes.

**Model, not measurement.** Nothing here runs on a GPU: every number is
counted from shapes (FLOPs, HBM bytes) and divided by a chip's peak rates.
It says what a GPU run (``scripts/gpu_check.sh``: ``bench_vtu.py``,
``bench_dtome.py``) should be compared against, and where the time is
expected to go.

    python3 benchmarks/gpu_model.py                       # H100 SXM in detail, A100 summary
    python3 benchmarks/gpu_model.py --gpu a100            # A100 in detail (sm_80 compile facts)
    python3 benchmarks/gpu_model.py --tflops 989 --tbps 3.35 --no-save

Prints a Markdown report and writes it to ``benchmarks/results/gpu_model.md``;
appends one JSON row per modelled kernel / total to
``benchmarks/results/gpu_model.jsonl`` (``common.write_rows``: device,
versions, commit).

What is modelled (per decoder layer of LLaVA-1.5-7B: B = 1, H = H_kv = 32,
D = 128, causal; N = 642 full positions = 66 text + 576 image, N_un = 66 +
89 / 195 / 394 unique tokens for DyMU low / mid / high):

- prefill attention block, from the Q/K/V projections to ``o_proj``:
  (a) this package as ``apply_dymu`` runs it: HF ``apply_rotary_pos_emb`` with
  the identity tables the patch installs (q, k at N_un), the
  ``vtu_attention`` op (its torch glue, the fp32 output zero-fill,
  ``_vtu_fwd_kernel`` with fp32 atomics, the cast to bf16) and the
  integration's ``transpose(1, 2).contiguous()``; the op with
  ``deterministic=True`` (``_segment_mean_kernel``) is listed as well;
  (b) the official release's default path (``CustomLlamaAttention`` in the
  release's ``llava_llama.py``): ``index_select`` of Q, K and V to the N
  positions, HF RoPE on the expanded Q and K, SDPA (FlashAttention) at N and
  ``torch_scatter.scatter_mean`` back to N_un (its map is one 1-D index:
  batch 1, as modelled);
  (c) the unpatched model (RoPE + SDPA at N), for reference;
- one decode step (T = 1) over the prompt's cache (N + 1 positions): this
  package's split-K ``_vtu_fwd_kernel`` (DECODE) + ``_decode_combine_kernel``
  over the N_un + 1 cached rows vs the release, which caches the expanded,
  rotated K/V (N + 1 rows; its decode step is the unpatched model's);
- the DToMe merge of one CLIP ViT-L/14-336 block (N = 577, C = 1024, 16 heads
  x 64, threshold mode, CLS): ``_metric_kernel``, ``_match_kernel``,
  ``_plan_count_kernel``, ``_plan_kernel``, ``_merge_kernel`` and the torch glue between them, for
  B = 1 and 32;
- the whole vision tower as ``bench_dtome.py`` runs it (24 blocks, fixed r),
  ``trim=True`` vs ``trim=False``: the roofline time trimming saves and the
  host-sync cost at which it stops paying;
- the fused prefill kernel alone at ``bench_vtu.py``'s shapes, with the
  largest fraction of the bf16 peak it can reach (what that benchmark reports).

Accounting rules (the assumptions):

1. dtypes: bf16 activations, Q/K/V, cos/sin tables and outputs (2 B); fp32
   where the code allocates fp32 (the fused op's atomic accumulator
   ``out32``, decode partials and log-sum-exps, DToMe metric/scores/sizes,
   FlashAttention's LSE); int32 merge map and DToMe pos_map, int64 indices
   (the release's ``mapping_indices``, DToMe plan arrays). Accumulation in
   fp32 inside kernels costs no bytes.
2. Bytes = HBM reads + writes. Every tensor a kernel touches counts once per
   kernel at its full size: re-reads of K/V and cos/sin across query blocks
   and heads, duplicate gathered rows, and atomics are assumed to hit L2
   (50 MB on H100, 40 MB on A100; every tensor here is smaller). An
   in-place or atomic update counts one read and one write of the target.
   Scalars and 0-dim tensors are ignored.
3. FLOPs: attention FLOPs come from the package's own formula
   ``dymu_kernels.ops.vtu.attention_flops(B, H, N, D, causal)`` (2 per MAC,
   causal halves); a decode step of T queries over N keys counts
   ``attention_flops(B, H, N, D, False) * T / N`` = 4·B·H·T·N·D, the op's
   registered FLOP formula. They run on the bf16 tensor cores. The DToMe
   match (IEEE fp32 ``tl.dot``, FFMA in the compiled kernel) and the
   elementwise work of the metric/merge kernels count against the fp32
   CUDA-core peak. Elementwise work of RoPE, softmax and rescaling inside the
   attention kernels is not counted (it overlaps with the MMAs/loads in this
   model); eager elementwise kernels count bytes only.
4. Roofline time of a kernel = max(FLOPs / peak, bytes / bandwidth); its
   bound is whichever term is larger; arithmetic intensity = FLOPs / bytes.
   A path's time is the *sum* of its kernels' times (they run one after the
   other). Launch latency, host time, synchronisation and caches beyond rule
   2 are not in the time; the ``launches`` column counts kernel launches so
   they can be judged separately.
5. CTA-schedule bound (fused prefill kernel only): the kernel's grid is
   ``cdiv(N, BLOCK_M) · B·H`` programs in dim 0 (``vtu_triton.fwd_grid``; every
   modelled grid comes from the launch code's grid functions) whose causal
   work differs (tile m streams ``ceil(min(N, (m+1)·BLOCK_M) / BLOCK_N)`` key
   blocks, padded tiles included). With the CTAs per SM its compiled
   registers and shared memory allow, each CTA gets an equal share of the
   SM's peak, and CTAs are list-scheduled in launch order (the tile index
   fastest within each (b, h)). The makespan is a
   lower bound on the kernel's time that the plain roofline cannot see at
   N = 642 (6 x 32 CTAs on 132 SMs). FlashAttention in the release faces the
   same causal tail; its tiles are not modelled.
6. PyTorch glue: each aten op of the launch code (traced once with the
   Triton kernels stubbed) is one launch and reads/writes its tensors once;
   ``torch.sort`` of a short row counts 3 launches (copy, index fill, sort)
   reading the keys once and writing values and indices once. HF
   ``apply_rotary_pos_emb`` in eager mode is 5 kernels per tensor
   (``x*cos``, ``-x2``, ``cat``, ``rot*sin``, ``+``): 5.5 E read + 4.5 E
   written (E = the tensor's bytes) plus one cos and one sin table read.
   SDPA at N is FlashAttention-2 reading Q/K/V once and writing O and its
   fp32 LSE once; its output is laid out [B, N, H, D], so HF's
   ``transpose(1, 2).contiguous()`` after it copies nothing (the package's
   [B, H, N_un, D] op output is copied by the integration). torch_scatter's
   ``scatter_mean`` is 8 launches: zeros, ``scatter_add_`` (output RMW),
   ones/zeros/``scatter_add_`` for the count, ``count < 1``,
   ``masked_fill_``, ``true_divide_`` (output RMW).
7. KV-cache appends (``DynamicCache``'s ``torch.cat`` of the whole cache
   every step, in both implementations; absent with a static cache) are
   listed but kept out of the decode totals.
8. Compile facts (registers, spills, shared memory, HGMMA/HMMA vs FFMA) are
   read from the committed ``benchmarks/results/triton_aot_sm90.jsonl``
   (``sm_80`` for A100), the latest row whose kernel and constexprs match the
   launch modelled here; nothing is recompiled. ``triton_aot.py`` keeps one
   row per distinct binary, so a launch can appear under another case: the
   D = 128 VTU kernels compile to the same binary as D = 96 (same
   constexprs ``BLOCK_H = 64``, ``BLOCK_D = 128``; D and D/2 are runtime
   ints specialised alike), and the DToMe match/plan kernels, which never see
   x's dtype, appear under the fp16 case. A constexpr that differs between
   the compiled row and the modelled launch is named in the row's note.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple
from unittest import mock

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from common import RESULTS_DIR, environment, write_rows  # noqa: E402

from dymu_kernels.ops import dtome_triton, vtu_triton  # noqa: E402
from dymu_kernels.ops.triton_utils import pow2  # noqa: E402
from dymu_kernels.ops.vtu import attention_flops  # noqa: E402

BF16, FP32, I32, I64, I8, BOOL = 2, 4, 4, 8, 1, 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------
# GPUs
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    tflops: float  # bf16 dense tensor-core peak, TFLOP/s
    fp32_tflops: float  # fp32 CUDA-core (FFMA) peak, TFLOP/s
    tbps: float  # HBM bandwidth, TB/s
    sms: int
    arch: int  # compute capability of its compile facts (sm_90, sm_80)
    smem_per_sm: int  # shared memory per SM, bytes
    regs_per_sm: int = 65536


GPUS = {
    "h100": GPU("h100", "H100 SXM", 989.0, 67.0, 3.35, 132, 90, 228 * 1024),
    "a100": GPU("a100", "A100 SXM", 312.0, 19.5, 2.0, 108, 80, 164 * 1024),
}


def label_line(gpu: GPU) -> str:
    return (f"Model, not measurement: roofline estimates from counted FLOPs and HBM bytes at {gpu.name} peaks "
            f"({gpu.tflops:g} TFLOP/s bf16 dense tensor-core, {gpu.fp32_tflops:g} TFLOP/s fp32 CUDA-core, "
            f"{gpu.tbps:g} TB/s HBM); no GPU ran anything.")


# ----------------------------------------------------------------------------
# Kernels and their roofline
# ----------------------------------------------------------------------------


@dataclass
class Kernel:
    path: str
    name: str
    reads: int = 0
    writes: int = 0
    flops: int = 0
    unit: str = ""  # "tensor" (bf16 MMA) | "fp32" (CUDA cores) | "" (no FLOPs counted)
    launches: int = 1
    part: str = "op"  # "op" | "integration" | "cache" (kept out of totals) | "block"
    triton: Optional[str] = None  # Triton kernel name: compile facts are looked up
    variant: Dict[str, object] = field(default_factory=dict)  # constexprs the launch uses
    soft: Dict[str, object] = field(default_factory=dict)  # constexprs a compiled row may lack
    grid: Optional[Tuple[int, ...]] = None
    cta_flops: Optional[List[int]] = None  # MMA FLOPs per CTA, launch order (schedule bound)
    aot_shape: str = ""  # preferred triton_aot case shape (DToMe)
    note: str = ""

    @property
    def bytes(self) -> int:
        return self.reads + self.writes

    @property
    def in_total(self) -> bool:
        return self.part != "cache"


def roofline(flops: int, unit: str, nbytes: int, gpu: GPU) -> Dict[str, object]:
    """max(FLOPs / peak, bytes / bandwidth) in µs, the bound that applies and the intensity."""
    peak = {"tensor": gpu.tflops, "fp32": gpu.fp32_tflops}.get(unit)
    t_c = flops / (peak * 1e12) * 1e6 if peak and flops else 0.0
    t_m = nbytes / (gpu.tbps * 1e12) * 1e6
    return {
        "t_compute_us": t_c,
        "t_memory_us": t_m,
        "time_us": max(t_c, t_m),
        "bound": "compute" if t_c > t_m else "memory",
        "intensity": flops / nbytes if nbytes else float("inf"),
    }


def cta_schedule_us(cta_flops: Sequence[int], gpu: GPU, ctas_per_sm: int) -> float:
    """Makespan of CTAs list-scheduled in launch order on ``sms * ctas_per_sm``
    slots, each running its MMAs at ``peak / slots``."""
    slots = gpu.sms * max(1, ctas_per_sm)
    rate = gpu.tflops * 1e12 / slots
    free = [0.0] * slots
    heapq.heapify(free)
    end = 0.0
    for w in cta_flops:
        t = heapq.heappop(free) + w / rate
        end = max(end, t)
        heapq.heappush(free, t)
    return end * 1e6


def ctas_per_sm(facts: Optional[Dict[str, object]], gpu: GPU) -> int:
    if not facts or not facts.get("reg"):
        return 1
    by_regs = gpu.regs_per_sm // (int(facts["reg"]) * int(facts["num_warps"]) * 32)
    by_smem = gpu.smem_per_sm // int(facts["shared"]) if facts.get("shared") else by_regs
    return max(1, min(by_regs, by_smem))


# ----------------------------------------------------------------------------
# Compile facts from the committed triton_aot rows
# ----------------------------------------------------------------------------

FACT_KEYS = ("reg", "stack", "local", "ldl", "stl", "shared", "hgmma", "hmma", "ffma", "num_warps", "num_stages")


def load_aot_rows(arch: int, results_dir: str = RESULTS_DIR) -> List[Dict[str, object]]:
    path = os.path.join(results_dir, f"triton_aot_sm{arch}.jsonl")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for i, line in enumerate(f):
                if line.strip():
                    row = json.loads(line)
                    row["_line"] = i
                    rows.append(row)
    return rows


def parse_variant(text: str) -> Dict[str, str]:
    return dict(part.split("=", 1) for part in (text or "").split() if "=" in part)


def compile_facts(rows, kernel: str, variant: Dict[str, object], soft: Optional[Dict[str, object]] = None,
                  dtype: str = "bf16", shape: str = "") -> Optional[Dict[str, object]]:
    """Facts of the latest compiled row of ``kernel`` whose constexprs include
    ``variant``; rows of the preferred dtype/shape case first. ``soft``
    constexprs are preferred but may differ (named in ``aot_note``)."""
    def matches(row, wanted):
        have = parse_variant(row.get("variant", ""))
        return all(have.get(k) == str(int(v) if isinstance(v, bool) else v) for k, v in wanted.items())

    pool = [r for r in rows if r.get("kernel") == kernel and matches(r, variant)]
    if not pool:
        return None
    exact = [r for r in pool if matches(r, soft or {})]
    pool = exact or pool

    def rank(row):
        case = row.get("case", "")
        return (dtype in case.split(), bool(shape) and shape in case, row.get("date", ""), row["_line"])

    best = max(pool, key=rank)
    facts = {k: best.get(k) for k in FACT_KEYS}
    facts.update(aot_case=best.get("case"), aot_variant=best.get("variant"), aot_commit=best.get("commit"),
                 aot_date=best.get("date"))
    if soft and not exact:
        have = parse_variant(best.get("variant", ""))
        diffs = [f"{k}={have.get(k)} (launch: {v})" for k, v in soft.items() if have.get(k) != str(v)]
        facts["aot_note"] = "compiled row has " + ", ".join(diffs)
    return facts


# ----------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LMShape:
    level: str
    B: int
    H: int
    H_kv: int
    N: int  # full positions
    N_un: int  # unique tokens
    D: int


LEVELS = (("low", 89), ("mid", 195), ("high", 394))
TEXT, IMAGE = 66, 576


def llava_shapes(B: int = 1) -> List[LMShape]:
    return [LMShape(level, B, 32, 32, TEXT + IMAGE, TEXT + kept, 128) for level, kept in LEVELS]


# ----------------------------------------------------------------------------
# Per-kernel counts
# ----------------------------------------------------------------------------


def hf_rope(path: str, name: str, B: int, H: int, H_kv: int, n: int, D: int, table_rows: int, part: str) -> Kernel:
    """HF ``apply_rotary_pos_emb`` on q ``[B, H, n, D]`` and k ``[B, H_kv, n, D]``, eager:
    per tensor 5 kernels, 5.5 E read + 4.5 E written, plus one cos and one sin table."""
    reads = writes = 0
    table = table_rows * D * BF16
    for heads in (H, H_kv):
        e = B * heads * n * D * BF16
        reads += 11 * e // 2 + 2 * table
        writes += 9 * e // 2
    return Kernel(path, name, reads, writes, launches=10, part=part)


def prefill_fused(s: LMShape, gpu: GPU, path: str = "dymu_kernels", deterministic: bool = False) -> List[Kernel]:
    """The ``vtu_attention`` op on the Triton backend (its launch code in vtu_triton.py)."""
    B, H, Hk, N, U, D = s.B, s.H, s.H_kv, s.N, s.N_un, s.D
    q, kv = B * H * U * D, B * Hk * U * D
    bm, bn, _, _ = vtu_triton.fwd_config(D, torch.bfloat16, False, gpu.arch)
    n_m = cdiv(N, bm)
    # Causal block skipping: program m streams keys [0, min(N, (m+1)·BLOCK_M)) in BLOCK_N steps.
    blocks = [cdiv(min(N, (m + 1) * bm), bn) for m in range(n_m)]
    per_head = [4 * bm * nblk * bn * D for nblk in blocks]
    tiles = f"{bm}x{bn} tiles, {blocks[0]}..{blocks[-1]} key blocks per CTA"
    variant = dict(CAUSAL=1, DECODE=0, ATOMIC=0 if deterministic else 1, IEEE=0, UPCAST=0, FIX_RNE=0, HALF_TABLE=0,
                   BLOCK_M=bm, BLOCK_N=bn, BLOCK_H=pow2(D // 2), BLOCK_D=pow2(D))
    inputs = q * BF16 + 2 * kv * BF16 + B * N * I32 + 2 * B * N * D * BF16  # q, k, v, map, cos, sin
    ks = []
    if not deterministic:
        ks.append(Kernel(path, "torch: map>=0, .long(), clamp_min, zeros, .float(), scatter_add_ (counts)",
                         reads=B * (29 * N + 4 * U), writes=B * (21 * N + 8 * U), launches=6))
        ks.append(Kernel(path, "torch: zeros (fp32 accumulator out32)", writes=q * FP32))
        ks.append(Kernel(path, "_vtu_fwd_kernel (fp32 atomic re-merge)", reads=inputs + B * U * FP32 + q * FP32,
                         writes=q * FP32, flops=attention_flops(B, H, N, D, True), unit="tensor",
                         triton="_vtu_fwd_kernel", variant=variant, grid=vtu_triton.fwd_grid(B, H, N, bm),
                         cta_flops=per_head * (B * H),
                         note=tiles))
        ks.append(Kernel(path, "torch: out32.to(bf16)", reads=q * FP32, writes=q * BF16))
        return ks
    ks.append(Kernel(path, "torch: map>=0, .long(), clamp_min", reads=B * 16 * N, writes=B * 17 * N, launches=3))
    ks.append(Kernel(path, "_vtu_fwd_kernel (per-position fp32 output)", reads=inputs, writes=B * H * N * D * FP32,
                     flops=attention_flops(B, H, N, D, True), unit="tensor", triton="_vtu_fwd_kernel",
                     variant=variant, grid=vtu_triton.fwd_grid(B, H, N, bm), cta_flops=per_head * (B * H), note=tiles))
    # where, stable sort (3 launches), zeros, ones_like, scatter_add_, zeros, cumsum
    u1 = U + 1
    ks.append(Kernel(path, "torch: where, sort (stable), counts, cumsum", launches=9,
                     reads=B * (9 * N + 8 * N + 16 * N + 8 * u1 + 8 * U),
                     writes=B * (8 * N + 16 * N + 8 * u1 + 8 * N + 8 * u1 + 8 * u1 + 8 * U)))
    ks.append(Kernel(path, "_segment_mean_kernel", reads=B * H * N * D * FP32 + B * N * I64 + B * u1 * I64,
                     writes=q * BF16, triton="_segment_mean_kernel", variant=dict(BLOCK_U=32, BLOCK_D=pow2(D)),
                     grid=vtu_triton.segment_mean_grid(B, H, U, 32)))
    return ks


def prefill_dymu(s: LMShape, gpu: GPU) -> List[Kernel]:
    """``apply_dymu``'s attention block: identity RoPE, the fused op, the output transpose."""
    P = "dymu_kernels"
    q = s.B * s.H * s.N_un * s.D
    return [
        hf_rope(P, "HF RoPE, identity tables (q, k at N_un)", s.B, s.H, s.H_kv, s.N_un, s.D, s.B * s.N_un, "integration"),
        *prefill_fused(s, gpu, P),
        Kernel(P, "transpose(1, 2).contiguous() at N_un", reads=q * BF16, writes=q * BF16, part="integration"),
    ]


def sdpa(path: str, name: str, B: int, H: int, H_kv: int, T: int, N: int, D: int, causal: bool) -> Kernel:
    """FlashAttention: q [B, H, T, D] over N keys; reads q/k/v once, writes O and fp32 LSE once."""
    flops = attention_flops(B, H, N, D, causal) if T == N else attention_flops(B, H, N, D, False) * T // N
    return Kernel(path, name, reads=(B * H * T * D + 2 * B * H_kv * N * D) * BF16,
                  writes=B * H * T * D * BF16 + B * H * T * FP32, flops=flops, unit="tensor")


def scatter_mean(path: str, B: int, H: int, N: int, U: int, D: int) -> Kernel:
    """torch_scatter.scatter_mean(o [B, N, H, D], index [N] int64, dim=1, dim_size=U), bf16."""
    e_n, e_u = B * N * H * D * BF16, B * U * H * D * BF16
    reads = (e_n + N * I64 + e_u) + (N * BF16 + N * I64 + U * BF16) + U * BF16 + (U * BOOL + U * BF16) + (e_u + U * BF16)
    writes = e_u + e_u + N * BF16 + U * BF16 + U * BF16 + U * BOOL + U * BF16 + e_u
    return Kernel(path, "torch_scatter.scatter_mean -> N_un (8 ops)", reads=reads, writes=writes, launches=8)


def prefill_release(s: LMShape) -> List[Kernel]:
    B, H, Hk, N, U, D = s.B, s.H, s.H_kv, s.N, s.N_un, s.D
    P = "release"
    return [
        Kernel(P, "index_select Q, K, V -> N", reads=(B * H * U * D + 2 * B * Hk * U * D) * BF16 + 3 * B * N * I64,
               writes=(B * H * N * D + 2 * B * Hk * N * D) * BF16, launches=3),
        hf_rope(P, "HF RoPE on expanded q, k at N", B, H, Hk, N, D, N, "op"),
        sdpa(P, "SDPA (FlashAttention) at N", B, H, Hk, N, N, D, True),
        scatter_mean(P, B, H, N, U, D),
    ]


def prefill_stock(s: LMShape) -> List[Kernel]:
    P = "stock LLaVA"
    return [hf_rope(P, "HF RoPE on q, k at N", s.B, s.H, s.H_kv, s.N, s.D, s.N, "op"),
            sdpa(P, "SDPA (FlashAttention) at N", s.B, s.H, s.H_kv, s.N, s.N, s.D, True)]


def decode_splits(s: LMShape, gpu: GPU, n_keys: int, block_m: int, block_n: int) -> Tuple[int, int]:
    """The package's own split-K choice for a GPU with ``gpu.sms`` SMs."""
    props = SimpleNamespace(multi_processor_count=gpu.sms)
    with mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props):
        return vtu_triton.decode_splits(s.B, s.H, 1, n_keys, torch.device("cuda"), block_m, block_n)


def decode_dymu(s: LMShape, gpu: GPU) -> List[Kernel]:
    """One decode step (T = 1) over the cache of the prompt: N + 1 positions, N_un + 1 rows."""
    B, H, Hk, D = s.B, s.H, s.H_kv, s.D
    n, u = s.N + 1, s.N_un + 1
    P = "dymu_kernels"
    bm, bn, _, _ = vtu_triton.fwd_config(D, torch.bfloat16, True, gpu.arch)
    splits, kv_per_split = decode_splits(s, gpu, n, bm, bn)
    q = B * H * D
    return [
        hf_rope(P, "HF RoPE, identity tables (new q, k)", B, H, Hk, 1, D, B, "integration"),
        Kernel(P, "DynamicCache append: torch.cat K, V (N_un+1 rows)", reads=2 * B * Hk * u * D * BF16,
               writes=2 * B * Hk * u * D * BF16, launches=2, part="cache"),
        Kernel(P, f"_vtu_fwd_kernel DECODE (split-K: {splits} x {kv_per_split} keys)",
               reads=q * BF16 + 2 * B * Hk * u * D * BF16 + B * n * I32 + 2 * B * n * D * BF16,
               writes=splits * q * FP32 + splits * B * H * FP32, flops=attention_flops(B, H, n, D, False) // n,
               unit="tensor", triton="_vtu_fwd_kernel",
               variant=dict(T=1, CAUSAL=1, DECODE=1, ATOMIC=0, IEEE=0, UPCAST=0, FIX_RNE=0, HALF_TABLE=0,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_H=pow2(D // 2), BLOCK_D=pow2(D)),
               grid=vtu_triton.fwd_grid(B, H, 1, bm, splits)),
        Kernel(P, "_decode_combine_kernel", reads=splits * (q * FP32 + B * H * FP32), writes=q * BF16,
               triton="_decode_combine_kernel", variant=dict(FIX_RNE=0, BLOCK_D=pow2(D)),
               soft=dict(BLOCK_S=pow2(splits, 2)), grid=vtu_triton.combine_grid(B, H, 1)),
    ]


def decode_release(s: LMShape) -> List[Kernel]:
    B, H, Hk, D = s.B, s.H, s.H_kv, s.D
    n = s.N + 1
    P = "release"
    return [
        hf_rope(P, "HF RoPE on new q, k", B, H, Hk, 1, D, B, "op"),
        Kernel(P, "DynamicCache append: torch.cat K, V (N+1 rows)", reads=2 * B * Hk * n * D * BF16,
               writes=2 * B * Hk * n * D * BF16, launches=2, part="cache"),
        sdpa(P, "SDPA (FlashAttention) decode over N+1 keys", B, H, Hk, 1, n, D, False),
    ]


@dataclass(frozen=True)
class ViTShape:
    B: int = 1
    N: int = 577  # tokens (capacity) entering the block, CLS included
    C: int = 1024
    heads: int = 16
    r: int = 21  # A tokens merged per image (only the merge kernel's FLOPs depend on it)
    N0: int = 577  # original tokens (pos_map length)


def dtome_merge_kernels(v: ViTShape) -> List[Kernel]:
    """``dtome_merge(..., threshold=float, backend="triton")`` with CLS: match() + merge_tokens()."""
    B, N, C, H, r, N0 = v.B, v.N, v.C, v.heads, v.r, v.N0
    dh = C // H
    na, nb = (N + 1) // 2, N // 2
    block_a, block_b, block_d, _ = dtome_triton.MATCH_CONFIG
    metric_bn = max(1, min(64, 8192 // pow2(dh)))
    P = "dymu_kernels"
    shape = f"N={N} C={C} heads={H}"
    plan_block, tiles = dtome_triton.plan_tiles(na)
    ks = [
        Kernel(P, "_metric_kernel (head mean, L2 norm)", reads=B * H * N * dh * BF16, writes=B * N * dh * FP32,
               flops=B * N * dh * (H + 4), unit="fp32", triton="_metric_kernel",
               variant=dict(BLOCK_N=metric_bn, BLOCK_D=pow2(dh)), grid=dtome_triton.metric_grid(B, N, metric_bn)),
        Kernel(P, "_match_kernel (A·Bᵀ fp32, row max, threshold)", reads=B * N * dh * FP32 + B * I32,
               writes=B * na * (FP32 + I64 + I8), flops=2 * B * na * nb * dh, unit="fp32", triton="_match_kernel",
               variant=dict(CLS=1, USE_THRESHOLD=1, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=min(pow2(dh), block_d)),
               grid=dtome_triton.match_grid(B, na, block_a)),
        Kernel(P, "_plan_count_kernel (kept / merged per tile)", reads=B * na * I8 + B * I32,
               writes=2 * B * tiles * I64, triton="_plan_count_kernel",
               variant=dict(BY_SCORE=0, BLOCK=plan_block), grid=dtome_triton.plan_grid(B, tiles)),
        Kernel(P, "_plan_kernel (prefix sums, new slots)", reads=B * na * (I8 + I64) + B * I32 + B * tiles * I64,
               writes=B * N * I64 * 2, triton="_plan_kernel",
               variant=dict(BY_SCORE=0, BLOCK=plan_block), grid=dtome_triton.plan_grid(B, tiles)),
    ]
    nb1, nb2 = nb + 1, nb + 2
    # zeros(home); merge.bool(); arange; *2; lengths.long(); <; &; where; sort (3); zeros; ones_like;
    # scatter_add_; zeros; cumsum
    glue_r = (B * na * I8 + na * I64 + B * I32 + (na * I64 + B * I64) + 2 * B * na * BOOL
              + B * na * (BOOL + I64) + B * na * I64 + (2 * B * na * I64 + B * nb1 * I64) + B * nb1 * I64)
    glue_w = (B * na * BOOL + na * I64 + na * I64 + B * I64 + B * na * BOOL + B * na * BOOL
              + B * na * I64 + 2 * B * na * I64 + B * nb1 * I64 + B * na * I64 + B * nb1 * I64 + B * nb2 * I64
              + B * nb1 * I64)
    ks.insert(2, Kernel(P, "torch: zeros(home) (before the plan kernels)", writes=B * N * I64))
    # Between the plan kernels: kept per image, the tiles' exclusive scan, merged per image, new lengths
    # (sum, cumsum, sub, sum, lengths.long, // 2, add).
    ks.insert(4, Kernel(P, "torch: tile scan, new lengths", reads=5 * B * tiles * I64 + B * I32 + 3 * B * I64,
                        writes=2 * B * tiles * I64 + 5 * B * I64, launches=7))
    ks.append(Kernel(P, "torch: valid/key, stable sort, counts, cumsum", reads=glue_r, writes=glue_w,
                     launches=15))
    ks.append(Kernel(P, "_merge_kernel (size-weighted gather)",
                     reads=B * N * C * BF16 + B * N * FP32 + B * N * I64 + 2 * B * I64 + B * nb2 * I64 + B * na * I64,
                     writes=B * N * C * BF16 + B * N * FP32, flops=B * C * (2 * N + 2 * r), unit="fp32",
                     triton="_merge_kernel", variant=dict(BLOCK_R=16, BLOCK_C=min(pow2(C), 256), FIX_RNE=0),
                     grid=dtome_triton.merge_grid(B, N, C, 16, min(pow2(C), 256))))
    # pos_map >= 0, .long(), clamp_min, dest.gather, where, .to(int32); new_len.to(int32)
    ks.append(Kernel(P, "torch: compose pos_map (gather), casts", launches=7,
                     reads=B * N0 * (I32 + I32 + I64 + I64 + BOOL + I64 + I64) + B * N * I64 + B * I64,
                     writes=B * N0 * (BOOL + I64 + I64 + I64 + I64 + I32) + B * I32))
    for k in ks:
        k.aot_shape = shape
    return ks


# ----------------------------------------------------------------------------
# Vision tower: trim=True vs trim=False
# ----------------------------------------------------------------------------


def tower_block_items(B: int, L_attn: int, L_mlp: int, capacity: int, C: int = 1024, r: int = 21) -> List[Kernel]:
    """One CLIP block as roofline items: attention-side linears (QKV, O) at L_attn,
    attention core at L_attn, the DToMe merge at the capacity, MLP at L_mlp.
    Layer norms, GELU and residual adds are not counted (same in both schemes)."""
    w = lambda params: params * BF16  # noqa: E731
    return [
        Kernel("tower", "QKV + out proj", reads=w(4 * C * C) + B * L_attn * C * 2 * BF16,
               writes=B * L_attn * C * 4 * BF16, flops=2 * B * L_attn * 4 * C * C, unit="tensor", part="block"),
        Kernel("tower", "attention core (SDPA)", reads=3 * B * L_attn * C * BF16, writes=B * L_attn * C * BF16,
               flops=attention_flops(B, 1, L_attn, C, False), unit="tensor", part="block"),
        *dtome_merge_kernels(ViTShape(B=B, N=capacity, r=r)),
        Kernel("tower", "MLP fc1 + fc2", reads=w(8 * C * C) + B * L_mlp * C * 5 * BF16,
               writes=B * L_mlp * C * 5 * BF16, flops=2 * B * L_mlp * 8 * C * C, unit="tensor", part="block"),
    ]


def tower_model(B: int, r: int, gpu: GPU, blocks: int = 24, N0: int = 577) -> Dict[str, object]:
    """Roofline time of the merging tower with and without trimming (bench_dtome.py: 24 blocks, fixed r)."""
    out = {}
    for trim in (False, True):
        total, launches, L = 0.0, 0, N0
        for _ in range(blocks):
            L_next = L - r
            cap = L if trim else N0
            items = tower_block_items(B, cap, L_next if trim else N0, cap, r=r)
            total += sum(roofline(k.flops, k.unit, k.bytes, gpu)["time_us"] for k in items)
            launches += sum(k.launches for k in items)
            L = L_next
        out[trim] = {"time_us": total, "merge_launches": launches, "tokens_out": L}
    saved = out[False]["time_us"] - out[True]["time_us"]
    return {"B": B, "r": r, "blocks": blocks, "tokens_out": out[True]["tokens_out"],
            "untrimmed_us": out[False]["time_us"], "trimmed_us": out[True]["time_us"], "saved_us": saved,
            "host_syncs": blocks, "break_even_sync_us": saved / blocks}


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


def evaluate(kernels: List[Kernel], gpu: GPU, aot_rows, scenario: str, shape: str) -> List[Dict[str, object]]:
    """One row per kernel plus a total per path."""
    rows = []
    by_path: Dict[str, List[Dict[str, object]]] = {}
    for k in kernels:
        row = {"scenario": scenario, "shape": shape, "path": k.path, "kernel": k.name, "part": k.part,
               "launches": k.launches, "flops": k.flops, "flop_unit": k.unit or None, "bytes_read": k.reads,
               "bytes_written": k.writes, "bytes": k.bytes, **roofline(k.flops, k.unit, k.bytes, gpu),
               "in_total": k.in_total, "note": k.note or None}
        if k.grid:
            row["grid"] = "x".join(str(g) for g in k.grid)
            row["ctas"] = math.prod(k.grid)
        if k.triton:
            facts = compile_facts(aot_rows, k.triton, k.variant, k.soft, "bf16", k.aot_shape)
            row["triton_kernel"] = k.triton
            if facts:
                row.update(facts)
            if k.cta_flops:
                per_sm = ctas_per_sm(facts, gpu)
                row["ctas_per_sm"] = per_sm
                row["cta_schedule_us"] = max(cta_schedule_us(k.cta_flops, gpu, per_sm), row["t_memory_us"])
                row["mma_tile_flops"] = sum(k.cta_flops)
        rows.append(row)
        by_path.setdefault(k.path, []).append(row)
    for path, prs in by_path.items():
        counted = [r for r in prs if r["in_total"]]
        flops = sum(r["flops"] for r in counted)
        nbytes = sum(r["bytes"] for r in counted)
        t = sum(r["time_us"] for r in counted)
        t_c = sum(r["time_us"] for r in counted if r["bound"] == "compute")
        total = {"scenario": scenario, "shape": shape, "path": path, "kernel": "total", "part": "total",
                 "launches": sum(r["launches"] for r in counted), "flops": flops, "bytes": nbytes,
                 "bytes_read": sum(r["bytes_read"] for r in counted),
                 "bytes_written": sum(r["bytes_written"] for r in counted),
                 "time_us": t, "bound": "compute" if t_c > t / 2 else "memory",
                 "compute_share": t_c / t if t else 0.0, "intensity": flops / nbytes if nbytes else None,
                 "in_total": True}
        op = [r for r in counted if r["part"] == "op"]
        if len(op) != len(counted):
            total["op_time_us"] = sum(r["time_us"] for r in op)
            total["op_bytes"] = sum(r["bytes"] for r in op)
            total["op_launches"] = sum(r["launches"] for r in op)
        rows.append(total)
    return rows


def bench_vtu_n_un(N: int, ratio: float) -> int:
    """Unique tokens of ``bench_vtu.py``'s merge maps: 64 text tokens per 576-token
    image block, each image block merged into ``max(1, round(ratio * n_img))`` groups."""
    n_un = p = 0
    while p < N:
        text = min(64, N - p)
        n_un, p = n_un + text, p + text
        n_img = min(576, N - p)
        if n_img > 0:
            n_un, p = n_un + max(1, round(ratio * n_img)), p + n_img
    return n_un


def bench_vtu_rows(gpu: GPU, aot_rows, ratio: float = 0.34) -> List[Dict[str, object]]:
    """The fused kernel alone and the SDPA floor (pre-expanded Q/K/V at N) at
    ``bench_vtu.py``'s shapes, with the largest fraction of the bf16 peak each can
    reach on the causal FLOPs (what that benchmark reports)."""
    rows = []
    for B in (1, 8):
        for N in (640, 2944, 8192):
            s = LMShape("bench_vtu", B, 32, 32, N, bench_vtu_n_un(N, ratio), 128)
            k = next(k for k in prefill_fused(s, gpu) if k.triton)
            floor = sdpa("SDPA floor", "SDPA at N, pre-expanded", B, 32, 32, N, N, 128, True)
            kr, fr = (evaluate([x], gpu, aot_rows, "bench_vtu", f"B={B} N={N} N_un={s.N_un}")[0] for x in (k, floor))
            rows.append({"scenario": "bench_vtu", "path": "dymu_kernels", "kernel": k.name, "B": B, "N": N,
                         "N_un": s.N_un, "flops": k.flops, "bytes": k.bytes, "time_us": kr["time_us"],
                         "bound": kr["bound"], "cta_schedule_us": kr["cta_schedule_us"], "grid": kr["grid"],
                         "ctas_per_sm": kr["ctas_per_sm"],
                         "max_peak_fraction": kr["t_compute_us"] / kr["cta_schedule_us"],
                         "floor_time_us": fr["time_us"], "floor_bound": fr["bound"],
                         "floor_max_peak_fraction": fr["t_compute_us"] / fr["time_us"]})
    return rows


def model(gpu: GPU, aot_rows, merged_per_block: int = 21) -> Dict[str, List[Dict[str, object]]]:
    out: Dict[str, List[Dict[str, object]]] = {"prefill": [], "decode": [], "dtome_merge": [], "clip_tower": [],
                                                "bench_vtu": bench_vtu_rows(gpu, aot_rows)}
    for s in llava_shapes():
        shape = f"B={s.B} H={s.H} D={s.D} N={s.N} N_un={s.N_un} ({s.level})"
        ks = prefill_dymu(s, gpu) + prefill_fused(s, gpu, "dymu_kernels deterministic=True (op)", True)
        ks += prefill_release(s) + prefill_stock(s)
        out["prefill"] += [dict(r, level=s.level) for r in evaluate(ks, gpu, aot_rows, "prefill", shape)]
        dshape = f"B={s.B} H={s.H} D={s.D} T=1 N={s.N + 1} N_un={s.N_un + 1} ({s.level})"
        out["decode"] += [dict(r, level=s.level) for r in
                          evaluate(decode_dymu(s, gpu) + decode_release(s), gpu, aot_rows, "decode", dshape)]
    for B in (1, 32):
        v = ViTShape(B=B, r=merged_per_block)
        shape = f"B={B} N={v.N} C={v.C} heads={v.heads}x{v.C // v.heads} threshold, r={v.r}"
        out["dtome_merge"] += [dict(r, batch=B) for r in
                               evaluate(dtome_merge_kernels(v), gpu, aot_rows, "dtome_merge", shape)]
    for B in (1, 32):
        for r in (21, 16, 8):
            t = tower_model(B, r, gpu)
            out["clip_tower"].append({"scenario": "clip_tower", "path": "dymu_kernels", "kernel": "DToMe CLIP-L tower",
                                      "shape": f"B={B} 24 blocks r={r}", **t})
    return out


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{max(0, digits - 1 - math.floor(math.log10(abs(v))))}f}"


def mflop(v) -> str:
    return fmt(v / 1e6) if v else ""


def mbytes(v) -> str:
    return fmt(v / 1e6)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


KERNEL_HEADER = ["path", "kernel", "launches", "MFLOP", "MB", "FLOP/B", "bound", "roofline µs", "CTA-sched. µs",
                 "grid", "regs", "stack/local B", "ldl/stl", "smem KB", "hgmma/hmma", "ffma", "compiled as (triton_aot)"]


def kernel_rows(rows) -> List[List[str]]:
    out = []
    for r in rows:
        total = r["kernel"] == "total"
        name = "**total**" if total else (r["kernel"] + (" †" if not r["in_total"] else ""))
        if total and r.get("op_time_us") is not None:
            name += f" (op alone: {fmt(r['op_time_us'])} µs, {mbytes(r['op_bytes'])} MB, {r['op_launches']} launches)"
        bound = r["bound"] + (f" ({r['compute_share']:.0%} compute)" if total else "")
        has = "reg" in r and r.get("reg") is not None
        compiled = ""
        if r.get("triton_kernel"):
            compiled = (f"{r['aot_case']} ({r['num_warps']} warps, {r['num_stages']} stages)" if has
                        else "no compiled row")
            if r.get("aot_note"):
                compiled += "; " + r["aot_note"]
            if r.get("note"):
                compiled += "; " + r["note"]
        out.append([
            r["path"], name, fmt(r["launches"]), mflop(r["flops"]), mbytes(r["bytes"]),
            fmt(r["intensity"]) if r.get("flops") else "0", bound, fmt(r["time_us"]),
            fmt(r.get("cta_schedule_us")) if r.get("cta_schedule_us") else "", r.get("grid", ""),
            fmt(r["reg"]) if has else "", f"{r['stack']}/{r['local']}" if has else "",
            f"{r['ldl']}/{r['stl']}" if has else "", fmt(r["shared"] / 1024) if has else "",
            f"{r['hgmma']}/{r['hmma']}" if has else "", fmt(r["ffma"]) if has else "", compiled,
        ])
    return out


def totals(rows, scenario: str, level: str, path: str) -> Optional[Dict[str, object]]:
    for r in rows:
        if r["kernel"] == "total" and r["path"] == path and r.get("level") == level and r["scenario"] == scenario:
            return r
    return None


def fused_kernel_row(rows, level: str, deterministic: bool = False):
    name = "_vtu_fwd_kernel (per-position" if deterministic else "_vtu_fwd_kernel (fp32 atomic"
    return next(r for r in rows if r.get("level") == level and r["kernel"].startswith(name))


def summary_rows(gpu: GPU, m) -> List[List[str]]:
    out = []
    for level, _ in LEVELS:
        d, rel, st = (totals(m["prefill"], "prefill", level, p) for p in ("dymu_kernels", "release", "stock LLaVA"))
        k = fused_kernel_row(m["prefill"], level)
        det = totals(m["prefill"], "prefill", level, "dymu_kernels deterministic=True (op)")
        out.append([gpu.name, f"prefill {level} (N_un={d['shape'].split('N_un=')[1].split()[0]})",
                    f"{fmt(d['time_us'])} ({fmt(d['op_time_us'])})",
                    f"{fmt(det['time_us'])} ({det['time_us'] / d['op_time_us']:.2f}x, {det['launches']} launches)",
                    f"{mbytes(d['bytes'])}", str(d["launches"]),
                    fmt(rel["time_us"]), mbytes(rel["bytes"]), str(rel["launches"]),
                    f"{rel['time_us'] / d['time_us']:.2f}x", fmt(st["time_us"]),
                    f"{fmt(k['time_us'])} / {fmt(k['cta_schedule_us'])}"])
    for level, _ in LEVELS:
        d, rel = (totals(m["decode"], "decode", level, p) for p in ("dymu_kernels", "release"))
        out.append([gpu.name, f"decode {level}", f"{fmt(d['time_us'])} ({fmt(d['op_time_us'])})",
                    "= atomic (decode has no atomics)", mbytes(d["bytes"]),
                    str(d["launches"]), fmt(rel["time_us"]), mbytes(rel["bytes"]), str(rel["launches"]),
                    f"{rel['time_us'] / d['time_us']:.2f}x", "= release", ""])
    return out


SUMMARY_HEADER = ["GPU", "per decoder layer", "dymu_kernels µs (op alone)",
                  "op with deterministic=True µs (vs atomic op, launches)", "MB", "launches", "release µs", "MB",
                  "launches", "release / dymu_kernels", "stock LLaVA µs", "_vtu_fwd_kernel roofline / CTA-sched. µs"]


def confirm_list(gpu: GPU, m) -> List[str]:
    low = fused_kernel_row(m["prefill"], "low")
    d_low, r_low = totals(m["prefill"], "prefill", "low", "dymu_kernels"), totals(m["prefill"], "prefill", "low", "release")
    d_high, r_high = (totals(m["prefill"], "prefill", "high", p) for p in ("dymu_kernels", "release"))
    ident = next(r for r in m["prefill"] if r.get("level") == "low" and r["kernel"].startswith("HF RoPE, identity"))
    dec = {lvl: (totals(m["decode"], "decode", lvl, "dymu_kernels"), totals(m["decode"], "decode", lvl, "release"))
           for lvl, _ in LEVELS}
    dk = next(r for r in m["decode"] if r.get("level") == "low" and r["kernel"].startswith("_vtu_fwd_kernel DECODE"))
    cache = {p: next(r for r in m["decode"] if r.get("level") == "low" and r["path"] == p and r["part"] == "cache")
             for p in ("dymu_kernels", "release")}
    merge1 = next(r for r in m["dtome_merge"] if r["batch"] == 1 and r["kernel"] == "total")
    merge32 = next(r for r in m["dtome_merge"] if r["batch"] == 32 and r["kernel"] == "total")
    tw = {(t["B"], t["r"]): t for t in m["clip_tower"]}
    frac = low["time_us"] / low["cta_schedule_us"]
    bv = {(r["B"], r["N"]): r for r in m["bench_vtu"]}
    acc = [r for r in m["prefill"] if r.get("level") == "low" and r["path"] == "dymu_kernels"
           and ("out32" in r["kernel"] or "atomic" in r["kernel"])]
    acc_bytes = sum(r["bytes"] for r in acc if "out32" in r["kernel"]) + 2 * next(
        r for r in acc if "atomic" in r["kernel"])["bytes_written"]
    op_low = d_low["op_bytes"]
    lines = [
        f"**Fused prefill kernel: the CTA schedule, not the roofline, bounds it at LLaVA's length.** At N = 642, "
        f"B = 1 `_vtu_fwd_kernel` is a {low['grid']} grid ({low['ctas']} CTAs on {gpu.sms} SMs, {low['ctas_per_sm']} "
        f"per SM by its {low['reg']} registers x {low['num_warps']} warps; {low['note']}): roofline "
        f"{fmt(low['time_us'])} µs ({low['bound']}-bound, {fmt(low['intensity'])} FLOP/B), CTA-schedule bound "
        f"{fmt(low['cta_schedule_us'])} µs, so at most {frac:.0%} of the bf16 peak on the causal FLOPs. "
        f"`bench_vtu.py` reports that fraction; the model's ceilings at its shapes are "
        f"{bv[(1, 640)]['max_peak_fraction']:.0%} (B = 1, N = 640), {bv[(8, 640)]['max_peak_fraction']:.0%} "
        f"(B = 8, N = 640) and {bv[(1, 8192)]['max_peak_fraction']:.0%} (B = 1, N = 8192). A measured fraction "
        f"within ~2x of these is on target; far below, the gathered loads and in-register rotation cost more than "
        f"modelled (compare the SDPA floor, provider (b)).",
        f"**The fp32 re-merge accumulator.** Of the op's {mbytes(op_low)} MB (low), {mbytes(acc_bytes)} MB are the "
        f"fp32 `out32` round trip (zero-fill, atomic read-modify-write, cast to bf16), counted in HBM here; at "
        f"{mbytes(acc[0]['bytes'])} MB it may stay in L2. A GPU profile (Nsight Compute: dram bytes of the three "
        f"kernels) decides whether `deterministic=True` (per-position fp32 output + `_segment_mean_kernel`, "
        f"modelled {fmt(totals(m['prefill'], 'prefill', 'low', 'dymu_kernels deterministic=True (op)')['time_us'])} "
        f"vs {fmt(d_low['op_time_us'])} µs low, "
        f"{fmt(totals(m['prefill'], 'prefill', 'high', 'dymu_kernels deterministic=True (op)')['time_us'])} vs "
        f"{fmt(d_high['op_time_us'])} µs high) is really the cheaper one at high N_un.",
        f"**The expand path's extra bytes.** Per layer the release's path moves {mbytes(r_low['bytes'])} MB "
        f"(low) / {mbytes(r_high['bytes'])} MB (high) in {r_low['launches']} launches against {mbytes(d_low['bytes'])} / "
        f"{mbytes(d_high['bytes'])} MB in {d_low['launches']} for `apply_dymu`: roofline "
        f"{fmt(r_low['time_us'])} vs {fmt(d_low['time_us'])} µs (low), {r_low['time_us'] / d_low['time_us']:.1f}x. "
        f"`bench_vtu.py`'s provider (a) against (d) measures it (its (a) rotates in fp32, so it moves more than the "
        f"release).",
        f"**The integration's identity RoPE.** `apply_dymu` still runs HF `apply_rotary_pos_emb` with cos = 1, "
        f"sin = 0 on q and k at N_un: {ident['launches']} launches, {mbytes(ident['bytes'])} MB, "
        f"{fmt(ident['time_us'])} µs of the {fmt(d_low['time_us'])} µs modelled for the low setting, which do nothing. "
        f"A profile (`torch.profiler`) of one patched layer should show these 10 elementwise kernels.",
        f"**Decode split-K.** For T = 1 over {642 + 1} positions the decode kernel runs {dk['grid']} CTAs "
        f"({dk['kernel'].split('(')[1].rstrip(')')}), memory-bound at {fmt(dk['time_us'])} µs; the step reads "
        f"{mbytes(dec['low'][0]['bytes'])} MB vs the release's {mbytes(dec['low'][1]['bytes'])} MB (low; "
        f"{mbytes(dec['high'][0]['bytes'])} vs {mbytes(dec['high'][1]['bytes'])} MB high), whose cache holds every "
        f"expanded position. At {fmt(dec['low'][0]['time_us'])} vs {fmt(dec['low'][1]['time_us'])} µs (low) both are "
        f"a few µs at the roofline, so launch latency decides: a GPU run must show the "
        f"patched decode step at the unpatched step's time or below (`bench_vtu.py` decode rows, "
        f"`bench_decode_ab.py`), and that the combine kernel's second launch does not cost more than the bytes "
        f"saved. `DynamicCache`'s `torch.cat` of the whole cache each step († rows, not in the totals: "
        f"{mbytes(cache['dymu_kernels']['bytes'])} vs {mbytes(cache['release']['bytes'])} MB) outweighs the attention "
        f"itself in both.",
        f"**DToMe merge is launch-bound.** One block's merge moves {mbytes(merge1['bytes'])} MB at B = 1 "
        f"({fmt(merge1['time_us'])} µs roofline) and {mbytes(merge32['bytes'])} MB at B = 32 "
        f"({fmt(merge32['time_us'])} µs) in {merge1['launches']} launches; eager launch latency, not the kernels, sets "
        f"its time. `bench_dtome.py`'s merge rows should grow far less than 32x from B = 1 to B = 32; a CUDA "
        f"graph of the tower (possible with `trim=False`) is where that latency goes away.",
        f"**Does trimming pay on CUDA?** The roofline saving of `trim=True` over `trim=False` is "
        f"{fmt(tw[(1, 21)]['saved_us'])} µs per forward at B = 1, r = 21 ({fmt(tw[(1, 21)]['untrimmed_us'])} -> "
        f"{fmt(tw[(1, 21)]['trimmed_us'])} µs), {fmt(tw[(32, 21)]['saved_us'])} µs at B = 32 "
        f"({fmt(tw[(32, 21)]['untrimmed_us'])} -> {fmt(tw[(32, 21)]['trimmed_us'])} µs), against 24 host syncs: "
        f"trimming pays if a sync (plus the launch latency it exposes) costs less than "
        f"{fmt(tw[(1, 21)]['break_even_sync_us'])} µs (B = 1) / {fmt(tw[(32, 21)]['break_even_sync_us'])} µs (B = 32) "
        f"per block (r = 8: {fmt(tw[(1, 8)]['break_even_sync_us'])} / {fmt(tw[(32, 8)]['break_even_sync_us'])} µs). "
        f"`bench_dtome.py` times both; the model expects `trim=False` (the CUDA default) to win at B = 1 and "
        f"`trim=True` at large batches.",
    ]
    return lines


def markdown(gpu: GPU, m, other: Optional[Tuple[GPU, Dict]] = None, env: Optional[Dict[str, str]] = None) -> str:
    p = []
    p.append(label_line(gpu))
    p.append("")
    p.append(f"# GPU performance model: {gpu.name}")
    p.append("")
    p.append(f"Generated by `python3 benchmarks/gpu_model.py --gpu {gpu.key}`"
             + (f" (commit {env['commit']}, {env['date']})" if env else "") + ". Compile facts: "
             f"`benchmarks/results/triton_aot_sm{gpu.arch}.jsonl`. Assumptions (full list in the script's docstring): "
             "bf16 tensors, fp32 where the code allocates fp32; bytes = HBM reads + writes with every tensor counted "
             "once per kernel (K/V, cos/sin re-reads and atomics assumed L2-resident); attention FLOPs = "
             "`dymu_kernels.ops.vtu.attention_flops` (causal = half); time = max(FLOPs / peak, bytes / bandwidth) per "
             "kernel, summed along a path; launch latency not included (see `launches`).")
    p.append("")
    p.append("## Summary")
    p.append("")
    srows = summary_rows(gpu, m)
    if other:
        srows += summary_rows(*other)
    p.append(table(SUMMARY_HEADER, srows))
    p.append("")
    p.append("`dymu_kernels` = the attention block as `apply_dymu` runs it (identity RoPE, `vtu_attention` op, output "
             "transpose); \"op alone\" = the `vtu_attention` / `vtu_decode_attention` op. `release` = the official "
             "DyMU code's default path (index_select expand + RoPE + SDPA at N + scatter_mean). Decode totals exclude "
             "the KV-cache append. The `dymu_kernels` block is modelled with the op's atomic re-merge; `apply_dymu` "
             "passes deterministic=True by default, whose op time the deterministic=True column gives (swap it for "
             "the op-alone time).")
    for title, key in (("Prefill, one decoder layer", "prefill"), ("Decode step, one decoder layer", "decode")):
        for level, _ in LEVELS:
            rows = [r for r in m[key] if r.get("level") == level]
            p.append("")
            p.append(f"## {title}: {rows[0]['shape']}")
            p.append("")
            p.append(table(KERNEL_HEADER, kernel_rows(rows)))
    p.append("")
    p.append("† not in the total (KV-cache append: `DynamicCache` concatenates the whole cache every step; a static "
             "cache writes one row).")
    for B in (1, 32):
        rows = [r for r in m["dtome_merge"] if r["batch"] == B]
        p.append("")
        p.append(f"## DToMe merge, one CLIP ViT-L/14-336 block: {rows[0]['shape']}")
        p.append("")
        p.append(table(KERNEL_HEADER, kernel_rows(rows)))
    p.append("")
    p.append("## Vision tower: trim=True vs trim=False (`bench_dtome.py`: 24 blocks, fixed r)")
    p.append("")
    p.append("Roofline per block item (QKV/out projections and MLP with their weight reads, attention core, the "
             "merge at the current capacity), summed over 24 blocks; layer norms, GELU and residual adds not counted. "
             "`trim=True` runs block i at the tokens kept so far and syncs with the host once per block.")
    p.append("")
    p.append(table(["B", "r", "tokens out", "trim=False µs", "trim=True µs", "saved µs", "host syncs",
                    "break-even µs per sync"],
                   [[str(t["B"]), str(t["r"]), str(t["tokens_out"]), fmt(t["untrimmed_us"]), fmt(t["trimmed_us"]),
                     fmt(t["saved_us"]), str(t["host_syncs"]), fmt(t["break_even_sync_us"])] for t in m["clip_tower"]]))
    p.append("")
    p.append("## Fused kernel alone at `bench_vtu.py`'s shapes (bf16, H = 32, D = 128, ratio 0.34)")
    p.append("")
    p.append("Largest fraction of the bf16 peak on the causal FLOPs (`attention_flops`) each can reach: roofline "
             "compute time over the kernel's bound (the CTA schedule for the fused kernel, the roofline for the "
             "SDPA floor on pre-expanded, pre-rotated Q/K/V).")
    p.append("")
    p.append(table(["B", "N", "N_un", "MFLOP", "grid", "fused roofline µs", "fused CTA-sched. µs", "fused max % of peak",
                    "SDPA floor roofline µs", "floor max % of peak"],
                   [[str(r["B"]), str(r["N"]), str(r["N_un"]), mflop(r["flops"]), r["grid"], fmt(r["time_us"]),
                     fmt(r["cta_schedule_us"]), f"{r['max_peak_fraction']:.0%}", fmt(r["floor_time_us"]),
                     f"{r['floor_max_peak_fraction']:.0%}"] for r in m["bench_vtu"]]))
    p.append("")
    p.append("## What a GPU run has to confirm")
    p.append("")
    p += [f"{i}. {line}" for i, line in enumerate(confirm_list(gpu, m), 1)]
    p.append("")
    return "\n".join(p)


def jsonl_rows(gpu: GPU, m, detailed: bool) -> List[Dict[str, object]]:
    rows = []
    for scenario, rs in m.items():
        for r in rs:
            if not detailed and r.get("kernel") != "total" and not r.get("triton_kernel"):
                continue
            if not detailed and scenario in ("dtome_merge", "clip_tower"):
                continue
            rows.append({"op": "gpu_model", "model": "roofline (model, not measurement)", "gpu": gpu.name,
                         "peak_tflops_bf16": gpu.tflops, "peak_tflops_fp32": gpu.fp32_tflops, "peak_tbps": gpu.tbps,
                         "sms": gpu.sms, **r})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="chip modelled in detail (default h100)")
    ap.add_argument("--tflops", type=float, help="bf16 dense tensor-core peak, TFLOP/s (H100 SXM: 989, A100: 312)")
    ap.add_argument("--tbps", type=float, help="HBM bandwidth, TB/s (H100 SXM: 3.35, A100: 2.0)")
    ap.add_argument("--fp32-tflops", type=float, help="fp32 CUDA-core peak, TFLOP/s (H100 SXM: 67, A100: 19.5)")
    ap.add_argument("--merged", type=int, default=21, help="A tokens merged per image in the modelled block (DToMe)")
    ap.add_argument("--results-dir", default=RESULTS_DIR, help="where gpu_model.jsonl / .md go")
    ap.add_argument("--aot-dir", default=RESULTS_DIR, help="where the triton_aot_sm*.jsonl compile reports are")
    ap.add_argument("--no-save", action="store_true", help="print only")
    args = ap.parse_args(argv)

    base = GPUS[args.gpu]
    gpu = GPU(base.key, base.name, args.tflops or base.tflops, args.fp32_tflops or base.fp32_tflops,
              args.tbps or base.tbps, base.sms, base.arch, base.smem_per_sm)
    other_gpu = GPUS["a100" if args.gpu == "h100" else "h100"]
    m = model(gpu, load_aot_rows(gpu.arch, args.aot_dir), args.merged)
    m_other = model(other_gpu, load_aot_rows(other_gpu.arch, args.aot_dir), args.merged)
    env = environment()
    text = markdown(gpu, m, (other_gpu, m_other), env)
    print(text)
    if not args.no_save:
        os.makedirs(args.results_dir, exist_ok=True)
        with open(os.path.join(args.results_dir, "gpu_model.md"), "w") as f:
            f.write(text)
        path = write_rows("gpu_model", jsonl_rows(gpu, m, True) + jsonl_rows(other_gpu, m_other, False),
                          args.results_dir)
        print(f"rows appended to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
