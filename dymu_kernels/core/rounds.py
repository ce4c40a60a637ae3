"""DToMe rounds on finished tokens: threshold merging after a tower.

Some towers cannot merge inside their blocks on single tokens — Qwen2-VL's
``PatchMerger`` concatenates each 2×2 unit of four patches, so a merge there
must act on whole units — but their *outputs* are tokens like any other.
:class:`DToMeRounds` merges a batch of token sets (images, video frame pairs)
in ``R`` bipartite rounds, each as one encoder block's DToMe step
(:func:`dymu_kernels.dtome_merge`: A/B alternate slots, a token merges into
its most similar partner when their cosine similarity exceeds the round's
threshold, size-weighted averages). The similarity metric is the tokens
themselves (there are no attention keys after a tower). One round removes at
most half of a set's tokens, so stronger reductions take several rounds.

Sets of different sizes share one padded batch (``lengths``); padded slots
never match. Nothing merges with ``threshold = inf`` (or ``r = 0``): the
output is then the input, in its order.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..ops.dtome import dtome_merge
from ..reference.dtome import MergeState, init_merge_state, trim_state
from .encoder import DToMeVisionOutput, check_trim, trims_on
from .thresholds import Thresholds, resolve_thresholds


class DToMeRounds:
    """``R`` DToMe rounds over padded token sets.

    Args:
        thresholds: one threshold per round (list, :class:`Thresholds` or a
            threshold file); a round merges tokens scoring above it.
        r: instead, merge exactly ``r`` tokens per set and round (int, or
            one per round): the fixed-r ablation.
        rounds: the number of rounds for an int ``r`` (default 1).
        backend: ``"auto" | "triton" | "cpp" | "torch"`` for the merge.
        trim: ``"auto" | True | False``: shrink the padded capacity to the
            longest set after each round (one host read; ``"auto"``: on the
            CPU only, as :class:`~.encoder.DToMeVisionEncoder`).
    """

    def __init__(self, thresholds: Union[None, Sequence[float], Thresholds, str] = None, *,
                 r: Union[None, int, Sequence[int]] = None, rounds: Optional[int] = None, backend: str = "auto",
                 trim: Union[str, bool] = "auto"):
        if (thresholds is None) == (r is None):
            raise ValueError("give thresholds (one per round) or r (fixed merges per round), exactly one")
        check_trim(trim)
        if r is not None:
            if isinstance(r, bool) or not isinstance(r, (int, list, tuple)):
                raise ValueError(f"r must be an int or one int per round, got {r!r}")
            r = [r] * (1 if rounds is None else int(rounds)) if isinstance(r, int) else list(r)
            if not r or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in r):
                raise ValueError(f"r must be non-negative ints, one per round, got {r!r}")
            self.thresholds, self.r = None, r
        else:
            if isinstance(thresholds, (str, os.PathLike)):
                thresholds = Thresholds.load(thresholds)
            values = list(thresholds.thresholds if isinstance(thresholds, Thresholds) else thresholds)
            if not values:
                raise ValueError("thresholds is empty: give one threshold per round")
            self.thresholds = resolve_thresholds(values, len(values))  # every entry is a round
            self.r = None
            if rounds is not None and int(rounds) != len(self.thresholds):
                raise ValueError(f"rounds={rounds} but {len(self.thresholds)} thresholds given (one per round)")
        self.num_layers = len(self.thresholds if self.r is None else self.r)
        self.backend = backend
        self.trim = trim

    def trims_on(self, device: torch.device) -> bool:
        return trims_on(self.trim, device)

    def __call__(self, x: torch.Tensor, lengths: torch.Tensor) -> DToMeVisionOutput:
        """Merge ``x [n, P_max, C]`` (set ``i`` holds ``lengths[i]`` tokens):
        the merged sets (``features``, ``size``, ``lengths``, ``pos_map``
        ``[n, P_max]`` from each original token to its merged slot) and the
        tokens left after each round."""
        state, per_round = self.merge(init_merge_state(x, lengths.to(x.device)))
        return DToMeVisionOutput(features=state.x, size=state.size, lengths=state.lengths, pos_map=state.pos_map,
                                 tokens_per_layer=per_round)

    def merge(self, state: MergeState) -> Tuple[MergeState, List[torch.Tensor]]:
        """The rounds on a merge state (tokens that may already stand for
        several originals: sizes and ``pos_map`` carry on); also the tokens
        left after each round."""
        per_round: List[torch.Tensor] = []
        trims = self.trims_on(state.x.device)
        for i in range(self.num_layers):
            threshold = None if self.thresholds is None else self.thresholds[i]
            r = None if self.r is None else self.r[i]
            state = dtome_merge(*state, metric=state.x, threshold=threshold, r=r, cls_token=False,
                                backend=self.backend)
            if trims:
                state = trim_state(state)
            per_round.append(state.lengths)
        return state, per_round
