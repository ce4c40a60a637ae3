"""A transformers KV cache that stores one row per unique token, and still
means what transformers expects.

With VTU the language model's cache holds keys/values once per *unique*
token: ``N_un`` rows for a prompt of ``N`` positions. transformers reads the
cache's length to decide which input ids are new (``generate()`` resuming
from ``past_key_values``, a later turn with new text) and crops it by
positions (assisted and prompt-lookup decoding). So a DyMU cache carries the
VTU bookkeeping (:class:`VTUCacheState`: the full position -> row map, the
positions and their RoPE tables) and its class is swapped, on this instance
only, for a subclass of its own class whose

- ``get_seq_length()`` is the number of *full* positions seen;
- ``crop`` / ``reset`` / ``reorder_cache`` / ``batch_repeat_interleave`` /
  ``batch_select_indices`` keep the bookkeeping in step with the rows.

The layers' own lengths (what the cache writes and masks by) stay in rows,
so ``DynamicCache`` and ``StaticCache`` (and compiled static generation) work
unchanged: a static buffer simply fills its first ``N_un`` rows.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ..core.vtu_state import VTUCacheState


class _VTUCacheMixin:
    """Methods a DyMU cache overrides (see the module doc)."""

    _dymu_state: Optional[VTUCacheState] = None

    def get_seq_length(self, *args, **kwargs):
        state = self._dymu_state
        return super().get_seq_length(*args, **kwargs) if state is None else state.length

    def crop(self, tokens_to_remove: int) -> None:
        state = self._dymu_state
        if state is not None and tokens_to_remove < 0:
            k = -tokens_to_remove
            # The cache drops its last k rows: the positions kept must not use them
            # (true when the last k positions are tokens of one row each — text,
            # generated or candidate tokens — in every sample).
            kept = state.length - k
            if kept < 0 or (k and kept and int(state.merge_map[:, :kept].max()) >= int(state.rows) - k):
                raise ValueError(
                    f"cannot crop {k} positions from a DyMU KV cache: the positions kept would lose cache rows they "
                    "use; only trailing positions of one row each (text, generated tokens) can be cropped, not merged "
                    "image tokens"
                )
            self._dymu_state = state.drop_last(k)
        super().crop(tokens_to_remove)

    def reset(self) -> None:
        super().reset()
        self._dymu_state = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._dymu_state is not None:
            self._dymu_state = self._dymu_state.select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self._dymu_state is not None:
            self._dymu_state = self._dymu_state.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        state = self._dymu_state
        if state is not None:
            self._dymu_state = state.select(torch.arange(state.merge_map.shape[0]).repeat_interleave(repeats))


@functools.lru_cache(maxsize=None)
def _vtu_cache_class(base: type) -> type:
    return type(f"VTU{base.__name__}", (_VTUCacheMixin, base), {"__module__": __name__})


def static_length(cache) -> Optional[int]:
    """The length of a static (compileable) cache — how many positions
    ``generate()`` sized it for — or None for a growing cache."""
    if cache is None or not getattr(cache, "is_compileable", False):
        return None
    method = getattr(cache, "get_max_length", None) or getattr(cache, "get_max_cache_shape", None)  # older name
    length = method() if method is not None else None
    return length if isinstance(length, int) and length > 0 else None


def cache_state(cache) -> Optional[VTUCacheState]:
    """The VTU state of ``cache`` (None for no cache, or one DyMU never filled)."""
    return getattr(cache, "_dymu_state", None)


def set_cache_state(cache, state: VTUCacheState) -> None:
    """Attach ``state`` to ``cache``, turning it into a DyMU cache (class swap,
    this instance only) the first time."""
    if not isinstance(cache, _VTUCacheMixin):
        _make_vtu_cache(cache)
    cache._dymu_state = state


@torch.compiler.disable
def _make_vtu_cache(cache) -> None:
    # Outside any compiled graph: dynamo cannot trace a __class__ assignment
    # (this runs once per cache, at the end of the prompt's forward).
    cache.__class__ = _vtu_cache_class(type(cache))
