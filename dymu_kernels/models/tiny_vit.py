"""A small CLIP-style ViT with DToMe in every block.

It exists to exercise the merge state end to end on real images without
downloading weights: the demo runs it randomly initialised, and calibration
tests drive it. The block follows docs/design.md §1.1: attention (proportional,
``+log size`` per key) and residual, then the merge chosen by a *policy* from
this block's keys, then the MLP on the surviving tokens.

A policy is any object with ``select(layer, node_max) -> merge_mask``; see
:class:`~dymu_kernels.reference.ThresholdPolicy`,
:class:`~dymu_kernels.reference.FixedRPolicy` and
:class:`~dymu_kernels.reference.ThresholdCalibrator`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

from ..reference.attention import proportional_attention
from ..reference.dtome import MergeState, init_merge_state, policy_merge, trim_state


@dataclass
class TinyViTOutput:
    """Final merge state plus the token count of every image after each block."""

    features: torch.Tensor  # [B, N_cap, C]; slots >= lengths are padding
    size: torch.Tensor  # [B, N_cap] patches per token
    lengths: torch.Tensor  # [B]
    pos_map: torch.Tensor  # [B, N0] original token -> final slot
    tokens_per_layer: List[torch.Tensor]  # depth x [B], after each block


class _Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, state: MergeState, layer: int, policy) -> MergeState:
        x = state.x
        B, N, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = proportional_attention(q, k, v, state.size)
        x = x + self.proj(attn.transpose(1, 2).reshape(B, N, C))
        state = state._replace(x=x)
        if policy is not None:
            state = policy_merge(state, k, policy, layer)
        return state._replace(x=state.x + self.mlp(self.ln2(state.x)))


class TinyViT(nn.Module):
    """Pre-LN ViT with a CLS token and learned position embeddings.

    Args:
        image_size, patch_size: input resolution and patch size
            (``(image_size // patch_size) ** 2 + 1`` tokens).
        width, depth, heads, mlp_ratio: transformer shape.
        trim: after each merge, shrink the padded capacity to the longest
            image (a host sync per block; saves compute in eager mode).
    """

    def __init__(self, image_size=224, patch_size=16, width=192, depth=6, heads=3, mlp_ratio=4, trim=True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.image_size, self.patch_size, self.depth, self.trim = image_size, patch_size, depth, trim
        self.patch = nn.Conv2d(3, width, patch_size, stride=patch_size)
        n_patches = (image_size // patch_size) ** 2
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(n_patches + 1, width) * 0.02)
        self.ln_pre = nn.LayerNorm(width)
        self.blocks = nn.ModuleList(_Block(width, heads, mlp_ratio) for _ in range(depth))

    @property
    def num_tokens(self) -> int:
        return self.pos.shape[0]

    def forward(self, images: torch.Tensor, policy=None) -> TinyViTOutput:
        """Encode ``images [B, 3, S, S]``; ``policy`` None means no merging."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"images must be [B, 3, {self.image_size}, {self.image_size}], got {tuple(images.shape)}"
            )
        patches = self.patch(images).flatten(2).transpose(1, 2)
        cls = self.cls.expand(images.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, patches], dim=1) + self.pos)
        state = init_merge_state(x)
        counts = []
        for i, block in enumerate(self.blocks):
            state = block(state, i, policy)
            if self.trim and policy is not None:
                state = trim_state(state)
            counts.append(state.lengths)
        return TinyViTOutput(state.x, state.size, state.lengths, state.pos_map, counts)
