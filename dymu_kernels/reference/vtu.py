"""VTU attention references (docs/design.md §1.3): two independent implementations.

The language model keeps the virtual full sequence of N positions but
computes on N_un unique tokens. ``merge_map [B, N]`` gives the unique token at
every full position (``-1`` = padding)::

    full positions p :  0    1    2    3    4    5    6
    merge_map[b, p]  :  0    1    2    2    1    3    4      N = 7, N_un = 5
                        txt  img  img  img  img  txt  txt

For query position p and key position s (RoPE rotation ``R`` at the *full*
position, causal on the sequence index, padding keys masked)::

    o_p      = sum_s softmax_s((R_p q_m(p)) . (R_s k_m(s)) * scale + causal(p, s)) v_m(s)
    o_un[u]  = mean over {p : m(p) = u} of o_p

:func:`vtu_attention_expand` computes this literally (gather, rotate, attend,
average). :func:`vtu_attention_decomposed` builds the same scores from
products of unique tokens only and per-position cos/sin — the paper's form

    A = C M QKᵀ Mᵀ C + S M QKᵀ Mᵀ S + S M (Q×K) Mᵀ C - C M (Q×K) Mᵀ S

summed over frequency pairs f, with ``QKᵀ_f = q1 k1 + q2 k2`` and
``(Q×K)_f = q1 k2 - q2 k1`` for the halves ``(x1, x2)`` that HF's
``rotate_half`` pairs. They share no code beyond input checks.

:func:`vtu_attention_expand` and :func:`vtu_decode_attention_ref` are also the
spec for NaN/inf (:func:`_attend`: positions a query does not attend never
influence it) and for partial rotary (``rotary_dim``: only the first R head
dims rotate).
"""

from __future__ import annotations

from typing import Optional

import torch

from .._validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_index_range,
    check_same_device,
    check_shape,
    check_tensor,
)
from .segment import accumulation_dtype, segment_mean, unmerge


def rope_cos_sin(positions: torch.Tensor, dim: int, base: float = 10000.0, dtype=torch.float32):
    """HF-format RoPE tables: ``cos, sin`` of shape ``[*positions.shape, dim]``.

    Frequency ``f`` (of ``dim/2``) is ``base ** (-2f/dim)``; like HF's
    ``LlamaRotaryEmbedding`` the table repeats it for both halves.
    """
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF convention: ``x * cos + rotate_half(x) * sin`` (cos/sin broadcast).

    Tables narrower than ``x`` (width ``R < D``, HF's partial rotary) rotate the
    first ``R`` dims, pairing ``j`` with ``j + R/2``; the other dims pass through
    unchanged, as in transformers' partial-rotary models.
    """
    R = cos.shape[-1]
    if R == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, passed = x[..., :R], x[..., R:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, passed], dim=-1)


def check_rotary_dim(rotary_dim, D: int, cos: torch.Tensor, sin: torch.Tensor) -> int:
    """The number of leading head dims RoPE rotates, from the tables' width ``W``.

    FlashAttention's contract: without ``rotary_dim`` the tables must be
    HF-format ``W = D`` (the whole head rotates); with ``rotary_dim = R`` (even,
    ``2 <= R <= D``) only the first R dims rotate (``j`` paired with ``j + R/2``,
    the rest pass through) and the tables are HF format ``W = R`` or hold one
    entry per frequency, ``W = R/2`` (a "half table"). A table narrower than D
    without ``rotary_dim`` is ambiguous (a half table of a full rotary, or an HF
    table of a partial one) and raises ValueError. Returns R.
    """
    W = cos.shape[-1]
    if W != sin.shape[-1]:
        raise ValueError(f"cos and sin must have the same width, got {cos.shape[-1]} and {sin.shape[-1]}")
    if rotary_dim is None:
        if W == D:
            return D
        if W < D:
            options = [f"rotary_dim={2 * W} if it holds one entry per frequency (half table)"] if 2 * W <= D else []
            if W % 2 == 0:
                options.append(f"rotary_dim={W} if it is an HF-format table of a partial rotary (only the first {W} "
                               "head dims rotate)")
            if not options:
                raise ValueError(f"cos/sin have width {W}, which fits no rotary_dim of head dim D={D}")
            raise ValueError(f"cos/sin have width {W}, narrower than the head dim D={D}: ambiguous without rotary_dim; "
                             f"pass {' or '.join(options)}")
        raise ValueError(f"cos/sin must have last dim D={D} (HF format), got width {W}")
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim % 2 or not 2 <= rotary_dim <= D:
        raise ValueError(f"rotary_dim must be an even int with 2 <= rotary_dim <= D={D}, got {rotary_dim!r}")
    if W not in (rotary_dim, rotary_dim // 2):
        raise ValueError(f"cos/sin must have last dim rotary_dim={rotary_dim} (HF format) or rotary_dim/2={rotary_dim // 2} "
                         f"(one entry per frequency), got width {W}")
    return rotary_dim


def check_vtu_inputs(q, k, v, merge_map, cos, sin, scale, full_tables: bool = True, rotary_dim=None):
    """Validate VTU attention inputs; return ``(cos, sin, scale, rotary_dim)``.

    cos/sin are ``[N, W]`` or ``[1|B, N, W]`` tables whose width ``W`` follows
    :func:`check_rotary_dim` (HF format, or one entry per frequency with an
    explicit ``rotary_dim``). They come back expanded to batch ``B``: in HF
    format ``[B, N, R]`` with ``full_tables`` (half tables repeated), else in
    their own width. Raises TypeError/ValueError naming the argument (see
    ``vtu_attention``).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, n_un, D = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,))
    h_kv = k.shape[1]
    check_shape("k", k, [B, h_kv, n_un, D], "[B, H_kv, N_un, D] matching q")
    if h_kv == 0 or H % h_kv != 0:
        raise ValueError(f"k has {h_kv} heads, which must divide the {H} heads of q (GQA)")
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,))
    check_shape("v", v, [B, h_kv, n_un, D], "same as k")
    if D % 2:
        raise ValueError(f"head dim D must be even for RoPE, got {D}")
    check_tensor("merge_map", merge_map, ndim=2, dtypes=INDEX_DTYPES)
    if merge_map.shape[0] != B:
        raise ValueError(f"merge_map must have batch size {B} like q, got shape {tuple(merge_map.shape)}")
    N = merge_map.shape[1]
    tables = []
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(name, t, ndim=(2, 3), dtypes=FLOAT_DTYPES)
        width = t.shape[-1]
        if t.dim() == 2:
            check_shape(name, t, [N, width], "one row per full position of merge_map")
            t = t[None].expand(B, N, width)
        else:
            check_shape(name, t, [None, N, width], "one row per full position of merge_map")
            if t.shape[0] not in (1, B):
                raise ValueError(f"{name} batch size must be 1 or {B}, got {t.shape[0]}")
            t = t.expand(B, N, width)
        tables.append(t)
    rotary_dim = check_rotary_dim(rotary_dim, D, cos, sin)
    if full_tables and cos.shape[-1] != rotary_dim:
        tables = [torch.cat([t, t], dim=-1) for t in tables]
    check_same_device(q=q, k=k, v=v, merge_map=merge_map, cos=cos, sin=sin)
    check_index_range("merge_map", merge_map, -1, n_un, "unique token per position, -1 = padding")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive float, got {scale!r}")
    return tables[0], tables[1], float(scale), rotary_dim


