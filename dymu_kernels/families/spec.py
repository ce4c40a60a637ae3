"""What a model family tells the shared core (:class:`Family`), and the
per-patch state its encoding reads and writes (:class:`Patch`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch

from ..backends import BACKEND_NAMES
from ..core.encoder import check_trim
from ..core.compact import MergedItems
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


class DToMeTower(Protocol):
    """What ``Family.build_encoder`` returns and :class:`Patch` holds: the
    family's vision tower with DToMe in its stages. Running it is the
    family's own business (its :attr:`Modality.encode` functions call it and
    return :class:`Encoded`); the core reads only what it was built with, to
    tell a repeated ``apply_dymu`` from a change."""

    thresholds: object  # the resolved thresholds of its stages (a list, or one entry per stage)
    r: Optional[List[int]]  # fixed-r merges per block, or None
    trim: Union[str, bool]  # "auto" | True | False (core.encoder.DToMeVisionEncoder)


@dataclass
class Patch:
    """One patched model's DyMU settings and state (transformers and vLLM alike)."""

    encoder: DToMeTower  # the family's DToMe tower (core.encoder.DToMeVisionEncoder, qwen2_vl.QwenDToMe)
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


@dataclass
class Encoded:
    """What a family's encoder returns for a batch of one modality's items
    (images, videos): plain tensors, no transformers or vLLM types —
    :mod:`dymu_kernels.hf` wraps it in transformers' output type,
    :mod:`dymu_kernels.vllm` tags its rows for the engine.

    ``n`` items in placeholder order; item ``i`` has ``P_i`` placeholders
    and ``counts[i]`` unique rows.
    """

    items: MergedItems  # features [n, U_cap, C], counts [n], slots [n, P_max] (-1 past P_i)
    placeholders: Optional[List[int]] = None  # P_i per item where they differ (None: every item has P_max)
    # The vision tower's outputs as transformers' ``get_*_features`` returns them (each original token
    # carrying its merged token): ``last_hidden_state``, and ``hidden_states`` (None unless asked for).
    last_hidden_state: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    # More fields of transformers' output of the encoding method, by name (Qwen3-VL: deepstack_features)
    outputs: Dict[str, object] = field(default_factory=dict)

    def rows(self, values: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Per item, each placeholder's unique row: ``[P_i, C]`` (what the
        unpatched model's ``pooler_output`` holds, virtually unmerged) —
        of ``values [n, U_cap, C']`` if given (default: the features)."""
        m = self.items
        values = m.features if values is None else values
        slots = m.slots.clamp_min(0) if self.placeholders is not None else m.slots
        expanded = values.gather(1, slots[..., None].expand(-1, -1, values.shape[-1]))
        if self.placeholders is None:
            return list(expanded.unbind(0))
        return [expanded[i, :p] for i, p in enumerate(self.placeholders)]


@dataclass(frozen=True)
class Modality:
    """One kind of visual input of a model family. The model's encoding
    method ``method`` (``generate()`` calls it first) is replaced, on a
    patched instance, by one with the stock method's parameters that
    encodes through ``encode``."""

    name: str  # "image" / "video": the mm_encoder_outputs key and the output field prefix
    token_attr: str  # config attribute holding its placeholder id
    pixels: str  # forward argument (and the method's parameter) with its pixels
    method: str  # the model's encoding method, e.g. "get_image_features"
    # encode(inner, patch, pixels, dtype, vision_kwargs) -> Encoded; vision_kwargs: the forward's vision
    # arguments (Family.vision_kwargs) or the method's other arguments, by name
    encode: Callable


@dataclass(frozen=True)
class SequenceMixer:
    """A language-model layer's sequence mixer other than attention that VTU
    runs exactly (Qwen3.5's Gated DeltaNet), declared by module names only —
    :mod:`dymu_kernels.hf` installs it on transformers' modules.

    The contract that makes it exact: the module at ``attr`` of every decoder
    layer whose type (``config.layer_types``) is ``layer_type`` takes the
    hidden states ``[B, T, C]`` first and reads them only through the
    token-wise, bias-free ``inputs`` (linear projections); what follows them
    mixes positions (convolutions, recurrences) and then works per position,
    up to the token-wise ``output`` (a linear layer). Under VTU, on a prompt:
    ``inputs`` run on the unique rows and are gathered to every virtual
    position (padding positions zero, as the stock module zeroes padding
    before projecting); the module's own forward mixes the whole virtual
    sequence (its caches keep the virtual sequence's states); ``output``'s
    input is averaged per group (a group's positions, as VTU attention
    re-merges) and ``output`` runs on the unique rows. Nothing merged is the
    stock module; on a filled cache new tokens are singletons (the stock
    module unchanged)."""

    layer_type: str  # the decoder layers' type it sits in (config.layer_types), e.g. "linear_attention"
    attr: str  # the mixer module's attribute on those layers, e.g. "linear_attn"
    inputs: Tuple[str, ...]  # its token-wise input projections (attributes of the mixer)
    output: str  # its token-wise output projection


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
    # lm_inputs(inner, extra [B, N_un, E], visual [B, N_un] bool) -> dict: more keyword arguments of the language
    # model's forward for a prompt whose items carry extra rows (MergedItems.extra; laid out with their unique
    # rows into the compact sequence: ``visual`` marks the visual items' rows). None: the family has none.
    lm_inputs: Optional[Callable] = None
    # The stock encoding methods' output class (imported lazily; None: transformers' BaseModelOutputWithPooling)
    # and the sequence their ``pooler_output`` holds the items in (LLaVA: a list; Qwen: torch.split's tuple).
    feature_output: Optional[Callable[[], type]] = None
    feature_items: type = list
    # The language model's sequence mixers other than attention (:class:`SequenceMixer`): their layer types are
    # served; any other non-attention layer type is refused (core.lm_features.check_full_attention).
    mixers: Tuple[SequenceMixer, ...] = ()
    # The language model's attention rotates the first R dims of each head (``partial_rotary_factor`` < 1), as
    # transformers' partial-rotary models do (``q[..., :R]``, rotate_half within): VTU attention takes
    # ``rotary_dim=R``. False: partial rotary is refused.
    partial_rotary: bool = False

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
