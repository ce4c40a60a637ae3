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
import numbers
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

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


@dataclass(frozen=True)
class Stage:
    """One place where a family's tower merges, and what thresholds it takes.

    Families declare their stages (:attr:`dymu_kernels.families.Family.stages`);
    :func:`merge_arguments` checks what a user passes against them — the one
    place thresholds and ``r`` are read.

    Attributes:
        name: the stage's key in a dict of stages (``"vit"``, ``"merger"``).
        entry: what one threshold is for, in messages (``"encoder block"``, ``"round"``).
        count: thresholds it takes, one per block it runs; None: any number
            >= 1, one per round (the list sets the number of rounds).
        whole: a second accepted length — thresholds for the whole tower
            where the family reads an earlier block (LLaVA-1.5 reads block 23
            of CLIP's 24; the published thresholds have 24): the entries past
            ``count`` are not used.
        fixed_r: ``r`` (fixed-r merging) applies to this stage.
    """

    name: str
    entry: str
    count: Optional[int]
    whole: Optional[int] = None
    fixed_r: bool = False

    def lengths(self) -> str:
        if self.count is None:
            return "one or more (one per round)"
        return " or ".join(str(n) for n in dict.fromkeys((self.count, self.whole or self.count)))


@dataclass(frozen=True)
class MergeArguments:
    """What ``apply_dymu(model, thresholds, r=...)`` asked for, checked
    against the family's stages: per stage its thresholds (None: the stage
    does not merge by threshold), and ``r`` per block of the fixed-r stage."""

    thresholds: Dict[str, Optional[List[float]]]
    r: Optional[List[int]] = None


