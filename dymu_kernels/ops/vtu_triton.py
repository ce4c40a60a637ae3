"""Fused VTU attention in Triton (FlashAttention-2 style forward).

Contract: :func:`dymu_kernels.reference.vtu_attention_expand`. The kernel
never materialises the expanded sequence:

- each program takes BLOCK_M full positions of one (batch, head); their query
  rows are *gathered* from the unique tokens through ``merge_map`` and rotated
  in registers (fp32, HF ``rotate_half``) with cos/sin of the full positions;
- it streams key blocks the same way (gather unique K/V rows, rotate K at the
  key positions), with online softmax in fp32 (running max and sum, exp2),
  padding (``merge_map == -1``) masked, GQA by ``h // (H / H_kv)``, causal
  block skipping, and the causal mask only in the blocks the diagonal
  crosses (every row of the tile attends every key before them);
- NaN/inf (the op's contract, ops/vtu.py): a non-finite attended score
  poisons its row; in the diagonal blocks a masked pair's weight 0 would
  meet V in the MMA (0 * NaN = NaN), so a tile whose diagonal blocks hold a
  non-finite V value is recomputed exactly in small sub-tiles
  (``_exact_pv``), a path the common case never takes;
- the per-position output is re-merged into its unique token: by default an
  fp32 ``atomic_add`` of ``o_p / count(u)`` (no ``[N, D]`` intermediate); with
  ``deterministic=True`` the per-position outputs are written once and a
  second kernel averages each unique token's positions in position order
  (bit-identical run to run).

The decode path (``DECODE``) serves the KV cache of the LLaVA integration:
queries are the last T positions (new tokens, q given directly; a padding
one attends the tokens before it, and outputs 0 if there are none),
keys/values are still stored once per unique token.

Grids put every large product in dim 0 (``fwd_grid``, ``segment_mean_grid``,
``combine_grid``): CUDA allows 2^31 - 1 programs there but 65535 in dims 1-2.

Head dims 64, 80, 96, 128 (any even D >= 32); fp16, bf16 and fp32 inputs
(fp32 dots in IEEE precision). Runs on CUDA, and on the CPU under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_utils import cast, fix_rne, launch_grid, pow2, target_arch

LOG2E = 1.4426950408889634


@triton.jit
def _load_rotated(
    x_rows, c_rows, s_rows, dh, HALF_D, s_xd, s_cd, s_sd, mask,
    DTYPE: tl.constexpr, FIX_RNE: tl.constexpr, HALF_TABLE: tl.constexpr,
):
    """Gather rows split in halves, rotate them with HF rotate_half RoPE in
    fp32, and round once to the dot dtype. ``*_rows`` point at each row.
    HALF_TABLE: cos/sin hold one entry per frequency, shared by both halves."""
    x1 = tl.load(x_rows + dh[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + (dh[None, :] + HALF_D) * s_xd, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(c_rows + dh[None, :] * s_cd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_rows + dh[None, :] * s_sd, mask=mask, other=0.0).to(tl.float32)
    if HALF_TABLE:
        c2 = c1
        s2 = s1
    else:
        c2 = tl.load(c_rows + (dh[None, :] + HALF_D) * s_cd, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(s_rows + (dh[None, :] + HALF_D) * s_sd, mask=mask, other=0.0).to(tl.float32)
    return cast(x1 * c1 - x2 * s1, DTYPE, FIX_RNE), cast(x2 * c2 + x1 * s2, DTYPE, FIX_RNE)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter cannot multiply bf16; operands already
    # rounded to bf16 are exact in fp32, so an IEEE fp32 dot gives what the
    # tensor cores give (exact products, fp32 accumulation).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _has_non_finite(x):
    """1 if the tile holds a NaN or an inf, else 0 (int32 scalar)."""
    xf = x.to(tl.float32)
    return tl.max(tl.max(((xf != xf) | (tl.abs(xf) == float("inf"))).to(tl.int32), axis=1), axis=0)


@triton.jit
def _exact_pv(acc, p, allowed, v, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + p @ v`` over the attended pairs only, in IEEE arithmetic, for a
    diagonal block whose V holds NaN/inf (there a masked pair's 0 * NaN in the
    MMA would reach rows that do not attend that key).

    Finite values go through the MMA as usual. The non-finite ones are counted
    per (row, dim) by a second MMA of class codes, exact in fp32: pair weight
    w = 1 (attended, p > 0), 2^14 (attended, p rounded to 0: 0 * inf = NaN),
    0 (masked); value code c = 1 (+inf), 2^7 (-inf), 2^14 (NaN), 0 (finite).
    At most BLOCK_N <= 64 < 2^7 pairs of a class, so a sum >= 2^14 means NaN,
    and below it the +inf and -inf counts are its digits in base 2^7. All
    codes are powers of two that fp16 and bf16 hold exactly.
    """
    vf = v.to(tl.float32)
    nan = vf != vf
    pos_inf = vf == float("inf")
    neg_inf = vf == float("-inf")
    acc += _dot(p, tl.where(nan | pos_inf | neg_inf, tl.zeros_like(v), v), IEEE, UPCAST)
    w = tl.where(allowed, tl.where(p.to(tl.float32) > 0, 1.0, 16384.0), 0.0).to(v.dtype)
    c = tl.where(nan, 16384.0, tl.where(neg_inf, 128.0, tl.where(pos_inf, 1.0, 0.0))).to(v.dtype)
    counts = _dot(w, c, IEEE, UPCAST)
    n_neg = tl.floor(counts / 128.0)
    acc = tl.where(counts - 128.0 * n_neg > 0, acc + float("inf"), acc)
    acc = tl.where(n_neg > 0, acc - float("inf"), acc)  # +inf - inf: opposite infinities give NaN
    return tl.where(counts >= 16384.0, float("nan"), acc)


