"""What every DyMU model class of the plugin adds to vLLM's own class.

:class:`DyMUServing` is mixed in before a vLLM multimodal class (LLaVA,
LLaVA-OneVision, and through :mod:`.qwen` the Qwen families). When the config asks for DyMU (:mod:`.settings`):

- the vision tower becomes transformers' own tower class over the
  checkpoint's tower weights, run by the package's DToMe encoder — the same
  encoder, per-family encoding (:mod:`dymu_kernels.families`)
  and map packing that :func:`~dymu_kernels.hf.apply_dymu` uses;
- ``embed_multimodal`` returns each item's unique tokens copied to its
  placeholders and tagged with the merge map (:mod:`.groups`);
- ``embed_input_ids`` strips the tags of the pieces vLLM scheduled in the step
  and keeps the step's groups; the model's call (``__call__``, eager, before
  any compiled code) decides the step: a merged one runs ``forward`` eagerly,
  which runs the language model on the unique rows — vLLM's own decoder
  layers, hooked at the rotary embedding and the attention call, or at a
  hybrid model's sequence mixer (:mod:`.layers`) — and hands vLLM one row per
  position; steps where nothing merged (decode, text-only prefill) run vLLM's
  own forward, compiled when the engine compiles (also where vLLM compiles
  the whole class, Qwen3.5).

Without it every method is vLLM's. :class:`ServingStats` counts what was saved.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..core.lm_features import check_full_attention
from ..families import Patch, families, model_names
from ..reference.dtome import unmerged_if_nonfinite
from .cpu_gemm import use_vllm_cpu_gemm
from .engine_checks import check_engine
from .groups import TAG_COLUMNS, StepGroups, step_groups, tag_item, untag_pieces
from .layers import StepHolder, install_vtu_hooks
from .settings import settings_from_config


@dataclass
class ServingStats:
    """What DyMU saved since the engine started (per worker process), in the
    steps it served: items vLLM's warm-up encodes (a compiled engine's dummy
    maximum-size item) are not counted."""

    items_encoded: int = 0  # images / videos through the tower (vLLM encodes an item once while its cache holds it)
    tower_tokens: int = 0  # tokens entering the tower's merging blocks (crops, frames included; Qwen: 2x2 units)
    tower_tokens_kept: int = 0  # tokens leaving them after DToMe
    placeholders: int = 0  # placeholders of the items encoded: the language model's positions for them
    unique_rows: int = 0  # the unique rows among those placeholders
    llm_positions: int = 0  # positions run through the language model (attention + KV cache: all of them)
    llm_rows: int = 0  # rows its token-wise work (norms, projections, MLP) ran on
    steps: int = 0  # language-model forwards
    max_step_positions: int = 0  # the most positions one forward ran (chunked prefill keeps it <= its budget)
    tokens_per_block: List[List[int]] = field(default_factory=list)  # last tower batch: per crop, after each block
    nonfinite_rows: int = 0  # crops / frames left unmerged in a block for a non-finite tower output (see _dymu_encode)
    tp_disagreements: int = 0  # items this tensor-parallel rank merged otherwise than rank 0, whose it serves

    def as_dict(self) -> Dict[str, object]:
        d = dict(self.__dict__)
        d["tower_kept_fraction"] = self.tower_tokens_kept / self.tower_tokens if self.tower_tokens else 1.0
        d["llm_tokenwise_fraction"] = self.llm_rows / self.llm_positions if self.llm_positions else 1.0
        return d

    def add_tower(self, other: "ServingStats") -> None:
        """Add ``other``'s tower counts (items, tokens in and out, placeholders, unique rows, rows left
        unmerged for a non-finite output, items decided otherwise than on rank 0)."""
        for name in ("items_encoded", "tower_tokens", "tower_tokens_kept", "placeholders", "unique_rows",
                     "nonfinite_rows", "tp_disagreements"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.tokens_per_block:
            self.tokens_per_block = other.tokens_per_block


_UNMERGED = object()  # a counted step whose tokens are all distinct rows
logger = logging.getLogger(__name__)


class DyMUServing:
    """Mixin before a vLLM multimodal class (see module doc)."""

    dymu_family: str  # the key of :func:`dymu_kernels.families.families`
    dymu_tower: str  # transformers' tower class for the checkpoint's vision config (a top-level or dotted name)
    dymu_tower_attr = "vision_tower"  # where the tower module (the checkpoint's tower weights) is held

    def _dymu_setup(self, vllm_config) -> None:
        self.dymu = settings_from_config(self.config)
        self.dymu_stats = ServingStats()
        # Tower counts of items encoded since the last step: a step that embeds them adds them to dymu_stats;
        # a forward without an embedding before it (vLLM's warm-up runs) drops them.
        self._dymu_encoded = ServingStats()
        self._dymu_holder = StepHolder()
        self._dymu_counted = None
        self._dymu_run: Optional[StepGroups] = None  # the merged step __call__ is running (forward reads it)
        if self.dymu is None:
            return
        check_engine(vllm_config)  # the config hook refuses first; this guards direct builds
        family = families()[self.dymu_family]
        text = self.config.text_config
        check_full_attention(text, mixers=[m.layer_type for m in family.mixers], partial_rotary=family.partial_rotary)
        if getattr(text, "use_sliding_window", False):
            raise ValueError("the language model has ['sliding_window'] layers; VTU attention covers full (causal) "
                             "attention only")
        encoder, select_strategy = self._dymu_tower(family)
        # Not a submodule (the tower is registered once, where the checkpoint's weights load into it).
        object.__setattr__(self, "_dymu_patch", Patch(encoder, True, self.dymu.backend, select_strategy, family))
        install_vtu_hooks(self.language_model.model.layers, self._dymu_holder, family.mixers,
                          getattr(self, "packed_modules_mapping", {}))

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        if self.dymu is not None:  # the tower's GEMMs as vLLM's own layers run theirs (see .cpu_gemm)
            use_vllm_cpu_gemm(getattr(self, self.dymu_tower_attr))
        return loaded

    def _transformers_tower(self, family):
        """transformers' own tower class (``dymu_tower``) built from the
        checkpoint's vision config, refusing a config of another kind."""
        import importlib

        module, _, name = self.dymu_tower.rpartition(".")
        tower_cls = getattr(importlib.import_module(module or "transformers"), name)
        vision_config = self.config.vision_config
        if not isinstance(vision_config, tower_cls.config_class):
            raise ValueError(f"DyMU serves {family.class_name} with a {tower_cls.config_class.__name__} tower; "
                             f"this checkpoint's is {type(vision_config).__name__}")
        return tower_cls(vision_config).eval()

    def _dymu_tower(self, family):
        """Put the DToMe tower in place of vLLM's; ``(encoder, select strategy)``.
        A LLaVA-type tower: transformers' CLIP / SigLIP under ``vision_tower``."""
        tower = self._transformers_tower(family)
        # Checkpoints name the tower's weights vision_tower.vision_model.*; transformers 5
        # keeps the blocks at the model's top level, so hold it under that name.
        self.vision_tower = torch.nn.Module()
        self.vision_tower.vision_model = getattr(tower, "vision_model", tower)
        s = self.dymu
        return family.encoder(self.config, tower, s.thresholds, s.r, s.backend, names=model_names(self.config))

    def _dymu_encode(self, modality: str, pixels: torch.Tensor, vision_kwargs: Dict) -> List[torch.Tensor]:
        """Items of one modality -> tagged encoder outputs, one ``[P_i, C + tags]`` per item."""
        patch = self._dymu_patch
        mod = {m.name: m for m in patch.family.modalities}[modality]
        projector = getattr(self, "multi_modal_projector", None)  # LLaVA-type: the tower runs in its dtype
        dtype = next((projector or self).parameters()).dtype
        # An item whose tower output is not finite (fp16 overflow) merges nothing instead of raising in the
        # engine step, which would stop it for every request; the processors refuse non-finite pixels earlier.
        with unmerged_if_nonfinite() as unmerged_rows:
            out = mod.encode(self, patch, pixels, dtype, vision_kwargs)
        if unmerged_rows():
            logger.warning("DyMU: %d image / frame rows had a non-finite tower output in a block and merged "
                           "nothing there (their features are what the stock tower gives)", unmerged_rows())
        rows = out.rows()  # per item, each placeholder's unique token: [P_i, C]
        if out.items.extra is not None:  # per-row language-model inputs beside the features (Qwen3-VL: deepstack
            # taps): vLLM's layout, [features | extra] per placeholder, split again in its embed_input_ids
            rows = [torch.cat([r, e], -1) for r, e in zip(rows, out.rows(out.items.extra))]
        tower = patch.counts[modality]
        st = self._dymu_encoded
        st.nonfinite_rows += unmerged_rows()
        st.items_encoded += len(rows)
        st.tower_tokens += tower.total_patches()
        st.tower_tokens_kept += int(tower.kept.sum())
        st.placeholders += sum(r.shape[0] for r in rows)
        st.unique_rows += int(out.items.counts.sum())
        st.tokens_per_block = torch.stack(tower.per_layer, dim=1).tolist()
        return _rank0_items([tag_item(r, out.items.slots[i, :r.shape[0]]) for i, r in enumerate(rows)], st)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        if self.dymu is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        self._dymu_counted = _UNMERGED  # a real step (vLLM's warm-up forwards embed nothing): counted
        self.dymu_stats.add_tower(self._dymu_encoded)
        self._dymu_encoded = ServingStats()
        if not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        embeds, ids = untag_pieces(multimodal_embeddings)
        step = step_groups(is_multimodal.to(input_ids.device), ids)
        if step.num_unique < step.num_tokens:
            self._dymu_counted = step
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal, **kwargs)

    def __call__(self, input_ids=None, positions=None, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        """The step's decision, made eagerly before the model's call: the
        groups ``embed_input_ids`` kept serve this one forward (counted in
        :class:`ServingStats`); a merged step runs :meth:`forward` eagerly
        (``_uncompiled``), any other the class's call as vLLM makes it —
        compiled where the engine compiles, also where vLLM compiles this
        whole class (Qwen3.5), whose traced ``forward`` then only ever sees
        ``_dymu_run`` None."""
        args = (input_ids, positions, intermediate_tensors, inputs_embeds)
        if self.dymu is None or torch.compiler.is_compiling():
            return super().__call__(*args, **kwargs)
        step: Optional[StepGroups] = self._dymu_counted
        self._dymu_counted = None  # one step's groups serve one forward
        if step is None and self._dymu_encoded.items_encoded:  # nothing embedded before it: a warm-up run,
            self._dymu_encoded = ServingStats()  # whose encoded items were vLLM's dummies
        if step is None or inputs_embeds is None or intermediate_tensors is not None:
            return super().__call__(*args, **kwargs)
        n = inputs_embeds.shape[0]
        st = self.dymu_stats
        st.steps += 1
        st.llm_positions += n
        st.max_step_positions = max(st.max_step_positions, n)
        if step is _UNMERGED:
            st.llm_rows += n
            return super().__call__(*args, **kwargs)
        step = step.pad_to(n)
        st.llm_rows += step.num_unique
        self._dymu_run = step
        try:
            with _uncompiled():
                return super().__call__(*args, **kwargs)
        finally:
            self._dymu_run = None

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        step: Optional[StepGroups] = self._dymu_run
        if step is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        n = inputs_embeds.shape[0]
        with self._dymu_holder.running(step):
            extra = self._dymu_lm_inputs(step, n)
            hidden = self.language_model.model(None, positions, None, inputs_embeds=step.compact(inputs_embeds),
                                               **extra)
            self._dymu_lm_inputs_done(n)
        return step.expand(hidden)

    def _dymu_lm_inputs(self, step: StepGroups, num_tokens: int) -> Dict:
        """Keyword arguments beyond the embeddings for the language model's
        call on a merged step's ``step.num_unique`` rows (the class's own
        forward passes them for its ``num_tokens`` positions): none by default;
        Qwen3-VL's deepstack rows (:mod:`.qwen`)."""
        return {}

    def _dymu_lm_inputs_done(self, num_tokens: int) -> None:
        """After a merged step's language-model call: what the class's own
        forward does after its call (Qwen3-VL: clear the deepstack buffers)."""


def _rank0_items(tagged: List[torch.Tensor], stats: ServingStats) -> List[torch.Tensor]:
    """Every tensor-parallel rank serves rank 0's encoded items (rows and
    merge maps), broadcast over vLLM's TP group; the items as they are on one rank.

    Each rank runs the whole DToMe tower (it is transformers' tower, not
    vLLM's sharded one) and decides merges on its own: a rank whose tower
    differs in the last bits (thread counts, instruction sets) can merge
    otherwise at a threshold, and ranks running different rows would hang in,
    or sum garbage through, the language model's all-reduces. Items whose maps
    this rank decided otherwise are counted (``tp_disagreements``). The item
    sizes (placeholders) are vLLM's, equal on every rank: one broadcast."""
    from vllm.distributed import get_tp_group

    group = get_tp_group()
    if group.world_size == 1 or not tagged:
        return tagged
    local = torch.cat(tagged)
    shared = group.broadcast(local.clone(), src=0)
    if group.rank_in_group != 0:
        lengths = [t.shape[0] for t in tagged]
        differs = (shared[:, -TAG_COLUMNS:] != local[:, -TAG_COLUMNS:]).any(-1)
        stats.tp_disagreements += int(torch.stack([d.any() for d in differs.split(lengths)]).sum())  # one host read
    return list(shared.split([t.shape[0] for t in tagged]))


@contextmanager
def _uncompiled():
    """A merged step runs the language model's own forward, eagerly, under a
    compiled engine too: the compiled graph was traced with the VTU hooks
    idle (no step held), so it serves exactly the steps where nothing merged
    — decode steps and text-only prefill. vLLM's forward-context flag for
    this (``skip_compiled``, set by its runner for encoder inputs of
    encoder-decoder models) makes the compiled model call its forward."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        yield
        return
    ctx = get_forward_context()
    before = ctx.skip_compiled
    ctx.skip_compiled = True
    try:
        yield
    finally:
        ctx.skip_compiled = before