def _is_number(t) -> bool:
    return isinstance(t, numbers.Real) and not isinstance(t, bool)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def stage_thresholds(value, stage: Stage, *, names: Sequence[str] = (), argument: str = "thresholds"
                     ) -> Optional[List[float]]:
    """One stage's thresholds as floats, checked: a preset ``"model:level"``
    (:func:`published_thresholds`), a threshold file, a :class:`Thresholds`
    or a sequence of numbers; None stays None.

    A threshold compares cosine similarities, so it must lie in ``[-1, 1]``;
    ``float("inf")`` switches merging off in that block (even a score rounded
    to just above 1 does not exceed it). The length must be what the stage
    takes (:attr:`Stage.count`, or :attr:`Stage.whole`): a list for another
    tower is never cut to fit. ``names``: the model's names (checkpoint ids
    or paths); a file or :class:`Thresholds` recorded for another model gets
    a warning naming both. Raises ValueError naming ``argument`` and the entry.
    """
    if value is None:
        return None
    if isinstance(value, str) and not os.path.exists(value):
        model, _, level = value.rpartition(":")
        if not model:
            raise ValueError(
                f"{argument} {value!r} is neither a threshold file nor a preset 'model:level' "
                "(e.g. 'openai/clip-vit-large-patch14-336:low')"
            )
        value = published_thresholds(model, level)
        names = tuple(names) + (model,)  # a preset is for the model it names
    source = argument
    if isinstance(value, (str, os.PathLike)):
        source = f"{argument} file {os.fspath(value)!r}"
        value = Thresholds.load(value)
    if isinstance(value, Thresholds):
        if value.model and names and value.model not in names:
            import warnings

            warnings.warn(f"{source} was calibrated for {value.model!r}, not for this model ({names[0]!r}): "
                          "thresholds are specific to a tower's weights", stacklevel=3)
        value = value.thresholds
    if _is_number(value):
        per = f"one per {stage.entry}"
        example = f"[{value}] * {stage.count}" if stage.count else f"[{value}]"
        raise ValueError(f"{argument} must be a list ({per}), a threshold file or a preset, got the number "
                         f"{value!r}; for the same threshold everywhere pass {example}")
    if isinstance(value, (dict, str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{argument} must be a list of numbers (one per {stage.entry}), a threshold file or a "
                         f"preset, got {type(value).__name__}")
    values = list(value)
    for i, t in enumerate(values):
        if not _is_number(t) or t != t:
            raise ValueError(f"{argument}[{i}] must be a number, got {t!r}")
        if not (-1.0 <= t <= 1.0 or t == float("inf")):
            raise ValueError(
                f"{argument}[{i}] = {t!r} is outside [-1, 1], the range of the cosine similarities it is compared "
                "with; use float('inf') to merge nothing in a block"
            )
    _check_length(values, stage, source)
    return [float(t) for t in values[:stage.count or len(values)]]


def _check_length(values: list, stage: Stage, source: str) -> None:
    n = len(values)
    if stage.count is None:
        if n == 0:
            raise ValueError(f"{source} is empty: give one threshold per {stage.entry}")
        return
    if n == stage.count or n == stage.whole:
        return
    if n < stage.count:
        raise ValueError(f"{source} has {n} entries but {stage.count} {stage.entry}s run; give one per "
                         f"{stage.entry}")
    raise ValueError(f"{source} has {n} entries but this tower takes {stage.lengths()} (one per {stage.entry}): "
                     f"thresholds for another tower are not cut to fit")


def stage_r(r, stage: Stage, argument: str = "r") -> Optional[List[int]]:
    """Fixed-r merging as one count per block of ``stage``: an int for every
    block, or one per block (as many as the stage's thresholds would be); None
    stays None. ValueError naming ``argument`` otherwise."""
    if r is None:
        return None
    if not stage.fixed_r or stage.count is None:
        raise ValueError(f"{argument}: fixed-r merging is not available for the {stage.name!r} stage")
    if _is_int(r):
        values = [r] * stage.count
    elif isinstance(r, Sequence) and not isinstance(r, (str, bytes)) and all(_is_int(v) for v in r):
        values = list(r)
        _check_length(values, stage, argument)
    else:
        values = None
    if values is None or min(values, default=0) < 0:
        raise ValueError(f"{argument} must be a non-negative int or one per {stage.entry} ({stage.lengths()}), "
                         f"got {r!r}")
    return [int(v) for v in values[:stage.count]]


def merge_arguments(thresholds, r, stages: Sequence[Stage], *, family: str, default: Optional[str] = None,
                    names: Sequence[str] = ()) -> MergeArguments:
    """``apply_dymu``'s ``thresholds`` and ``r`` read against a family's
    ``stages`` — the one parser of both, for transformers and vLLM alike.

    - ``thresholds``: for the first stage, or a dict ``{stage name: its
      thresholds}`` for any of them (:func:`stage_thresholds`); ``"default"``
      is the family's published preset ``default`` (ValueError where it has
      none), None is no threshold merging.
    - ``r``: fixed-r merging in the stage that takes it (:func:`stage_r`);
      thresholds for that same stage as well raise (two explicit choices
      are never silently reduced to one); thresholds for another stage
      (a dict without it) go with it.

    Raises ValueError naming the argument, the stage and what was expected.
    """
    by_name = {s.name: s for s in stages}
    fixed_r = None
    if r is not None:
        fixed = [s for s in stages if s.fixed_r]
        if not fixed:
            raise ValueError(f"r: {family} has no stage with fixed-r merging; give thresholds")
        fixed_r = stage_r(r, fixed[0])
        if isinstance(thresholds, str) and thresholds == "default":
            thresholds = None
        # r and thresholds for the same stage: two choices are never silently reduced to one.
        same = thresholds is not None and (not isinstance(thresholds, dict) or
                                           thresholds.get(fixed[0].name) is not None)
        if same:
            raise ValueError(f"give thresholds or r (fixed-r merging) for the {fixed[0].name!r} stage, not both: "
                             f"got thresholds={_short(thresholds)} and r={r!r}")
    if thresholds is None:
        return MergeArguments({s.name: None for s in stages}, fixed_r)
    if isinstance(thresholds, str) and thresholds == "default":
        if default is None:
            what = " and/or ".join(f"{s.name!r}: one per {s.entry}" for s in stages)
            raise ValueError(
                f"no published thresholds for {family}'s vision tower: pass thresholds calibrated on your images "
                f"(python3 -m dymu_kernels.calibrate --model ID --images DIR --r N --out t.json, then "
                f"apply_dymu(model, 't.json'); stages: {what}) or r=N"
            )
        thresholds = default
    if isinstance(thresholds, dict):
        unknown = sorted(set(thresholds) - set(by_name))
        if unknown:
            known = ", ".join(f"{s.name!r} (one per {s.entry})" for s in stages)
            raise ValueError(f"thresholds stages {unknown} unknown for {family}: its stages are {known}")
        if all(v is None for v in thresholds.values()):
            raise ValueError(f"thresholds={thresholds!r} asks for no DToMe stage: give thresholds for one of "
                             f"{list(by_name)}")
        values = thresholds
    else:
        values = {stages[0].name: thresholds}
    return MergeArguments({s.name: stage_thresholds(values.get(s.name), s, names=names,
                                                    argument=f"thresholds[{s.name!r}]" if isinstance(thresholds, dict)
                                                    else "thresholds")
                           for s in stages}, fixed_r)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
