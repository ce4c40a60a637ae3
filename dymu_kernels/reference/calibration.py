"""Threshold calibration for DToMe (docs/design.md §1.2): the spec.

For layer i with a target of ``r_i`` merges per image, a batch of B images is
run through the encoder; at layer i all A->B edges of the whole batch are
ranked, the best ``r_i * B`` are merged (so busy images keep more tokens than
simple ones), and the batch's threshold for that layer is the score of the
best edge that was *not* merged, clamped at >= 0. Thresholds are averaged over
batches. At inference a token merges when its score is ``> threshold``.

The driver that runs an encoder over batches and the threshold file it
writes are product code: :mod:`dymu_kernels.core.thresholds`.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch

from .dtome import rank_descending

SCHEDULES = ("constant", "linear", "reverse_linear")


def merge_schedule(r: int, num_layers: int, kind: str = "constant") -> List[int]:
    """Per-layer merge targets ``r_i`` that sum to ``r * num_layers``.

    ``constant``: ``r`` every layer. ``linear``: more merging early, weights
    ``num_layers, ..., 1``. ``reverse_linear``: more merging late, weights
    ``1, ..., num_layers``. Weighted shares are rounded by largest remainder
    (earlier layer first on ties) so the total is exact.
    """
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be a non-negative int, got {r!r}")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    total = r * num_layers
    if kind == "constant":
        return [r] * num_layers
    weights = list(range(num_layers, 0, -1)) if kind == "linear" else list(range(1, num_layers + 1))
    shares = [total * w / sum(weights) for w in weights]
    out = [math.floor(s) for s in shares]
    by_remainder = sorted(range(num_layers), key=lambda i: (-(shares[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def batch_top_k_mask(node_max: torch.Tensor, k: int):
    """Merge the best ``k`` edges of the whole batch.

    Args:
        node_max: ``[B, n_a]`` best score per A token (``-inf`` = cannot merge).
        k: number of edges to merge in the batch (``r_i * B``).

    Returns:
        ``(mask [B, n_a] bool, threshold float)`` where threshold is the score
        of the best edge left unmerged, clamped at >= 0 (0 if all merged).
        Ties in rank keep batch order (image-major). Reads values: calibration
        runs offline, so the host sync is acceptable here.
    """
    flat = node_max.reshape(-1)
    rank = rank_descending(flat)
    mergeable = flat > float("-inf")
    mask = (rank < k) & mergeable
    n_mergeable = int(mergeable.sum())
    if k < n_mergeable:
        best_left = float(flat.sort(descending=True).values[k])
    else:
        best_left = 0.0
    return mask.reshape(node_max.shape), max(best_left, 0.0)


class ThresholdCalibrator:
    """Selection used while calibrating: batch-level top ``r_i * B`` edges.

    Pass it as the encoder's merge policy for each calibration batch; it keeps
    a running mean of every layer's batch threshold.
    """

    def __init__(self, r: Sequence[int]):
        self.r = [int(v) for v in r]
        self._sum = [0.0] * len(self.r)
        self._count = [0] * len(self.r)
        self.num_images = 0

    def select(self, layer: int, node_max: torch.Tensor) -> torch.Tensor:
        """The merges of ``layer`` for one batch (``node_max [B, n_a]``).
        ValueError when the batch has fewer mergeable tokens than ``r_i * B``:
        the layer's threshold would be 0 and merge less than asked, so the
        calibration stops at once, saying what the tower allows."""
        B, n_a = node_max.shape
        if layer == 0:
            self.num_images += B
            self._tokens = int((node_max > float("-inf")).sum())  # mergeable A tokens of the batch: about half
        k = self.r[layer] * B
        available = int((node_max > float("-inf")).sum())
        if k > available:
            n0 = 2 * getattr(self, "_tokens", n_a)
            raise ValueError(
                f"r asks for {self.r[layer]} merges per image in block {layer} of {len(self.r)}, but only "
                f"{available / B:g} tokens per image can merge there on these images (a block merges at most half "
                f"of the tokens left; the calibration would write a threshold of 0 that merges less than asked). "
                f"With about {n0 / B:g} tokens per image, no constant r above about {n0 / B / (len(self.r) + 1):.1f} "
                f"lasts through {len(self.r)} blocks: ask for a smaller r")
        mask, threshold = batch_top_k_mask(node_max, k)
        self._sum[layer] += threshold
        self._count[layer] += 1
        return mask

    @property
    def thresholds(self) -> List[float]:
        """Mean batch threshold per layer (layers never reached raise)."""
        missing = [i for i, c in enumerate(self._count) if c == 0]
        if missing:
            raise RuntimeError(f"no calibration batch reached layers {missing}")
        return [s / c for s, c in zip(self._sum, self._count)]
