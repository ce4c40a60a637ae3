"""LLaVA-1.5 served by vLLM with DyMU.

:class:`DyMULlavaForConditionalGeneration` is vLLM's own LLaVA class (its
processor, weight names and language model) with three methods changed when
the config asks for DyMU:

- ``embed_multimodal``: the vision tower is transformers' ``CLIPVisionModel``
  over the checkpoint's tower weights, run by the package's DToMe encoder
  (:class:`~dymu_kernels.integrations.clip.DToMeCLIPVisionEncoder`, the same
  object :func:`~dymu_kernels.integrations.apply_dymu` builds); its unique
  tokens are projected, copied to the image's placeholders and tagged with the
  merge map (:func:`~dymu_kernels.vllm.groups.tag_item`).
- ``embed_input_ids``: strips the tags of the pieces vLLM scheduled and keeps
  the step's groups.
- ``forward``: runs the language model on the unique rows with VTU decoder
  layers (:mod:`dymu_kernels.vllm.layers`) and hands vLLM one row per position.

Without a ``dymu`` config entry every method is vLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from ..integrations.llava import _families, tower_encoder, tower_tokens
from .engine_checks import unsupported_settings
from .groups import step_groups, tag_item, untag_pieces
from .layers import install_vtu_layers
from .settings import settings_from_config


@dataclass
class ServingStats:
    """What DyMU saved since the engine started (per worker)."""

    images_encoded: int = 0  # vision-tower runs (vLLM encodes an image once while its cache holds it)
    vision_tokens: int = 0  # placeholders of the images encoded (what the language model sees without DyMU)
    vision_tokens_kept: int = 0  # unique image tokens after DToMe
    llm_positions: int = 0  # positions run through the language model (attention + KV cache: all of them)
    llm_rows: int = 0  # rows its token-wise work (norms, projections, MLP) ran on
    steps: int = 0  # language-model forwards
    max_step_positions: int = 0  # the most positions one forward ran (chunked prefill keeps it <= its budget)
    tokens_per_block: List[List[int]] = field(default_factory=list)  # last batch: per image, tokens after each block

    def as_dict(self) -> Dict[str, object]:
        d = dict(self.__dict__)
        d["llm_tokenwise_fraction"] = self.llm_rows / self.llm_positions if self.llm_positions else 1.0
        d["vision_kept_fraction"] = self.vision_tokens_kept / self.vision_tokens if self.vision_tokens else 1.0
        return d


_UNMERGED = object()  # a step whose tokens are all distinct rows


class DyMULlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with DyMU when ``config.dymu`` asks for it (see module doc)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.dymu = settings_from_config(self.config)
        self.dymu_stats = ServingStats()
        self._dymu_step = None
        if self.dymu is None:
            return
        reasons = unsupported_settings(vllm_config)  # the config hook refuses first; this guards direct builds
        if reasons:
            raise ValueError("DyMU cannot serve with these engine settings; pass " + "; ".join(reasons))
        import transformers

        vision_config = self.config.vision_config
        if not isinstance(vision_config, transformers.CLIPVisionConfig):
            raise ValueError(f"DyMU serves LLaVA with a CLIP vision tower; this one is {type(vision_config).__name__}")
        tower = transformers.CLIPVisionModel(vision_config).eval()
        # Checkpoints name the tower's weights vision_tower.vision_model.*; transformers 5
        # keeps the blocks at the model's top level, so hold it under that name.
        self.vision_tower = torch.nn.Module()
        self.vision_tower.vision_model = getattr(tower, "vision_model", tower)
        s = self.dymu
        encoder = tower_encoder(_families()["llava"], self.config, tower, s.thresholds, s.r, s.backend)
        object.__setattr__(self, "_dymu_encoder", encoder)  # not a submodule: the tower is registered once
        install_vtu_layers(self.language_model.model.layers)

    def embed_multimodal(self, **kwargs):
        if self.dymu is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError("DyMU merges inside the vision tower: precomputed image embeddings cannot be merged; "
                             "send pixels, or serve without the 'dymu' config entry")
        pixels = image_input["pixel_values"]
        if isinstance(pixels, (list, tuple)):
            pixels = torch.stack(list(pixels))
        proj = self.multi_modal_projector
        dtype = next(proj.parameters()).dtype
        feats, counts, slots, per_block = tower_tokens(self._dymu_encoder, self.config.vision_feature_select_strategy,
                                                       pixels.to(dtype))
        rows = proj(feats)
        kept = counts.tolist()
        st = self.dymu_stats
        st.images_encoded += len(kept)
        st.vision_tokens += slots.shape[0] * slots.shape[1]
        st.vision_tokens_kept += sum(kept)
        st.tokens_per_block = torch.stack(per_block, dim=1).tolist()
        return [tag_item(rows[i, :n], slots[i]) for i, n in enumerate(kept)]

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kwargs):
        if self.dymu is None:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        self._dymu_step = _UNMERGED  # a real step (vLLM's warm-up forwards embed nothing): counted
        if not multimodal_embeddings:
            return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)
        embeds, ids = untag_pieces(multimodal_embeddings)
        step = step_groups(is_multimodal.to(input_ids.device), ids)
        if step.num_unique < step.num_tokens:
            self._dymu_step = step
        return super().embed_input_ids(input_ids, embeds, is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        step = self._dymu_step
        self._dymu_step = None  # one step's groups serve one forward
        if step is None or inputs_embeds is None or intermediate_tensors is not None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        n = inputs_embeds.shape[0]
        st = self.dymu_stats
        st.steps += 1
        st.llm_positions += n
        st.max_step_positions = max(st.max_step_positions, n)
        if step is _UNMERGED:
            st.llm_rows += n
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        step = step.pad_to(n)
        st.llm_rows += step.num_unique
        hidden = self.language_model.model(None, positions, None, inputs_embeds=step.compact(inputs_embeds),
                                           dymu_step=step)
        return step.expand(hidden)
