"""Triton DToMe merge: one encoder block's merge on the GPU, no host sync.

Contract: :func:`dymu_kernels.reference.dtome_merge` (same merges, sizes,
lengths and pos_map; features within rounding). Pipeline, all launched
asynchronously so a whole merged ViT forward can be captured in a CUDA graph:

1. ``_metric_kernel``   head-average the keys and L2-normalise them (fp32).
2. ``_match_kernel``    A·Bᵀ tiles with ``tl.dot`` in IEEE fp32, running row
                        max/argmax (first index wins ties), threshold test —
                        the score matrix is never written to memory.
   (fixed-r ToMe mode ranks the [B, N/2] scores with torch.sort instead.)
3. ``_plan_count_kernel`` / ``_plan_kernel``: per image, tiles of up to
                        ``PLAN_BLOCK_MAX`` A slots; the counts of kept A tokens
                        per tile are prefix-summed on the device, then each
                        tile gives every old slot its new slot in the official
                        order (docs/design.md §1.1: an image merging nothing is
                        unchanged; kept A tokens by position with CLS, else
                        in score order, sorted by torch beforehand), and every
                        new slot its "home" token.
4. sources grouped per destination with a stable sort (torch), so each
   destination later sums its sources in increasing slot order.
5. ``_merge_kernel``    a tile of output rows gathers home + sources,
                        size-weighted in fp32: deterministic, every input row
                        read once.
   ``pos_map`` is composed with one gather.

Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl

import torch

from ..reference.dtome import MergeState, NORM_EPS, check_order_args, score_order
from .triton_utils import cast, fix_rne, launch_grid, pow2


@triton.jit
def _metric_kernel(
    m_ptr, out_ptr, N, H, D,
    s_mb, s_mh, s_mn, s_md,
    s_ob, s_on,
    EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows < N)[:, None] & (cols < D)[None, :]
    base = m_ptr + b * s_mb + rows[:, None] * s_mn + cols[None, :] * s_md
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for h in range(H):
        acc += tl.load(base + h * s_mh, mask=ok, other=0.0).to(tl.float32)
    acc = acc / H
    norm = tl.sqrt(tl.sum(acc * acc, axis=1))
    acc = acc / tl.maximum(norm, EPS)[:, None]
    tl.store(out_ptr + b * s_ob + rows[:, None] * s_on + cols[None, :], acc, mask=ok)


@triton.jit
def _match_kernel(
    m_ptr, len_ptr, max_ptr, idx_ptr, merge_ptr, threshold,
    N_A, D, s_mb, s_mn,
    CLS: tl.constexpr, USE_THRESHOLD: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    ia = tl.program_id(1).to(tl.int64) * BLOCK_A + tl.arange(0, BLOCK_A)
    cols = tl.arange(0, BLOCK_D)
    L = tl.load(len_ptr + b).to(tl.int64)
    a_ok = (2 * ia < L) & (ia < N_A)
    row_ok = a_ok
    if CLS:
        row_ok = a_ok & (ia != 0)
    a_rows = m_ptr + b * s_mb + (2 * ia) * s_mn
    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    best_j = tl.zeros([BLOCK_A], dtype=tl.int64)
    n_b = L // 2
    for j0 in range(0, n_b, BLOCK_B):
        jb = j0 + tl.arange(0, BLOCK_B).to(tl.int64)
        b_ok = jb < n_b
        b_rows = m_ptr + b * s_mb + (2 * jb + 1) * s_mn
        s = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        # Feature chunks keep the tiles in registers for wide metrics; a
        # head-averaged key (D <= BLOCK_D) is a single chunk.
        for d0 in range(0, D, BLOCK_D):
            d_ok = (d0 + cols < D)[None, :]
            a = tl.load(a_rows[:, None] + (d0 + cols)[None, :], mask=a_ok[:, None] & d_ok, other=0.0)
            bt = tl.load(b_rows[:, None] + (d0 + cols)[None, :], mask=b_ok[:, None] & d_ok, other=0.0)
            # IEEE fp32: TF32 would round scores enough to flip threshold decisions.
            s += tl.dot(a, tl.trans(bt), input_precision="ieee")
        s = tl.where(b_ok[None, :], s, float("-inf"))
        tile_max = tl.max(s, axis=1)
        tile_arg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64)
        better = tile_max > best  # strict: an earlier tile keeps ties
        best_j = tl.where(better, j0 + tile_arg, best_j)
        best = tl.where(better, tile_max, best)
    best = tl.where(row_ok, best, float("-inf"))
    out = b * N_A + ia
    in_range = ia < N_A
    tl.store(max_ptr + out, best, mask=in_range)
    tl.store(idx_ptr + out, best_j, mask=in_range)
    if USE_THRESHOLD:
        tl.store(merge_ptr + out, (best > threshold).to(tl.int8), mask=in_range)


@triton.jit
def _plan_tile(merge_ptr, order_ptr, len_ptr, pid, N_A, N_TILES, BY_SCORE: tl.constexpr, BLOCK: tl.constexpr):
    """The tile of program ``pid``: image ``b``, its A slots ``i`` (in the
    compaction order: by position with a CLS token, else the score order the
    launcher sorted, rule (b)), which of them merge and which stay."""
    b = pid // N_TILES
    L = tl.load(len_ptr + b).to(tl.int64)
    p = (pid % N_TILES) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = p < N_A
    if BY_SCORE:
        i = tl.load(order_ptr + b * N_A + p, mask=in_range, other=0)
    else:
        i = p
    a_ok = (2 * i < L) & in_range
    merged = (tl.load(merge_ptr + b * N_A + i, mask=in_range, other=0) != 0) & a_ok
    kept = a_ok & tl.where(merged, False, True)
    return b, L, p, i, in_range, merged, kept


@triton.jit
def _plan_count_kernel(
    merge_ptr, order_ptr, len_ptr, tile_kept_ptr, tile_merged_ptr,
    N_A, N_TILES, BY_SCORE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (image, tile of BLOCK A slots): how many of its A tokens stay and how many merge.
    pid = tl.program_id(0).to(tl.int64)
    _, _, _, _, _, merged, kept = _plan_tile(merge_ptr, order_ptr, len_ptr, pid, N_A, N_TILES, BY_SCORE, BLOCK)
    tl.store(tile_kept_ptr + pid, tl.sum(kept.to(tl.int64), axis=0))
    tl.store(tile_merged_ptr + pid, tl.sum(merged.to(tl.int64), axis=0))


@triton.jit
def _plan_kernel(
    merge_ptr, idx_ptr, order_ptr, len_ptr, dest_ptr, home_ptr, tile_off_ptr, n_kept_ptr, n_merged_ptr,
    N, N_A, N_TILES, BY_SCORE: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per (image, tile): the tile's kept A tokens are ranked after
    # those of earlier tiles (``tile_off``: an exclusive prefix sum of
    # ``_plan_count_kernel``'s counts), so any length runs in tiles of BLOCK.
    pid = tl.program_id(0).to(tl.int64)
    b, L, p, i, in_range, merged, kept = _plan_tile(merge_ptr, order_ptr, len_ptr, pid, N_A, N_TILES, BY_SCORE,
                                                    BLOCK)
    kept_i = kept.to(tl.int64)
    # Exclusive prefix sum: the new slot of a kept A token.
    rank = tl.load(tile_off_ptr + pid) + tl.cumsum(kept_i, axis=0) - kept_i
    n_kept = tl.load(n_kept_ptr + b)
    # Rule (a): an image that merges nothing keeps every token where it is.
    unchanged = tl.load(n_merged_ptr + b) == 0
    target = tl.load(idx_ptr + b * N_A + i, mask=in_range, other=0)
    slot_a = tl.where(unchanged, 2 * i, rank)
    dest_a = tl.where(kept, slot_a, tl.where(merged, n_kept + target, -1))
    tl.store(dest_ptr + b * N + 2 * i, dest_a, mask=in_range)
    j = p  # B tokens keep their order: B index j is the p-th B token
    b_ok = 2 * j + 1 < L
    slot_b = tl.where(unchanged, 2 * j + 1, n_kept + j)
    tl.store(dest_ptr + b * N + 2 * j + 1, tl.where(b_ok, slot_b, -1), mask=2 * j + 1 < N)
    tl.store(home_ptr + b * N + slot_a, 2 * i, mask=kept)
    tl.store(home_ptr + b * N + slot_b, 2 * j + 1, mask=b_ok)


@triton.jit
def _merge_kernel(
    x_ptr, size_ptr, home_ptr, new_len_ptr, n_kept_ptr, begin_ptr, src_ptr,
    out_ptr, out_size_ptr,
    N, C, N_A, N_B1,
    s_xb, s_xn, s_xc,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, FIX_RNE: tl.constexpr,
):
    # One program: BLOCK_R consecutive output rows of one image x BLOCK_C channels.
    blocks_per_image = tl.cdiv(N, BLOCK_R)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // blocks_per_image
    k = (pid % blocks_per_image) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = (cols < C)[None, :]
    live = (k < tl.load(new_len_ptr + b)) & (k < N)
    home = tl.load(home_ptr + b * N + k, mask=live, other=0)
    x_base = x_ptr + b * s_xb + cols[None, :] * s_xc
    x_home = tl.load(x_base + home[:, None] * s_xn, mask=live[:, None] & c_ok, other=0.0)
    s_home = tl.load(size_ptr + b * N + home, mask=live, other=0.0).to(tl.float32)
    # Only B tokens (new slots >= n_kept) receive sources: the CSR range of j.
    j = k - tl.load(n_kept_ptr + b)
    has_dest = live & (j >= 0)
    s0 = tl.load(begin_ptr + b * N_B1 + j, mask=has_dest, other=0)
    s1 = tl.load(begin_ptr + b * N_B1 + j + 1, mask=has_dest, other=0)
    acc = x_home.to(tl.float32) * s_home[:, None]
    total = s_home
    # Sources are added in slot order, one per step for every row of the tile.
    for t in range(0, tl.max(s1 - s0, axis=0)):
        has = s0 + t < s1
        src = 2 * tl.load(src_ptr + b * N_A + s0 + t, mask=has, other=0)
        w = tl.load(size_ptr + b * N + src, mask=has, other=0.0).to(tl.float32)
        acc += tl.load(x_base + src[:, None] * s_xn, mask=has[:, None] & c_ok, other=0.0).to(tl.float32) * w[:, None]
        total += w
    averaged = cast(acc / tl.maximum(total, 1e-30)[:, None], x_home.dtype, FIX_RNE)
    # A row that receives nothing is moved bit-exactly; dead rows become 0.
    out = tl.where((s1 > s0)[:, None], averaged, x_home)
    row_ok = k < N
    tl.store(out_ptr + (b * N + k)[:, None] * C + cols[None, :], out, mask=row_ok[:, None] & c_ok)
    tl.store(out_size_ptr + b * N + k, total, mask=row_ok & (tl.program_id(1) == 0))


# Launch grids: the batch (or batch x row blocks) in dim 0, whose limit is
# 2^31 - 1; dim 1 holds a sequence's row blocks (<= 65535 up to ~500K tokens)
# or channel blocks. launch_grid names the kernel if a shape ever exceeds them.


def metric_grid(B: int, N: int, block_n: int):
    return launch_grid("_metric_kernel", B, triton.cdiv(N, block_n))


def match_grid(B: int, n_a: int, block_a: int):
    return launch_grid("_match_kernel", B, triton.cdiv(n_a, block_a))


# A slots one plan program holds: any longer image runs in several tiles
# (BLOCK=16384 in one program spilled ~1.8 KB of registers per thread).
PLAN_BLOCK_MAX = 2048


def plan_tiles(n_a: int):
    """``(BLOCK, tiles)`` of the plan kernels for ``n_a`` A slots per image."""
    block = min(pow2(n_a), PLAN_BLOCK_MAX)
    return block, triton.cdiv(n_a, block)


def plan_grid(B: int, tiles: int = 1):
    return launch_grid("_plan_kernel", B * tiles)


def merge_grid(B: int, N: int, C: int, block_r: int, block_c: int):
    return launch_grid("_merge_kernel", B * triton.cdiv(N, block_r), triton.cdiv(C, block_c))


def normalized_metric(metric: torch.Tensor) -> torch.Tensor:
    """Head-averaged, L2-normalised keys ``[B, N, D]`` in fp32 (``[B, N, Dm]`` input: H = 1)."""
    m4 = metric if metric.dim() == 4 else metric[:, None]
    B, H, N, D = m4.shape
    out = torch.empty((B, N, D), device=metric.device, dtype=torch.float32)
    BLOCK_D = pow2(D)
    # A [BLOCK_N, BLOCK_D] fp32 tile of at most 8K values stays in registers.
    BLOCK_N = max(1, min(64, 8192 // BLOCK_D))
    _metric_kernel[metric_grid(B, N, BLOCK_N)](
        m4, out, N, H, D, *m4.stride(), out.stride(0), out.stride(1),
        EPS=NORM_EPS, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out


# (BLOCK_A, BLOCK_B, max BLOCK_D, num_warps). IEEE fp32 dots run on the CUDA
# cores, so the tiles are sized to stay in registers (no spills on sm_80/sm_90,
# checked by benchmarks/triton_aot.py).
MATCH_CONFIG = (32, 64, 64, 4)


def match(metric: torch.Tensor, lengths: torch.Tensor, threshold=None, *, cls_token: bool = True):
    """Best B match of every A token; with a threshold also the merge flags.

    Returns ``node_max [B, ceil(N/2)]`` fp32, ``node_idx`` int64 and
    ``merge`` (int8 flags, or None without a threshold).
    """
    m = normalized_metric(metric)
    B, N, D = m.shape
    n_a = (N + 1) // 2
    node_max = torch.empty((B, n_a), device=m.device, dtype=torch.float32)
    node_idx = torch.empty((B, n_a), device=m.device, dtype=torch.int64)
    merge = torch.empty((B, n_a), device=m.device, dtype=torch.int8) if threshold is not None else node_max
    if isinstance(threshold, torch.Tensor):
        # A device threshold stays on the device (graph capture); Triton takes
        # scalars by value, so compare in a separate elementwise op.
        thr_value, use_thr = 0.0, False
    else:
        thr_value, use_thr = (float(threshold) if threshold is not None else 0.0), threshold is not None
    BLOCK_A, BLOCK_B, BLOCK_D, num_warps = MATCH_CONFIG
    _match_kernel[match_grid(B, n_a, BLOCK_A)](
        m, lengths, node_max, node_idx, merge, thr_value, n_a, D, m.stride(0), m.stride(1),
        CLS=bool(cls_token), USE_THRESHOLD=use_thr,
        BLOCK_A=BLOCK_A, BLOCK_B=BLOCK_B, BLOCK_D=min(pow2(D), BLOCK_D), num_warps=num_warps,
    )
    if isinstance(threshold, torch.Tensor):
        merge = (node_max > threshold).to(torch.int8)
    return node_max, node_idx, (merge if threshold is not None else None)


def merge_tokens(
    state: MergeState,
    node_idx: torch.Tensor,
    merge: torch.Tensor,
    node_max: Optional[torch.Tensor] = None,
    *,
    cls_token: bool = True,
) -> MergeState:
    """Apply merge flags ``[B, ceil(N/2)]`` to a merge state (Triton plan + gather).

    Same contract as :func:`dymu_kernels.reference.merge_tokens`, order rules
    included: ``node_max`` orders the unmerged A tokens without a CLS token
    (required then); identical scores give an identical order.
    """
    check_order_args(node_max, cls_token)
    x, size, lengths, pos_map = state
    B, N, C = x.shape
    n_a, n_b = (N + 1) // 2, N // 2
    dev = x.device
    merge = merge.to(torch.int8).contiguous()
    node_idx = node_idx.contiguous()
    size_c = size.contiguous()
    dest = torch.empty((B, N), device=dev, dtype=torch.int64)
    home = torch.zeros((B, N), device=dev, dtype=torch.int64)
    # Rule (b) without CLS: the reference's own stable sort (on the device, no
    # host sync) so that equal scores give the reference's order exactly.
    order = score_order(node_max).contiguous() if not cls_token else node_idx
    # Tiles of at most PLAN_BLOCK_MAX A slots (more warps for larger tiles keep
    # each thread's share in registers); their counts are scanned on the device.
    block, tiles = plan_tiles(n_a)
    warps = min(16, max(4, block // 256))
    tile_kept = torch.empty((B, tiles), device=dev, dtype=torch.int64)
    tile_merged = torch.empty((B, tiles), device=dev, dtype=torch.int64)
    _plan_count_kernel[plan_grid(B, tiles)](
        merge, order, lengths, tile_kept, tile_merged, n_a, tiles,
        BY_SCORE=not cls_token, BLOCK=block, num_warps=warps,
    )
    n_kept = tile_kept.sum(1)
    tile_off = (torch.cumsum(tile_kept, 1) - tile_kept).contiguous()
    n_merged = tile_merged.sum(1)
    _plan_kernel[plan_grid(B, tiles)](
        merge, node_idx, order, lengths, dest, home, tile_off, n_kept, n_merged, N, n_a, tiles,
        BY_SCORE=not cls_token, BLOCK=block, num_warps=warps,
    )
    new_len = n_kept + lengths.long() // 2

    # Sources grouped by destination, in slot order within a group (stable sort).
    valid_merge = merge.bool() & (torch.arange(n_a, device=dev)[None, :] * 2 < lengths[:, None].long())
    key = torch.where(valid_merge, node_idx, n_b)
    src = torch.sort(key, dim=1, stable=True).indices.contiguous()
    counts = torch.zeros((B, n_b + 1), device=dev, dtype=torch.int64).scatter_add_(1, key, torch.ones_like(key))
    begin = torch.zeros((B, n_b + 2), device=dev, dtype=torch.int64)
    torch.cumsum(counts, dim=1, out=begin[:, 1:])

    out = torch.empty((B, N, C), device=dev, dtype=x.dtype)
    out_size = torch.empty((B, N), device=dev, dtype=torch.float32)
    BLOCK_R, BLOCK_C = 16, min(pow2(C), 256)
    _merge_kernel[merge_grid(B, N, C, BLOCK_R, BLOCK_C)](
        x, size_c, home, new_len, n_kept, begin, src, out, out_size,
        N, C, n_a, n_b + 2, *x.stride(), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, FIX_RNE=fix_rne(x.dtype),
    )
    new_pos = torch.where(pos_map >= 0, dest.gather(1, pos_map.long().clamp_min(0)), -1).to(pos_map.dtype)
    return MergeState(out, out_size.to(size.dtype), new_len.to(lengths.dtype), new_pos)
