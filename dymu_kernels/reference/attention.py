"""Proportional attention for merged ViT blocks (docs/design.md §1.1).

After merging, one token stands for ``s`` original patches. Proportional
attention adds ``log(s_key)`` to every logit of that key, so a merged token
gets the attention mass its patches would have had together. Empty slots have
``s = 0`` and so ``log(0) = -inf``: padding is masked for free.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._validation import FLOAT_DTYPES, check_same_device, check_shape, check_tensor


def proportional_attention_bias(size: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``log(size)`` as an additive key bias of shape ``[B, 1, 1, N]``.

    ``dtype`` defaults to ``size.dtype``; empty slots (``size == 0``) give ``-inf``.
    """
    check_tensor("size", size, ndim=2, dtypes=FLOAT_DTYPES)
    bias = torch.log(size.to(torch.float32))
    return bias.to(dtype or size.dtype)[:, None, None, :]


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor,
    *,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """``softmax(q kᵀ·scale + log(size_key)) v``, bidirectional (ViT).

    Args:
        q, k, v: ``[B, H, N, D]``, one float dtype.
        size: ``[B, N]`` patches per token (0 = empty slot, masked).
        scale: defaults to ``D ** -0.5``.

    Returns:
        ``[B, H, N, D]``. Every image must have at least one non-empty slot.
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    B, H, N, D = q.shape
    for name, t in (("k", k), ("v", v)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,))
        check_shape(name, t, [B, H, N, D], "same as q")
    check_tensor("size", size, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("size", size, [B, N], "one entry per token")
    check_same_device(q=q, k=k, v=v, size=size)
    bias = proportional_attention_bias(size, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
