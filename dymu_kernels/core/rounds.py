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
never match. Nothing merges with ``threshold = inf``: the output is then the
input, in its order.
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple, Union

import torch

from ..ops.dtome import dtome_merge
from ..reference.dtome import MergeState, trim_state
from .encoder import check_trim, trims_on
from .thresholds import Stage, Thresholds, stage_thresholds

# The stage of rounds after a tower's merger: one threshold per round, any number of rounds.
ROUNDS = Stage("merger", "round", None)


class DToMeRounds:
    """``R`` DToMe rounds over padded token sets.

    Args:
        thresholds: one threshold per round (list, :class:`Thresholds` or a
            threshold file); a round merges tokens scoring above it.
        backend: ``"auto" | "triton" | "cpp" | "torch"`` for the merge.
        trim: ``"auto" | True | False``: shrink the padded capacity to the
            longest set after each round (as :class:`~.encoder.DToMeVisionEncoder`).
    """

    def __init__(self, thresholds: Union[Sequence[float], Thresholds, str, os.PathLike], *, backend: str = "auto",
                 trim: Union[str, bool] = "auto"):
        check_trim(trim)
        self.thresholds = stage_thresholds(thresholds, ROUNDS)  # every entry is a round
        if self.thresholds is None:
            raise ValueError("thresholds is None: give one threshold per round")
        self.num_layers = len(self.thresholds)
        self.backend = backend
        self.trim = trim

    def trims_on(self, device: torch.device) -> bool:
        return trims_on(self.trim, device)

    def merge(self, state: MergeState) -> Tuple[MergeState, List[torch.Tensor]]:
        """The rounds on a merge state (tokens that may already stand for
        several originals: sizes and ``pos_map`` carry on); also the tokens
        left after each round."""
        per_round: List[torch.Tensor] = []
        trims = self.trims_on(state.x.device)
        for threshold in self.thresholds:
            state = dtome_merge(*state, metric=state.x, threshold=threshold, cls_token=False, backend=self.backend)
            if trims:
                state = trim_state(state)
            per_round.append(state.lengths)
        return state, per_round