@triton.jit
def _attend_keys(
    acc, m_i, l_i, redo, qr1, qr2, pos, lo, hi, b, MAP, COS, SIN, k_base, v_base, N, HALF_D, scale_log2,
    s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, s_kn, s_kd, s_vn, s_vd, dh, dh_ok, dv, dv_ok,
    DIAGONAL: tl.constexpr, EXACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    FIX_RNE: tl.constexpr, HALF_TABLE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Online softmax of the query rows (rotated halves qr1, qr2 at positions
    ``pos``) over the key blocks ``[lo, hi)``; returns ``acc, m_i, l_i, redo``.
    Padding keys are masked (and load as 0).

    DIAGONAL: blocks the causal boundary crosses, where some rows do not
    attend some keys: the causal mask applies, and a masked pair's weight 0
    meets V in the MMA, where 0 * NaN is NaN. So a block whose V holds NaN/inf
    sets ``redo`` (the caller recomputes the tile with EXACT), and EXACT takes
    P@V over the attended pairs only (:func:`_exact_pv`). Before the boundary
    every row attends every key and the MMA is exact IEEE as it is.
    """
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        uk = tl.load(MAP + b * s_mb + offs_n * s_mn, mask=offs_n < N, other=-1).to(tl.int64)
        k_ok = uk >= 0
        k_row = tl.where(k_ok, uk, 0)
        kr1, kr2 = _load_rotated(
            k_base + k_row[:, None] * s_kn,
            COS + b * s_cb + offs_n[:, None] * s_cn, SIN + b * s_sb + offs_n[:, None] * s_sn,
            dh, HALF_D, s_kd, s_cd, s_sd, k_ok[:, None] & dh_ok, k_base.dtype.element_ty, FIX_RNE, HALF_TABLE,
        )
        scores = _dot(qr1, tl.trans(kr1), IEEE, UPCAST) + _dot(qr2, tl.trans(kr2), IEEE, UPCAST)
        # s * 0 is 0 for a finite score and NaN for an infinite one: a
        # non-finite score of an attended key makes its row NaN (-inf would
        # otherwise read as "masked").
        scores = scores * scale_log2 + scores * 0.0
        allowed = k_ok[None, :]
        if DIAGONAL:
            allowed = allowed & (offs_n[None, :] <= pos[:, None])
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows with no visible key yet keep m = -inf; shift by 0 to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Normalise by the sum of the weights actually used in P@V (rounded to
        # the input dtype), so that equal values average back exactly.
        p = cast(tl.exp2(scores - m_safe[:, None]), v_base.dtype.element_ty, FIX_RNE)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p.to(tl.float32), axis=1)
        v = tl.load(v_base + k_row[:, None] * s_vn + dv[None, :] * s_vd, mask=k_ok[:, None] & dv_ok, other=0.0)
        if DIAGONAL and EXACT:
            acc = _exact_pv(acc * alpha[:, None], p, allowed, v, IEEE, UPCAST)
        else:
            if DIAGONAL:
                redo += _has_non_finite(v)
            acc = acc * alpha[:, None] + _dot(p, v, IEEE, UPCAST)
        m_i = m_new
    return acc, m_i, l_i, redo


@triton.jit
def _attend_rows(
    rows, first, lo, hi_split, b, h, hk, Q, K, V, MAP, COS, SIN, scale_log2, N, T, HALF_D,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, D,
    CAUSAL: tl.constexpr, DECODE: tl.constexpr, EXACT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    FIX_RNE: tl.constexpr, HALF_TABLE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Attention of the ``ROWS`` query rows ``rows`` (positions; new-token
    indices in decode) of head (b, h) over this program's keys ``[lo,
    hi_split)``; ``first`` is the first row's position. Returns ``acc, m_i,
    l_i, redo`` and the rows' ``q_ok, q_row, pos``."""
    dh = tl.arange(0, BLOCK_H)
    dh_ok = (dh < HALF_D)[None, :]
    dv = tl.arange(0, BLOCK_D)
    dv_ok = (dv < D)[None, :]
    if DECODE:
        pos = N - T + rows
        q_ok = rows < T
        q_row = rows
    else:
        pos = rows
        u = tl.load(MAP + b * s_mb + pos * s_mn, mask=pos < N, other=-1).to(tl.int64)
        q_ok = u >= 0
        q_row = tl.where(q_ok, u, 0)
    pos_c = tl.where(q_ok, pos, 0)
    qr1, qr2 = _load_rotated(
        Q + b * s_qb + h * s_qh + q_row[:, None] * s_qn,
        COS + b * s_cb + pos_c[:, None] * s_cn, SIN + b * s_sb + pos_c[:, None] * s_sn,
        dh, HALF_D, s_qd, s_cd, s_sd, q_ok[:, None] & dh_ok, Q.dtype.element_ty, FIX_RNE, HALF_TABLE,
    )
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    hi = hi_split
    diagonal = hi_split
    if CAUSAL:
        # Keys after the rows' last position cannot contribute; keys before
        # their first one are attended by every row.
        hi = tl.minimum(hi_split, first + ROWS)
        diagonal = (first // BLOCK_N) * BLOCK_N
    mid = tl.minimum(hi, tl.maximum(lo, diagonal))
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    acc, m_i, l_i, redo = _attend_keys(
        acc, m_i, l_i, 0, qr1, qr2, pos, lo, mid, b, MAP, COS, SIN, k_base, v_base, N, HALF_D, scale_log2,
        s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, s_kn, s_kd, s_vn, s_vd, dh, dh_ok, dv, dv_ok,
        False, EXACT, IEEE, UPCAST, FIX_RNE, HALF_TABLE, BLOCK_N,
    )
    if CAUSAL:
        acc, m_i, l_i, redo = _attend_keys(
            acc, m_i, l_i, redo, qr1, qr2, pos, mid, hi, b, MAP, COS, SIN, k_base, v_base, N, HALF_D, scale_log2,
            s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, s_kn, s_kd, s_vn, s_vd, dh, dh_ok, dv, dv_ok,
            True, EXACT, IEEE, UPCAST, FIX_RNE, HALF_TABLE, BLOCK_N,
        )
    return acc, m_i, l_i, redo, q_ok, q_row, pos


@triton.jit
def _store_rows(
    acc, m_i, l_i, q_ok, q_row, pos, rows, OUT, LSE, COUNT, b, h, bh, n_bh, split, N_UN, T, D,
    s_os, s_ob, s_oh, s_on, s_od, DECODE: tl.constexpr, ATOMIC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    dv = tl.arange(0, BLOCK_D)
    dv_ok = (dv < D)[None, :]
    # l = 0: the row attends no key (its output is 0); l = NaN: poisoned (acc is NaN).
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    om = q_ok[:, None] & dv_ok
    if DECODE:  # partial result of this key slice, combined by _decode_combine_kernel
        tl.store(OUT + split * s_os + b * s_ob + h * s_oh + rows[:, None] * s_on + dv[None, :] * s_od, o, mask=om)
        # -inf drops an empty slice from the combine; NaN (poisoned) stays NaN.
        lse = tl.where(l_i == 0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0, 1.0, l_i)))
        tl.store(LSE + (split * n_bh + bh) * T + rows, lse, mask=q_ok)  # LSE [S, B*H, T]
    elif ATOMIC:
        cnt = tl.load(COUNT + b * N_UN + q_row, mask=q_ok, other=1.0)
        tl.atomic_add(OUT + b * s_ob + h * s_oh + q_row[:, None] * s_on + dv[None, :] * s_od, o / cnt[:, None], mask=om)
    else:  # per-position output, averaged deterministically afterwards
        tl.store(OUT + b * s_ob + h * s_oh + pos[:, None] * s_on + dv[None, :] * s_od, o, mask=om)


@triton.jit
def _exact_rerun(
    Q, K, V, MAP, COS, SIN, COUNT, OUT, LSE, scale_log2, N, N_UN, T, HALF_D, D,
    pid_m, first, lo, hi, b, h, hk, bh, n_bh, split, s_os,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, s_ob, s_oh, s_on, s_od,
    CAUSAL: tl.constexpr, DECODE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    FIX_RNE: tl.constexpr, HALF_TABLE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, SUB_M: tl.constexpr,
):
    """The tile's rows again, SUB_M at a time over SUB_M-key blocks, with P@V
    exact over the attended pairs in the diagonal blocks; stores them."""
    for sub in range(0, BLOCK_M, SUB_M):
        rows = pid_m * BLOCK_M + sub + tl.arange(0, SUB_M)
        acc, m_i, l_i, _, q_ok, q_row, pos = _attend_rows(
            rows, first + sub, lo, hi, b, h, hk, Q, K, V, MAP, COS, SIN, scale_log2, N, T, HALF_D,
            s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
            s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, D,
            CAUSAL, DECODE, True, IEEE, UPCAST, FIX_RNE, HALF_TABLE, SUB_M, SUB_M, BLOCK_H, BLOCK_D,
        )
        _store_rows(acc, m_i, l_i, q_ok, q_row, pos, rows, OUT, LSE, COUNT, b, h, bh, n_bh, split, N_UN, T, D,
                    s_os, s_ob, s_oh, s_on, s_od, DECODE, ATOMIC, BLOCK_D)


@triton.jit
def _vtu_fwd_kernel(
    Q, K, V, MAP, COS, SIN, COUNT, OUT, LSE,
    scale_log2, N, N_UN, T, H, H_KV, HALF_D, D, kv_per_split, s_os,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_mb, s_mn,
    s_cb, s_cn, s_cd,
    s_sb, s_sn, s_sd,
    s_ob, s_oh, s_on, s_od,
    CAUSAL: tl.constexpr, DECODE: tl.constexpr, ATOMIC: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    FIX_RNE: tl.constexpr, HALF_TABLE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    SUB_M: tl.constexpr,
):
    # Grid (fwd_grid): dim 0 = (b, h, query tile), tile fastest; dim 2 = key split.
    pid = tl.program_id(0).to(tl.int64)
    n_m = tl.cdiv(T, BLOCK_M)
    pid_m = pid % n_m
    bh = pid // n_m
    n_bh = tl.num_programs(0) // n_m
    b = bh // H
    h = bh % H
    hk = h // (H // H_KV)
    # Split-K (decode): program_id(2) takes one slice of the keys.
    split = tl.program_id(2)
    lo = split * kv_per_split
    hi = tl.minimum(N, lo + kv_per_split)
    first = pid_m.to(tl.int32) * BLOCK_M
    if DECODE:
        first += N - T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc, m_i, l_i, redo, q_ok, q_row, pos = _attend_rows(
        rows, first, lo, hi, b, h, hk, Q, K, V, MAP, COS, SIN, scale_log2, N, T, HALF_D,
        s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
        s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, D,
        CAUSAL, DECODE, False, IEEE, UPCAST, FIX_RNE, HALF_TABLE, BLOCK_M, BLOCK_N, BLOCK_H, BLOCK_D,
    )
    # NaN/inf in V near the diagonal (redo > 0): the MMA's 0 * NaN of masked
    # pairs may have reached rows that do not attend those keys, so the tile
    # is recomputed exactly in SUB_M x SUB_M tiles (the exact P@V path needs
    # registers that the full tile leaves no room for; a rare path). Atomic
    # re-merge adds its rows once, so it stores either result; the other modes
    # store the fast result, then overwrite it (after the first stores land: a
    # barrier), which keeps the accumulator's registers free for the rerun.
    if ATOMIC:
        if redo == 0:
            _store_rows(acc, m_i, l_i, q_ok, q_row, pos, rows, OUT, LSE, COUNT, b, h, bh, n_bh, split, N_UN, T, D,
                        s_os, s_ob, s_oh, s_on, s_od, DECODE, ATOMIC, BLOCK_D)
        else:
            _exact_rerun(Q, K, V, MAP, COS, SIN, COUNT, OUT, LSE, scale_log2, N, N_UN, T, HALF_D, D,
                         pid_m, first, lo, hi, b, h, hk, bh, n_bh, split, s_os,
                         s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                         s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, s_ob, s_oh, s_on, s_od,
                         CAUSAL, DECODE, ATOMIC, IEEE, UPCAST, FIX_RNE, HALF_TABLE, BLOCK_M, BLOCK_H, BLOCK_D, SUB_M)
    else:
        _store_rows(acc, m_i, l_i, q_ok, q_row, pos, rows, OUT, LSE, COUNT, b, h, bh, n_bh, split, N_UN, T, D,
                    s_os, s_ob, s_oh, s_on, s_od, DECODE, ATOMIC, BLOCK_D)
        if redo > 0:
            tl.debug_barrier()
            _exact_rerun(Q, K, V, MAP, COS, SIN, COUNT, OUT, LSE, scale_log2, N, N_UN, T, HALF_D, D,
                         pid_m, first, lo, hi, b, h, hk, bh, n_bh, split, s_os,
                         s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                         s_mb, s_mn, s_cb, s_cn, s_cd, s_sb, s_sn, s_sd, s_ob, s_oh, s_on, s_od,
                         CAUSAL, DECODE, ATOMIC, IEEE, UPCAST, FIX_RNE, HALF_TABLE, BLOCK_M, BLOCK_H, BLOCK_D, SUB_M)


@triton.jit
def _decode_combine_kernel(
    PART, LSE, OUT, S, BHT, D, FIX_RNE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge split-K partials: out = sum_s 2^(lse_s) o_s / sum_s 2^(lse_s)."""
    row = tl.program_id(0).to(tl.int64)  # (b, h, t) flattened
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = sp < S
    lse = tl.load(LSE + sp * BHT + row, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    empty = lse == float("-inf")  # a slice the row attends no key of; NaN (poisoned) stays in
    w = tl.where(empty, 0.0, tl.exp2(lse - tl.where(mx == float("-inf"), 0.0, mx)))
    part = tl.load(PART + (sp[:, None] * BHT + row) * D + d[None, :], mask=s_ok[:, None] & (d < D)[None, :], other=0.0)
    # An empty slice's partial output is dropped, not weighted by 0: it may hold
    # 0 * NaN from a masked value. A row with no key at all gives 0.
    o = tl.sum(tl.where(empty[:, None], 0.0, part * w[:, None]), axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    tl.store(OUT + row * D + d, cast(o, OUT.dtype.element_ty, FIX_RNE), mask=d < D)


@triton.jit
def _segment_mean_kernel(
    SRC, ORDER, BEGIN, OUT, N, N_UN, H, D,
    s_sb, s_sh, s_sn, s_sd,
    s_ob, s_oh, s_on, s_od,
    BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr, FIX_RNE: tl.constexpr,
):
    """out[b, h, u] = mean of SRC[b, h, p] over u's positions, summed in position order."""
    # Grid (segment_mean_grid): dim 0 = (b, h, unique block), block fastest.
    pid = tl.program_id(0).to(tl.int64)
    n_u = tl.cdiv(N_UN, BLOCK_U)
    pid_u = pid % n_u
    bh = pid // n_u
    b = bh // H
    h = bh % H
    u = pid_u * BLOCK_U + tl.arange(0, BLOCK_U)
    u_ok = u < N_UN
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < D)[None, :]
    p0 = tl.load(BEGIN + b * (N_UN + 1) + u, mask=u_ok, other=0)
    p1 = tl.load(BEGIN + b * (N_UN + 1) + u + 1, mask=u_ok, other=0)
    acc = tl.zeros([BLOCK_U, BLOCK_D], dtype=tl.float32)
    src_base = SRC + b * s_sb + h * s_sh
    for t in range(0, tl.max(p1 - p0, axis=0)):
        has = p0 + t < p1
        p = tl.load(ORDER + b * N + p0 + t, mask=has, other=0)
        # Row pointers formed in 1-D first: broadcasting `p` inside the 2-D
        # address makes Triton 3.6's layout pass fail on sm_80/sm_90.
        rows = src_base + p * s_sn
        acc += tl.load(rows[:, None] + d[None, :] * s_sd, mask=has[:, None] & d_ok, other=0.0)
    cnt = tl.maximum(p1 - p0, 1).to(tl.float32)
    out = acc / cnt[:, None]
    tl.store(OUT + b * s_ob + h * s_oh + u[:, None] * s_on + d[None, :] * s_od, cast(out, OUT.dtype.element_ty, FIX_RNE), mask=u_ok[:, None] & d_ok)


def fwd_config(D: int, dtype: torch.dtype, decode: bool, arch: int = 90):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward kernel.

    Chosen from the compile reports of ``benchmarks/triton_aot.py`` (sm_80,
    sm_90): the largest tiles that use the tensor cores without spilling
    registers. Hopper's warpgroup MMA (HGMMA) keeps 128-row tiles in
    registers; Ampere's MMA, with the K tile rotated in registers, fits 64
    rows. IEEE fp32 dots run on the CUDA cores: small tiles, no pipelining.
    Head dims padded to a 128-wide tile (80, 96) take the narrower key tile
    (and, fp32 on Hopper, 16 query rows; decode at D = 80 one stage): the
    64-wide ones spilled 8 bytes of stack in their deterministic / decode
    epilogues.
    """
    if dtype == torch.float32:
        return (16, 32, 8, 1) if decode or (D == 96 and arch >= 90) else (32, 32, 8, 1)
    if decode:
        return (16, 32, 4, 1) if D == 80 else (16, 64, 4, 3)
    if arch >= 90:
        return (128, 32, 8, 3) if D in (80, 96) else (128, 64, 8, 3)
    return (64, 32, 8, 3) if D <= 64 or D == 96 else (64, 64, 8, 3)


def fwd_grid(B: int, H: int, T: int, block_m: int, splits: int = 1):
    """Grid of ``_vtu_fwd_kernel``: the ``B * H * cdiv(T, block_m)`` query tiles
    in dim 0 (tile fastest, so one head's causal tiles launch together; dim 0
    takes 2^31 - 1, where ``B * H`` alone in dim 1 would stop at 65535: B = 2049
    at H = 32), key slices (split-K decode) in dim 2."""
    return launch_grid("_vtu_fwd_kernel", triton.cdiv(T, block_m) * B * H, 1, splits)


def segment_mean_grid(B: int, H: int, n_un: int, block_u: int):
    """Grid of ``_segment_mean_kernel``: ``B * H * cdiv(N_un, block_u)`` programs in dim 0."""
    return launch_grid("_segment_mean_kernel", triton.cdiv(n_un, block_u) * B * H)


def combine_grid(B: int, H: int, T: int):
    """Grid of ``_decode_combine_kernel``: one program per (b, h, t), in dim 0."""
    return launch_grid("_decode_combine_kernel", B * H * T)


def _launch(q, k, v, merge_map, cos, sin, scale, causal, out, count, *, decode, atomic, lse=None, splits=1, kv_per_split=None):
    B, H = q.shape[0], q.shape[1]
    D = q.shape[-1]
    N = merge_map.shape[1]
    T = q.shape[2] if decode else N
    n_un = k.shape[2]
    BLOCK_M, BLOCK_N, num_warps, num_stages = fwd_config(D, q.dtype, decode, target_arch(q.device))
    grid = fwd_grid(B, H, T, BLOCK_M, splits)
    if out.dim() == 5:  # decode partials [S, B, H, T, D]
        s_os, o_strides = out.stride(0), out.stride()[1:]
    else:
        s_os, o_strides = 0, out.stride()
    _vtu_fwd_kernel[grid](
        q, k, v, merge_map, cos, sin, count, out, lse if lse is not None else out,
        scale * LOG2E, N, n_un, T, H, k.shape[1], D // 2, D, kv_per_split or N, s_os,
        *q.stride(), *k.stride(), *v.stride(), *merge_map.stride(),
        *cos.stride(), *sin.stride(), *o_strides,
        CAUSAL=bool(causal), DECODE=decode, ATOMIC=atomic, IEEE=q.dtype == torch.float32,
        UPCAST=fix_rne(q.dtype), FIX_RNE=fix_rne(q.dtype), HALF_TABLE=cos.shape[-1] != D,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_H=pow2(D // 2), BLOCK_D=pow2(D), SUB_M=min(16, BLOCK_M),
        num_warps=num_warps, num_stages=num_stages,
    )


def decode_splits(B: int, H: int, T: int, N: int, device: torch.device, block_m: int = 16, block_n: int = 64):
    """Key slices per (b, h) for split-K decode: about two waves of programs on
    the GPU; 3 slices under the interpreter, so tests exercise the combine.
    Each slice is a whole number of ``block_n`` key blocks."""
    blocks = triton.cdiv(N, block_n)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, B * H * triton.cdiv(T, block_m))
    else:
        want = 3
    splits = max(1, min(blocks, want))
    kv_per_split = triton.cdiv(blocks, splits) * block_n
    return triton.cdiv(N, kv_per_split), kv_per_split


def vtu_attention_fwd(q, k, v, merge_map, cos, sin, scale: float, causal: bool, deterministic: bool) -> torch.Tensor:
    """Launch the fused forward; inputs validated, cos/sin already ``[B, N, D]``
    (or half tables ``[B, N, D/2]``)."""
    B, H, n_un, D = q.shape
    N = merge_map.shape[1]
    valid = merge_map >= 0
    idx = merge_map.long().clamp_min(0)
    if not deterministic:
        counts = torch.zeros((B, n_un), device=q.device, dtype=torch.float32)
        counts.scatter_add_(1, idx, valid.to(torch.float32))
        out32 = torch.zeros((B, H, n_un, D), device=q.device, dtype=torch.float32)
        _launch(q, k, v, merge_map, cos, sin, scale, causal, out32, counts, decode=False, atomic=True)
        return out32.to(q.dtype)
    per_pos = torch.empty((B, H, N, D), device=q.device, dtype=torch.float32)
    _launch(q, k, v, merge_map, cos, sin, scale, causal, per_pos, per_pos, decode=False, atomic=False)
    # Positions grouped by unique token, in position order (stable sort).
    key = torch.where(valid, idx, n_un)
    order = torch.sort(key, dim=1, stable=True).indices.contiguous()
    counts = torch.zeros((B, n_un + 1), device=q.device, dtype=torch.int64).scatter_add_(1, key, torch.ones_like(key))
    begin = torch.zeros((B, n_un + 1), device=q.device, dtype=torch.int64)
    torch.cumsum(counts[:, :n_un], dim=1, out=begin[:, 1:])
    out = torch.empty((B, H, n_un, D), device=q.device, dtype=q.dtype)
    BLOCK_U = 32
    _segment_mean_kernel[segment_mean_grid(B, H, n_un, BLOCK_U)](
        per_pos, order, begin, out, N, n_un, H, D, *per_pos.stride(), *out.stride(),
        BLOCK_U=BLOCK_U, BLOCK_D=pow2(D), FIX_RNE=fix_rne(out.dtype),
    )
    return out


def vtu_decode_fwd(q, k, v, merge_map, cos, sin, scale: float) -> torch.Tensor:
    """Decode step: q ``[B, H, T, D]`` at the last T positions; returns ``[B, H, T, D]``.

    Split-K (flash-decoding): each (b, h) is spread over several key slices
    whose partial outputs and log-sum-exps are combined in a second kernel, so
    a single new token still fills the GPU.
    """
    B, H, T, D = q.shape
    N = merge_map.shape[1]
    block_m, block_n = fwd_config(D, q.dtype, True, target_arch(q.device))[:2]
    splits, kv_per_split = decode_splits(B, H, T, N, q.device, block_m, block_n)
    part = torch.empty((splits, B, H, T, D), device=q.device, dtype=torch.float32)
    lse = torch.empty((splits, B * H, T), device=q.device, dtype=torch.float32)
    _launch(q, k, v, merge_map, cos, sin, scale, True, part, part, decode=True, atomic=False,
            lse=lse, splits=splits, kv_per_split=kv_per_split)
    # The combine kernel writes rows in [B, H, T, D] order: a contiguous output,
    # whatever q's strides (HF hands q transposed).
    out = q.new_empty(q.shape)
    _decode_combine_kernel[combine_grid(B, H, T)](
        part, lse, out, splits, B * H * T, D, FIX_RNE=fix_rne(q.dtype), BLOCK_S=pow2(splits, 2), BLOCK_D=pow2(D),
    )
    return out
