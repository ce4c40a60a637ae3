"""VTU attention from stock PyTorch ops: the ``"torch"`` backend.

For machines without the C++ extension or a GPU. It expands the unique rows to
the full positions (one gather), rotates them at their positions, runs
``scaled_dot_product_attention`` (PyTorch's own fused attention: no N×N eager
softmax in Python) and averages positions back into unique tokens
(:func:`~dymu_kernels.ops.segment_mean`). Unlike the fused kernels it writes
the expanded Q/K/V to memory; the numbers are the same (the reference
:func:`~dymu_kernels.reference.vtu_attention_expand` is the spec).

Inputs are validated by the caller (:func:`dymu_kernels.vtu_attention`);
cos/sin are ``[N, W]`` or ``[1|B, N, W]`` with ``W = D`` or ``D/2`` (the whole
head rotates; the caller maps partial rotary onto that).

Non-finite inputs take the reference's path: SDPA's own handling of NaN/inf
depends on the kernel it picks (a boolean mask lets masked NaN keys through,
``0 * NaN`` lets masked NaN values through, the CPU flash kernel drops NaN
scores), while the op's contract is that positions a query does not attend
never influence it. One ``isfinite`` pass over the expanded tensors decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import vtu as ref
from ..reference.segment import accumulation_dtype, unmerge
from ..reference.vtu import apply_rope
from .segment import segment_mean


def _full_tables(cos: torch.Tensor, sin: torch.Tensor, merge_map: torch.Tensor, d: int, dtype: torch.dtype):
    """``[B, 1, N, D]`` tables in ``dtype`` from ``[N, W]`` or ``[1|B, N, W]``
    (half tables repeated for both halves)."""
    B, N = merge_map.shape
    cos, sin = cos.expand(B, N, cos.shape[-1]), sin.expand(B, N, sin.shape[-1])
    if cos.shape[-1] != d:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in fp32 (fp64 for fp64), result in x's dtype, like HF's rotary code."""
    acc = accumulation_dtype(x.dtype)
    return apply_rope(x.to(acc), cos, sin).to(x.dtype)


def _finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _sdpa(q, k, v, mask, causal: bool, scale: float) -> torch.Tensor:
    """SDPA with grouped KV heads repeated only when needed."""
    n_rep = q.shape[1] // k.shape[1]
    if n_rep > 1:
        k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)


def vtu_attention_sdpa(q, k, v, merge_map, cos, sin, scale: float, causal: bool) -> torch.Tensor:
    """Expand -> RoPE at full positions -> SDPA -> segment mean. ``[B, H, N_un, D]``."""
    N, n_un = merge_map.shape[1], q.shape[2]
    c, s = _full_tables(cos, sin, merge_map, q.shape[-1], accumulation_dtype(q.dtype))
    qf = _rotate(unmerge(q, merge_map), c, s)
    kf = _rotate(unmerge(k, merge_map), c, s)
    vf = unmerge(v, merge_map)
    if not _finite(qf, kf, vf):
        return ref.vtu_attention_expand(q, k, v, merge_map, cos, sin, causal=causal, scale=scale, rotary_dim=q.shape[-1])
    valid = merge_map >= 0
    mask = None
    if not bool(valid.all()):  # padding: mask padding keys; padding queries see all (dropped below)
        allowed = (valid[:, None, :] | ~valid[:, :, None])[:, None]
        if causal:
            allowed = allowed & torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        mask = allowed
    out = _sdpa(qf, kf, vf, mask, causal, scale)
    return segment_mean(out, merge_map, n_un)


def vtu_decode_sdpa(q, k, v, merge_map, cos, sin, scale: float) -> torch.Tensor:
    """Decode: the T newest positions attend the expanded, rotated cache. ``[B, H, T, D]``."""
    B, H, T, D = q.shape
    N = merge_map.shape[1]
    c, s = _full_tables(cos, sin, merge_map, D, accumulation_dtype(q.dtype))
    qr = _rotate(q, c[:, :, N - T :], s[:, :, N - T :])
    kf = _rotate(unmerge(k, merge_map), c, s)
    vf = unmerge(v, merge_map)
    if not _finite(qr, kf, vf):
        return ref.vtu_decode_attention_ref(q, k, v, merge_map, cos, sin, scale=scale, rotary_dim=D).contiguous()
    positions = torch.arange(N, device=q.device)
    allowed = positions[None, :] <= (N - T + torch.arange(T, device=q.device))[:, None]
    allowed = (allowed[None] & (merge_map >= 0)[:, None, :])[:, None]
    out = _sdpa(qr, kf, vf, allowed, False, scale)
    # A new token with no key at all (padding after padding) outputs 0; SDPA may give NaN there.
    return out.masked_fill(~allowed.any(-1, keepdim=True), 0).contiguous()  # every backend returns contiguous rows
