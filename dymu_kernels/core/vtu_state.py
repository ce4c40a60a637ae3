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
    filled: Optional[torch.Tensor] = None  # 0-d int64: columns written of a preallocated state; None: all

    @property
    def seen(self):
        """Full positions seen: an int, or a 0-d tensor for a preallocated
        state (compiled steps do not guard on it)."""
        return self.merge_map.shape[1] if self.filled is None else self.filled

    @property
    def length(self) -> int:
        """Full positions seen, as an int (what ``get_seq_length`` reports)."""
        return int(self.seen)

    def preallocated(self, capacity: int) -> "VTUCacheState":
        """This state in tensors of ``capacity`` columns (a static cache's
        length), the columns after its own as padding (module doc)."""
        if self.filled is not None or self.compact_mask is not None:
            raise ValueError("preallocated: the state is preallocated already, or belongs to the no-VTU ablation")
        B, N = self.merge_map.shape
        if capacity < N:
            raise ValueError(f"capacity {capacity} is smaller than the state's {N} positions")

        def pad(t: torch.Tensor, value) -> torch.Tensor:
            out = t.new_full((B, capacity, *t.shape[2:]), value)
            out[:, :N] = t
            return out

        return replace(self, merge_map=pad(self.merge_map, -1), cos=pad(self.cos, 0), sin=pad(self.sin, 0),
                       positions=pad(self.positions, 0), filled=torch.tensor(N, device=self.merge_map.device))

    def append(self, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
               mask: Optional[torch.Tensor] = None) -> "VTUCacheState":
        """The state with ``T`` new positions: ``rows [B, T]`` their cache
        rows, ``cos``/``sin [B, T, D]``, ``positions`` in stored form, and
        (no-VTU ablation only) their padding ``mask [B, T]``. A preallocated
        state writes them into its next columns (past its capacity — more
        positions than the static cache holds — indexing fails, as the static
        cache's own write does)."""
        T = rows.shape[1]
        if self.filled is None:
            compact_mask = None if self.compact_mask is None else torch.cat([self.compact_mask, mask], 1)
            return replace(self, merge_map=torch.cat([self.merge_map, rows.to(self.merge_map.dtype)], 1),
                           cos=torch.cat([self.cos, cos], 1), sin=torch.cat([self.sin, sin], 1),
                           positions=torch.cat([self.positions, positions], 1), rows=self.rows + T,
                           compact_mask=compact_mask)
        index = self.filled + torch.arange(T, device=self.merge_map.device)
        put = lambda t, new: t.index_copy(1, index, new.to(t.dtype))  # noqa: E731
        return replace(self, merge_map=put(self.merge_map, rows), cos=put(self.cos, cos), sin=put(self.sin, sin),
                       positions=put(self.positions, positions), rows=self.rows + T, filled=self.filled + T)

    def drop_last(self, k: int) -> "VTUCacheState":
        """The state without its last ``k`` positions (each one row)."""
        if k == 0:
            return self
        if self.filled is not None:  # preallocated: the dropped columns become padding again
            filled = self.filled - k
            gone = torch.arange(self.merge_map.shape[1], device=self.merge_map.device) >= filled
            return replace(self, merge_map=self.merge_map.masked_fill(gone, -1),
                           positions=self.positions.masked_fill(gone.view(1, -1, *[1] * (self.positions.dim() - 2)),
                                                                0),
                           rows=self.rows - k, filled=filled)
        mask = None if self.compact_mask is None else self.compact_mask[:, :-k]
        return replace(self, merge_map=self.merge_map[:, :-k], cos=self.cos[:, :-k], sin=self.sin[:, :-k],
                       positions=self.positions[:, :-k], rows=self.rows - k, compact_mask=mask)

    def select(self, index: torch.Tensor) -> "VTUCacheState":
        """The state of samples ``index`` (beam reordering, batch selection)."""
        pick = lambda t: None if t is None else t.index_select(0, index.to(t.device))  # noqa: E731
        return replace(self, merge_map=pick(self.merge_map), cos=pick(self.cos), sin=pick(self.sin),
                       positions=pick(self.positions), compact_mask=pick(self.compact_mask))
