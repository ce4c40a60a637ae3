"""The tower step of the LLaVA-type families (LLaVA-1.5, LLaVA-OneVision):
a CLIP / SigLIP tower with DToMe up to the block ``vision_feature_layer``
selects, then the projector on the merged tokens only. Shared by
``apply_dymu`` and the vLLM plugin."""

from __future__ import annotations

from typing import Union

from ..core.encoder import DToMeVisionEncoder, _vision_parts
from ..core.thresholds import thresholds_argument
from .spec import Family, ItemCounts, Patch


def _vision_blocks(config, tower) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"DyMU needs a single vision_feature_layer, got {layer!r}: merged tokens differ between layers")
    n = len(_vision_parts(tower).encoder.layers)
    blocks = n + 1 + layer if layer < 0 else layer
    if not 1 <= blocks <= n:
        raise ValueError(f"vision_feature_layer={layer} selects no encoder block of {n}")
    return blocks


def tower_encoder(family: Family, config, tower, thresholds="default", r=None, backend: str = "auto",
                  trim: Union[str, bool] = "auto") -> DToMeVisionEncoder:
    """The DToMe encoder over a model's transformers vision ``tower``, with
    ``thresholds`` resolved as :func:`apply_dymu` documents (``"default"``:
    the family's preset) for the blocks ``config.vision_feature_layer``
    reads; checks the feature-select strategy. What :func:`apply_dymu` and
    the vLLM plugin (:mod:`dymu_kernels.vllm`) both build."""
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    blocks = _vision_blocks(config, tower)
    if r is not None:
        thresholds = None
    else:
        if isinstance(thresholds, str) and thresholds == "default":
            if family.default_thresholds is None:
                raise ValueError(
                    f"no published thresholds for {family.class_name}'s vision tower: pass thresholds calibrated on "
                    "your images (python3 -m dymu_kernels.calibrate --model ID --images DIR --r N --out t.json, then "
                    "apply_dymu(model, 't.json')) or r=N"
                )
            thresholds = family.default_thresholds
        thresholds = thresholds_argument(thresholds, blocks)
    encoder = DToMeVisionEncoder(tower, thresholds, r=r, num_layers=blocks, backend=backend, trim=trim)
    if strategy == "default" and not encoder.cls_token:
        raise ValueError("vision_feature_select_strategy='default' drops a CLS token this vision tower does not have")
    return encoder


def clip_like_encoder(family, inner, thresholds, r, backend, trim):
    """``Family.build_encoder`` of the LLaVA-type families: the DToMe tower
    and the feature-select strategy the projector's input follows."""
    encoder = tower_encoder(family, inner.config, inner.vision_tower, thresholds, r, backend, trim)
    return encoder, inner.config.vision_feature_select_strategy


def merged_tower(self, patch: Patch, pixel_values, dtype, modality: str = "image", vision_kwargs=None):
    """The tower's merged tokens of a batch of images (crops, frames), projected:
    ``(features [n, U_cap, C], counts [n], slots [n, P], tower)``, minus CLS for
    ``"default"``; their counts become ``dymu_stats(model, modality)``.
    ``tower``: the tower's ``last_hidden_state`` / ``hidden_states`` at every
    token, in transformers' shapes (:func:`dymu_kernels.hf.outputs.tower_outputs`) —
    by default only the block ``vision_feature_layer`` selects, as
    transformers returns them; all with ``output_hidden_states=True``."""
    from ..hf.outputs import tower_outputs

    wanted = (vision_kwargs or {}).get("output_hidden_states")
    if wanted is None or wanted is False:
        wanted = patch.encoder.num_layers
    out = patch.encoder(pixel_values.to(dtype), output_hidden_states=wanted)
    feats, counts, slots = tower_tokens(out, patch.select_strategy)
    patch.counts[modality] = ItemCounts(counts, out.tokens_per_layer, slots.shape[1])
    return self.multi_modal_projector(feats), counts, slots, tower_outputs(patch.encoder, out)


def tower_tokens(out, select_strategy: str):
    """The merged tower tokens the projector reads from an encoder output:
    ``(features [n, U_cap, C_vis], counts [n], slots [n, P])`` — minus CLS for
    ``"default"``; ``slots`` maps each of the ``P`` placeholders to its unique token."""
    if select_strategy == "default":  # drop CLS (always slot 0: it never merges)
        return out.features[:, 1:], out.lengths.long() - 1, out.pos_map[:, 1:].long() - 1
    return out.features, out.lengths.long(), out.pos_map.long()
