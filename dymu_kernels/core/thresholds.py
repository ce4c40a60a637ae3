"""Per-block DToMe thresholds as a product: the versioned threshold file,
the published presets, how :func:`apply_dymu` reads what a user passes, and
the calibration driver (the calibration rule itself is the spec in
:mod:`dymu_kernels.reference.calibration`).

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

from ..reference.calibration import SCHEDULES, ThresholdCalibrator, merge_schedule

FORMAT = "dymu_kernels.thresholds"
VERSION = 1


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


def resolve_thresholds(thresholds, num_layers: int) -> Optional[List[float]]:
    """Per-block thresholds as floats, checked: from a list, a :class:`Thresholds`
    or a threshold JSON path; None stays None.

    A threshold compares cosine similarities, so it must lie in ``[-1, 1]``;
    ``float("inf")`` switches merging off in that block (even a score rounded
    to just above 1 does not exceed it). Raises ValueError naming the entry.
    """
    if thresholds is None:
        return None
    if isinstance(thresholds, (str, os.PathLike)):
        thresholds = Thresholds.load(thresholds)
    if isinstance(thresholds, Thresholds):
        thresholds = thresholds.thresholds
    values = list(thresholds)
    for i, t in enumerate(values):
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t != t:
            raise ValueError(f"thresholds[{i}] must be a number, got {t!r}")
        if not (-1.0 <= t <= 1.0 or t == float("inf")):
            raise ValueError(
                f"thresholds[{i}] = {t!r} is outside [-1, 1], the range of the cosine similarities it is compared "
                "with; use float('inf') to merge nothing in a block"
            )
    if len(values) < num_layers:
        raise ValueError(
            f"thresholds has {len(values)} entries but {num_layers} encoder blocks run; give one per block"
        )
    return [float(t) for t in values[:num_layers]]


def thresholds_argument(thresholds, num_layers: int) -> Optional[List[float]]:
    """What ``apply_dymu(model, thresholds)`` accepts, resolved and checked:
    a preset ``"model:level"`` (:func:`published_thresholds`), a threshold
    file, a :class:`Thresholds` or a list (:func:`resolve_thresholds`)."""
    if isinstance(thresholds, dict):  # stages: the form of towers that merge in stages (Qwen2-VL-type)
        raise ValueError(f"thresholds as a dict of stages ({sorted(thresholds)}) is for Qwen2-VL-type models; this "
                         f"tower takes one threshold per encoder block ({num_layers}), a preset or a file")
    if isinstance(thresholds, str) and not os.path.exists(thresholds):
        model, _, level = thresholds.rpartition(":")
        if not model:
            raise ValueError(
                f"thresholds {thresholds!r} is neither a threshold file nor a preset 'model:level' "
                "(e.g. 'openai/clip-vit-large-patch14-336:low')"
            )
        thresholds = published_thresholds(model, level)
    return resolve_thresholds(thresholds, num_layers)


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
