"""The VTU bookkeeping of a KV cache between forwards, framework-neutral.

With VTU a cache holds keys/values once per *unique* token; this state says
how the full (virtual) positions map onto those rows, and keeps the
positions and their RoPE tables so later calls (decoding, new text) attend
over every position. Positions are kept in stored form
(:mod:`dymu_kernels.core.positions`): ``[B, N]`` for 1-D RoPE, ``[B, N, k]``
for ``k`` rotary axes (M-RoPE).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass
class VTUCacheState:
    """VTU bookkeeping of a cache between forwards."""

    merge_map: torch.Tensor  # [B, N] full position -> cache row (-1 padding)
    cos: torch.Tensor  # [B, N, D] RoPE tables of the full positions
    sin: torch.Tensor
    positions: torch.Tensor  # [B, N] or [B, N, k]: full RoPE positions (stored form)
    rows: torch.Tensor  # 0-d int64: cache rows used (compact length)
    compact_mask: Optional[torch.Tensor] = None  # no-VTU ablation: padding mask over the rows

    @property
    def length(self) -> int:
        """Full positions seen (what ``get_seq_length`` reports)."""
        return self.merge_map.shape[1]

    def drop_last(self, k: int) -> "VTUCacheState":
        """The state without its last ``k`` positions (each one row)."""
        if k == 0:
            return self
        mask = None if self.compact_mask is None else self.compact_mask[:, :-k]
        return replace(self, merge_map=self.merge_map[:, :-k], cos=self.cos[:, :-k], sin=self.sin[:, :-k],
                       positions=self.positions[:, :-k], rows=self.rows - k, compact_mask=mask)

    def select(self, index: torch.Tensor) -> "VTUCacheState":
        """The state of samples ``index`` (beam reordering, batch selection)."""
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return replace(self, merge_map=pick(self.merge_map), cos=pick(self.cos), sin=pick(self.sin),
                       positions=pick(self.positions), compact_mask=pick(self.compact_mask))
