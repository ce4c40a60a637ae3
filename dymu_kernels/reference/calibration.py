"""Threshold calibration for DToMe (docs/design.md §1.2) and the threshold file.

For layer i with a target of ``r_i`` merges per image, a batch of B images is
run through the encoder; at layer i all A->B edges of the whole batch are
ranked, the best ``r_i * B`` are merged (so busy images keep more tokens than
simple ones), and the batch's threshold for that layer is the score of the
best edge that was *not* merged, clamped at >= 0. Thresholds are averaged over
batches. At inference a token merges when its score is ``> threshold``.

Thresholds are stored as a small versioned JSON file::

    {"format": "dymu_kernels.thresholds", "version": 1,
     "model": "openai/clip-vit-large-patch14-336", "schedule": "constant",
     "r": [21, 21, ...], "num_images": 1000, "thresholds": [0.996, 0.973, ...]}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, List, Optional, Sequence, Union

import torch

from .dtome import rank_descending

FORMAT = "dymu_kernels.thresholds"
VERSION = 1
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
        if layer == 0:
            self.num_images += node_max.shape[0]
        mask, threshold = batch_top_k_mask(node_max, self.r[layer] * node_max.shape[0])
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


@dataclass
class Thresholds:
    """Calibrated per-layer thresholds with the metadata needed to trust them."""

    thresholds: List[float]
    r: List[int]
    schedule: str = "constant"
    model: str = ""
    num_images: int = 0
    version: int = VERSION

    def __post_init__(self):
        _validate_fields(asdict(self), source="Thresholds")

    def save(self, path: Union[str, os.PathLike]) -> None:
        data = {"format": FORMAT, **asdict(self)}
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "Thresholds":
        """Read and validate a threshold file; ValueError says what is wrong."""
        try:
            with open(path) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"threshold file {os.fspath(path)!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"threshold file {os.fspath(path)!r} must hold a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(
                f"threshold file {os.fspath(path)!r}: 'format' must be {FORMAT!r}, got {data.get('format')!r}"
            )
        fields = {k: v for k, v in data.items() if k != "format"}
        _validate_fields(fields, source=f"threshold file {os.fspath(path)!r}")
        return cls(**fields)


_FIELDS = ("thresholds", "r", "schedule", "model", "num_images", "version")


def _validate_fields(d: dict, source: str) -> None:
    unknown = sorted(set(d) - set(_FIELDS))
    missing = [k for k in ("thresholds", "r", "version") if k not in d]
    if unknown:
        raise ValueError(f"{source}: unknown fields {unknown}; expected {list(_FIELDS)}")
    if missing:
        raise ValueError(f"{source}: missing fields {missing}")
    if d["version"] != VERSION or isinstance(d["version"], bool):
        raise ValueError(f"{source}: unsupported version {d['version']!r}; this dymu_kernels reads version {VERSION}")
    thr, r = d["thresholds"], d["r"]
    if not isinstance(thr, list) or not thr:
        raise ValueError(f"{source}: 'thresholds' must be a non-empty list of numbers")
    for i, t in enumerate(thr):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ValueError(f"{source}: thresholds[{i}] must be a finite number, got {t!r}")
    if not isinstance(r, list) or len(r) != len(thr):
        raise ValueError(f"{source}: 'r' must be a list with one int per layer ({len(thr)}), got {r!r}")
    for i, v in enumerate(r):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{source}: r[{i}] must be a non-negative int, got {v!r}")
    if d.get("schedule", "constant") not in SCHEDULES + ("custom",):
        raise ValueError(f"{source}: 'schedule' must be one of {SCHEDULES + ('custom',)}, got {d['schedule']!r}")
    if not isinstance(d.get("model", ""), str):
        raise ValueError(f"{source}: 'model' must be a string, got {d['model']!r}")
    n = d.get("num_images", 0)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{source}: 'num_images' must be a non-negative int, got {n!r}")


def calibrate_thresholds(
    encoder: Callable[[torch.Tensor, object], object],
    batches: Iterable[torch.Tensor],
    r: Union[int, Sequence[int]],
    *,
    num_layers: Optional[int] = None,
    schedule: str = "constant",
    model: str = "",
    progress: bool = True,
    total: Optional[int] = None,
) -> Thresholds:
    """Calibrate per-layer thresholds by running ``encoder`` over ``batches``.

    Args:
        encoder: ``encoder(batch, policy)`` runs a DToMe encoder whose block i
            calls ``policy.select(i, node_max)`` to choose its merges (see
            :class:`dymu_kernels.models.TinyViT`).
        batches: iterable of input batches (e.g. image tensors).
        r: merges per image per layer on average (with ``schedule`` and
            ``num_layers``) or an explicit per-layer list (schedule "custom").
        progress: show a tqdm progress bar.
        total: number of batches, for the progress bar (when ``batches`` has no length).

    Returns:
        :class:`Thresholds`, the running mean over batches per layer.
    """
    if isinstance(r, int) and not isinstance(r, bool):
        if num_layers is None:
            raise ValueError("num_layers is required when r is a single int")
        r_list = merge_schedule(r, num_layers, schedule)
    else:
        r_list = [int(v) for v in r]
        schedule = "custom"
    calibrator = ThresholdCalibrator(r_list)
    from tqdm.auto import tqdm

    with torch.no_grad():
        for batch in tqdm(batches, desc="calibrating thresholds", total=total, unit="batch", disable=not progress):
            encoder(batch, calibrator)
    return Thresholds(
        thresholds=calibrator.thresholds,
        r=r_list,
        schedule=schedule,
        model=model,
        num_images=calibrator.num_images,
    )


# Published DyMU thresholds for OpenAI CLIP ViT-L/14-336, blocks 0..23 (docs/design.md §5).
PUBLISHED = {
    ("openai/clip-vit-large-patch14-336", "low"): [
        0.99609375, 0.97265625, 0.94140625, 0.91015625, 0.87890625, 0.87890625,
        0.87890625, 0.84765625, 0.84765625, 0.87890625, 0.84765625, 0.84765625,
        0.87890625, 0.87890625, 0.91015625, 0.91015625, 0.91015625, 0.91015625,
        0.94140625, 0.87890625, 0.87890625, 0.97265625, 0.99609375, 0.81640625,
    ],
}


def published_thresholds(model: str = "openai/clip-vit-large-patch14-336", level: str = "low") -> Thresholds:
    """Thresholds released with the paper's code (only CLIP-L/14-336 "low")."""
    key = (model, level)
    if key not in PUBLISHED:
        missing = ""
        if model == "openai/clip-vit-large-patch14-336" and level in ("mid", "high"):
            missing = (f" The paper's {level!r} thresholds were not released with values this package could include; "
                       f"calibrate them on your images: python3 -m dymu_kernels.calibrate --model MODEL --images DIR "
                       f"--level {level} --out {level}.json, then apply_dymu(model, '{level}.json').")
        raise ValueError(f"no published thresholds for {key}; available: {sorted(PUBLISHED)}.{missing}")
    values = PUBLISHED[key]
    return Thresholds(thresholds=list(values), r=[21] * len(values), model=model, schedule="constant")