def _attended(merge_map: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[B, 1, N, N]`` True where query position p attends key position s:
    both are tokens (not padding) and, when causal, ``s <= p``."""
    N = merge_map.shape[1]
    valid = merge_map >= 0
    allowed = valid[:, None, None, :] & valid[:, None, :, None]
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool, device=merge_map.device).tril()
    return allowed


def _attend(scores: torch.Tensor, allowed: torch.Tensor, vf: torch.Tensor) -> torch.Tensor:
    """``softmax(scores) @ vf`` over the attended pairs ``allowed [B, 1, Q, N]``
    (scores ``[B, H, Q, N]``, values ``[B, H, N, D]``), with the non-finite
    semantics every backend follows (``dymu_kernels.vtu_attention``):

    - a pair that is not attended never influences the query, whatever its
      values (NaN/inf at future or padding positions included);
    - a non-finite score of an attended pair (NaN or ±inf, from q, k, cos or
      sin) makes the query's whole output NaN;
    - values combine in IEEE arithmetic over the attended keys only: NaN in an
      attended value makes that output component NaN; ±inf gives ±inf (NaN
      where opposite infinities meet or a weight is 0);
    - a query that attends no key outputs 0.
    """
    # softmax would read an attended -inf as "masked": every non-finite score poisons.
    scores = scores.masked_fill(~torch.isfinite(scores), float("nan")).masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1, keepdim=True), 0)
    finite = torch.isfinite(vf)
    out = probs @ vf.masked_fill(~finite, 0)
    if not bool(finite.all()):
        # A masked pair's weight is 0, but 0 * NaN and 0 * inf are NaN: the product
        # above took finite values only; each non-finite one is added here to the
        # queries that attend its key, and to no other.
        b, h, s, d = (~finite).nonzero(as_tuple=True)
        contrib = torch.where(allowed[:, 0][b, :, s], probs[b, h, :, s] * vf[b, h, s, d][:, None], 0)
        out.transpose(-1, -2).index_put_((b, h, d), contrib, accumulate=True)
    return out


def vtu_attention_expand(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    merge_map: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    upcast: bool = True,
    rotary_dim: Optional[int] = None,
) -> torch.Tensor:
    """Reference (a): gather -> RoPE at full positions -> attention -> segment mean.

    Args:
        q: ``[B, H, N_un, D]`` before RoPE; k, v: ``[B, H_kv, N_un, D]``.
        merge_map: ``[B, N]`` in ``[-1, N_un)``.
        cos, sin: ``[N, W]`` or ``[B, N, W]`` tables at full positions: HF format
            ``W = D``, or with ``rotary_dim = R`` HF format ``W = R`` / one entry
            per frequency ``W = R/2`` (see :func:`check_rotary_dim`).
        upcast: compute in fp32 (fp64 for fp64 input); ``False`` computes in the
            input dtype (the low-precision baseline of FlashAttention's test rule).
        rotary_dim: rotate only the first R head dims (partial rotary); the
            others pass through.

    Returns:
        ``[B, H, N_un, D]`` in q's dtype; unique tokens no position maps to are
        0. NaN/inf follow :func:`_attend`; a NaN output at any position of a
        unique token makes its mean NaN.
    """
    cos, sin, scale, _ = check_vtu_inputs(q, k, v, merge_map, cos, sin, scale, rotary_dim=rotary_dim)
    H, n_un = q.shape[1], q.shape[2]
    n_rep = H // k.shape[1]
    dt = accumulation_dtype(q.dtype) if upcast else q.dtype
    cos, sin = cos.to(dt)[:, None], sin.to(dt)[:, None]
    qf = apply_rope(unmerge(q, merge_map).to(dt), cos, sin)
    kf = apply_rope(unmerge(k, merge_map).to(dt), cos, sin).repeat_interleave(n_rep, dim=1)
    vf = unmerge(v, merge_map).to(dt).repeat_interleave(n_rep, dim=1)
    out = _attend((qf @ kf.transpose(-1, -2)) * scale, _attended(merge_map, causal), vf)
    return segment_mean(out, merge_map, n_un).to(q.dtype)


def vtu_attention_decomposed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    merge_map: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    rotary_dim: Optional[int] = None,
) -> torch.Tensor:
    """Reference (b): the paper's decomposed form, from unique-token products.

    Same contract as :func:`vtu_attention_expand` for finite inputs (always
    computed in fp32, or fp64 for fp64 input), with one more requirement:
    cos/sin must repeat their first half in the second (HF format), since the
    decomposition pairs dimension ``f`` with ``f + R/2`` under one frequency
    (``R = rotary_dim``, default D; the dims after R add an unrotated product
    of unique tokens). Materialises
    ``[B, H, N, N, D/2]`` products: a reference for small shapes. Its only
    matrix products are the two unique-token products (``N_un^2 * D``
    multiply-adds each per head) and the attention-weighted values at the full
    positions (``N^2 * D``); expansion goes by indexing and the cos/sin combine
    is elementwise — what fvcore counts for the paper's Table 1 (docs/design.md §1.3).
    """
    cos, sin, scale, R = check_vtu_inputs(q, k, v, merge_map, cos, sin, scale, rotary_dim=rotary_dim)
    B, H, n_un, D = q.shape
    half = R // 2
    for name, t in (("cos", cos), ("sin", sin)):
        if not torch.equal(t[..., :half], t[..., half:]):
            raise ValueError(f"{name} must repeat its first half in its second half (HF RoPE format)")
    dt = accumulation_dtype(q.dtype)
    n_rep = H // k.shape[1]
    q1, q2, q_pass = q.to(dt).split([half, half, D - R], dim=-1)
    k1, k2, k_pass = k.to(dt).repeat_interleave(n_rep, dim=1).split([half, half, D - R], dim=-1)
    vv = v.to(dt).repeat_interleave(n_rep, dim=1)
    c, s = cos[..., :half].to(dt), sin[..., :half].to(dt)

    # Products of unique tokens, one per frequency pair f, each summing over the
    # two halves x: dot = q1 k1 + q2 k2, cross = q1 k2 - q2 k1: [B, H, N_un, N_un, D/2]
    # (N_un^2 * D multiply-adds per head each: what fvcore counts).
    # Batched over f: [.., f, N_un, 2] @ [.., f, 2, N_un].
    qx = torch.stack([q1, q2], dim=-1).transpose(2, 3)  # [B, H, D/2, N_un, 2]

    def pair_products(a, b):
        kx = torch.stack([a, b], dim=-1).permute(0, 1, 3, 4, 2)  # [B, H, D/2, 2, N_un]
        return (qx @ kx).permute(0, 1, 3, 4, 2)  # [B, H, N_un, N_un, D/2]

    dot, cross = pair_products(k1, k2), pair_products(k2, -k1)
    # To the full positions by indexing through the map (no arithmetic): [B, H, N, N, D/2].
    valid = merge_map >= 0
    idx = merge_map.long().clamp_min(0)
    b = torch.arange(B, device=q.device)[:, None, None]

    def at_positions(t):
        return t.permute(0, 2, 3, 1, 4)[b, idx[:, :, None], idx[:, None, :]].permute(0, 3, 1, 2, 4)

    dot_p, cross_p = at_positions(dot), at_positions(cross)
    # Elementwise combine with the query's (p) and key's (s) cos/sin, summed over f:
    # c_p c_s dot + s_p s_s dot + s_p c_s cross - c_p s_s cross.
    cp, sp = c[:, None, :, None, :], s[:, None, :, None, :]
    cs, ss = c[:, None, None, :, :], s[:, None, None, :, :]
    scores = ((cp * cs + sp * ss) * dot_p + (sp * cs - cp * ss) * cross_p).sum(-1)
    if R < D:  # partial rotary: the dims after R add an unrotated product of unique tokens
        plain = (q_pass @ k_pass.transpose(-1, -2)).permute(0, 2, 3, 1)  # [B, N_un, N_un, H]
        scores = scores + plain[b, idx[:, :, None], idx[:, None, :]].permute(0, 3, 1, 2)
    scores = scores * scale

    N = merge_map.shape[1]
    allowed = valid[:, None, None, :].expand(B, 1, N, N)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    probs = torch.nan_to_num(probs) * valid[:, None, :, None].to(dt)
    # Values at the full positions (indexed), one N x N x D product per head.
    v_full = vv.permute(0, 2, 1, 3)[b[:, :, 0], idx].permute(0, 2, 1, 3)  # [B, H, N, D]
    out = probs @ v_full
    # Re-merge: mean over each unique token's positions (padding rows add nothing).
    sums = out.new_zeros(B, H, n_un, D).scatter_add_(2, idx[:, None, :, None].expand(B, H, N, D), out)
    counts = out.new_zeros(B, n_un).scatter_add_(1, idx, valid.to(dt))
    return (sums / counts.clamp_min(1)[:, None, :, None]).to(q.dtype)


def vtu_decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    merge_map: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    scale: Optional[float] = None,
    upcast: bool = True,
    rotary_dim: Optional[int] = None,
) -> torch.Tensor:
    """Reference decode step: T new query tokens over the whole virtual sequence.

    The new tokens stand at the last T positions of ``merge_map [B, N]``; a new
    token is usually a singleton whose key/value row is already in k/v, and may
    be padding (``-1``) in batched continuation. Keys/values are stored once
    per unique token (``k, v [B, H_kv, N_un, D]``, pre-RoPE) and rotated at
    every full position they stand at.

    Args:
        q: ``[B, H, T, D]`` pre-RoPE queries of the new tokens.
        cos, sin: ``[N, W]`` or ``[B, N, W]`` for all N positions (widths as in
            :func:`vtu_attention_expand`).
        rotary_dim: rotate only the first R head dims (partial rotary).

    Returns:
        ``[B, H, T, D]``: query t attends every non-padding position
        ``s <= N-T+t`` (a padding query too; its own position has no key); a
        query with no such position outputs 0. NaN/inf follow :func:`_attend`.
    """
    B, H, T, D = q.shape
    N = merge_map.shape[1]
    if T > N:
        raise ValueError(f"q has {T} new tokens but merge_map has only {N} positions")
    # Reuse the full-sequence checks with q widened to the unique count.
    cos, sin, scale, _ = check_vtu_inputs(q.new_empty(B, H, k.shape[2], D), k, v, merge_map, cos, sin, scale,
                                          rotary_dim=rotary_dim)
    n_rep = H // k.shape[1]
    dt = accumulation_dtype(q.dtype) if upcast else q.dtype
    cos, sin = cos.to(dt)[:, None], sin.to(dt)[:, None]
    qr = apply_rope(q.to(dt), cos[:, :, N - T :], sin[:, :, N - T :])
    kf = apply_rope(unmerge(k, merge_map).to(dt), cos, sin).repeat_interleave(n_rep, dim=1)
    vf = unmerge(v, merge_map).to(dt).repeat_interleave(n_rep, dim=1)
    positions = torch.arange(N, device=q.device)
    allowed = (positions[None, :] <= (N - T + torch.arange(T, device=q.device))[:, None])[None, None]
    allowed = allowed & (merge_map >= 0)[:, None, None, :]
    return _attend((qr @ kf.transpose(-1, -2)) * scale, allowed, vf).to(q.dtype)
