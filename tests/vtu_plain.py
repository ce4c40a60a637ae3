"""VTU attention restated plainly from its definition, in float64, sharing no
code with the package (no reference helper, no apply_rope): the independent
side of the partial-rotary, decode-padding and gradient tests.

RoPE rotates the first R head dims, pairing dim j with j + R/2 under
HF-format tables of width R (``x1' = x1 c1 - x2 s1``, ``x2' = x2 c2 + x1 s2``);
the dims after R pass through. Softmax runs over the attended keys only; a
query with none outputs 0.
"""

import torch


def rotate(x, cos, sin, R):
    """x ``[..., D]`` rotated on its first R dims by HF-format tables ``[..., R]``."""
    h = R // 2
    x1, x2, rest = x[..., :h], x[..., h:R], x[..., R:]
    return torch.cat([x1 * cos[..., :h] - x2 * sin[..., :h], x2 * cos[..., h:] + x1 * sin[..., h:], rest], dim=-1)


def _gather(x, merge_map):
    """``[B, h, U, D]`` -> ``[B, h, N, D]`` rows at the full positions (padding reads row 0; it is masked)."""
    B = x.shape[0]
    rows = merge_map.long().clamp_min(0)
    return x[torch.arange(B)[:, None], :, rows].transpose(1, 2)


def _attend(scores, allowed, values):
    """Softmax over ``allowed`` keys, written out: exp(s - max) / sum; no key -> 0."""
    s = torch.where(allowed, scores, torch.zeros_like(scores))
    mx = torch.where(allowed, s, torch.full_like(s, -1e300)).amax(-1, keepdim=True)
    w = torch.where(allowed, torch.exp(s - mx), torch.zeros_like(s))
    return (w @ values) / w.sum(-1, keepdim=True).clamp_min(1e-300)


def _tables(cos, sin, B, N):
    return cos.double().expand(B, N, cos.shape[-1])[:, None], sin.double().expand(B, N, sin.shape[-1])[:, None]


def plain_vtu_attention(q, k, v, merge_map, cos, sin, R, causal=True, scale=None):
    """Expand -> rotate the first R dims at each full position -> softmax
    attention (causal, padding masked) -> mean of each unique token's positions."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, U, D = q.shape
    N = merge_map.shape[1]
    rep = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    c, s = _tables(cos, sin, B, N)
    qf = rotate(_gather(q, merge_map), c, s, R)
    kf = rotate(_gather(k, merge_map), c, s, R).repeat_interleave(rep, 1)
    vf = _gather(v, merge_map).repeat_interleave(rep, 1)
    valid = merge_map >= 0
    allowed = valid[:, None, :, None] & valid[:, None, None, :]
    if causal:
        allowed = allowed & (torch.arange(N)[None, :] <= torch.arange(N)[:, None])
    o = _attend((qf @ kf.transpose(-1, -2)) * scale, allowed, vf)
    members = (merge_map[:, :, None] == torch.arange(U)[None, None, :]).double()  # [B, N, U]; -1 is no one's
    return torch.einsum("bhnd,bnu->bhud", o, members) / members.sum(1).clamp_min(1)[:, None, :, None]


def plain_vtu_decode(q, k, v, merge_map, cos, sin, R, scale=None):
    """T new queries at the last T positions (padding or not) over the cache:
    query t attends every non-padding position <= N - T + t."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, T, D = q.shape
    N = merge_map.shape[1]
    rep = H // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    c, s = _tables(cos, sin, B, N)
    qr = rotate(q, c[:, :, N - T:], s[:, :, N - T:], R)
    kf = rotate(_gather(k, merge_map), c, s, R).repeat_interleave(rep, 1)
    vf = _gather(v, merge_map).repeat_interleave(rep, 1)
    causal = torch.arange(N)[None, :] <= torch.arange(N - T, N)[:, None]
    allowed = (merge_map >= 0)[:, None, None, :] & causal
    return _attend((qr @ kf.transpose(-1, -2)) * scale, allowed, vf)
