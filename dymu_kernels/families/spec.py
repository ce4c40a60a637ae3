"""What a model family tells the shared core (:class:`Family`), and the
per-patch state its encoding reads and writes (:class:`Patch`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..backends import BACKEND_NAMES
from ..core.encoder import check_trim
from ..core.positions import LinearPositions
from ..core.thresholds import merge_arguments


def model_names(config) -> Tuple[str, ...]:
    """The names a model was loaded by (checkpoint ids / paths of its config
    and vision config), to tell a threshold file calibrated for another model."""
    configs = (config, getattr(config, "vision_config", None))
    return tuple(n for n in dict.fromkeys(getattr(c, "_name_or_path", "") for c in configs) if n)


@dataclass
class DyMUStats:
    """Per-item statistics of the last forward that encoded a modality."""

    tokens_kept: List[int]  # tokens passed to the language model, per tower item (image, crop, frame)
    tokens_per_layer: List[List[int]]  # per item: tokens after each vision block
    num_patches: Union[int, List[int]]  # tokens per item without DyMU (one count for all, or per item)


@dataclass
class ItemCounts:
    """Token counts of the last encoded tower batch, kept on the device: a
    forward reads nothing back for statistics; ``dymu_stats`` does, when asked."""

    kept: torch.Tensor  # [n] tokens passed to the language model per item
    per_layer: List[torch.Tensor]  # one [n] tensor per vision block
    num_patches: Union[int, List[int]]  # tokens per item without DyMU: one count for all, or per item

    def total_patches(self) -> int:
        """Tokens of all items without DyMU."""
        p = self.num_patches
        return sum(p) if isinstance(p, list) else p * self.kept.shape[0]

    def stats(self) -> DyMUStats:
        return DyMUStats(tokens_kept=self.kept.tolist(), tokens_per_layer=torch.stack(self.per_layer, dim=1).tolist(),
                         num_patches=self.num_patches)


@dataclass
class Patch:
    """One patched model's DyMU settings and state (transformers and vLLM alike)."""

    encoder: object  # the family's DToMe tower (e.g. core.encoder.DToMeVisionEncoder)
    vtu: bool
    backend: str
    select_strategy: Optional[str]  # LLaVA-type families: vision_feature_select_strategy
    family: "Family"
    deterministic: bool = True  # VTU attention without fp32 atomics (Triton)
    counts: Dict[str, ItemCounts] = field(default_factory=dict)  # per modality, of its last tower batch
    undo: List[Callable[[], None]] = field(default_factory=list)  # what remove_dymu runs, newest first

    def settings(self):
        """What ``apply_dymu`` was asked for (to tell a repeat from a change)."""
        e = self.encoder
        return (e.thresholds, e.r, e.trim, self.vtu, self.backend, self.deterministic)


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a model family."""

    name: str  # "image" / "video": the mm_encoder_outputs key and the output field prefix
    token_attr: str  # config attribute holding its placeholder id
    pixels: str  # forward argument with its pixels
    method: str  # the model's encoding method, patched to merge (generate() calls it first)
    encode: Callable  # encode(inner, patch, pixels, dtype, vision_kwargs) -> DyMUImageOutputs
    patched: Callable  # what replaces ``method``: the same parameter names, merged output


@dataclass(frozen=True)
class Family:
    """What the shared core needs to know about one model family."""

    model_type: str
    class_name: str
    modalities: Tuple[Modality, ...]
    output_class: Callable[[], type]  # the base model's output class (imported lazily)
    default_thresholds: Optional[str]  # preset used when apply_dymu gets none
    # stages(config, tower) -> Tuple[Stage, ...]: where the tower merges and the thresholds / r each takes
    # (core.thresholds.Stage); the first is what a plain list or file of thresholds is for.
    stages: Callable
    # build_encoder(config, tower, merge: MergeArguments, backend, trim) -> (DToMe tower, select strategy or None)
    build_encoder: Callable
    vision_kwargs: Tuple[str, ...]  # forward arguments only the vision side reads
    tower_attr: str = "vision_tower"  # the base model's vision tower attribute
    positions: object = field(default_factory=LinearPositions)  # position provider (core.positions)

    def encoder(self, config, tower, thresholds="default", r=None, backend: str = "auto",
                trim: Union[str, bool] = "auto", names: Sequence[str] = ()):
        """The family's DToMe tower for ``thresholds`` / ``r`` as ``apply_dymu``
        takes them, read once against :attr:`stages`
        (:func:`~dymu_kernels.core.thresholds.merge_arguments`): ``(tower,
        select strategy or None)``. ``config``: the base model's config;
        ``tower``: its transformers vision tower; ``names``: the model's
        names, to warn about a threshold file calibrated for another model."""
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
        check_trim(trim)
        merge = merge_arguments(thresholds, r, self.stages(config, tower), family=self.class_name,
                                default=self.default_thresholds, names=names)
        return self.build_encoder(config, tower, merge, backend, trim)
