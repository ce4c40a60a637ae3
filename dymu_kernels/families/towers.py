"""The tower step of the LLaVA-type families (LLaVA-1.5, LLaVA-OneVision):
a CLIP / SigLIP tower with DToMe up to the block ``vision_feature_layer``
selects, then the projector on the merged tokens only. Shared by
``apply_dymu`` and the vLLM plugin."""

from __future__ import annotations

from typing import Tuple, Union

from ..core.encoder import DToMeVisionEncoder, _vision_parts
from ..core.thresholds import MergeArguments, Stage
from .spec import ItemCounts, Patch


def _vision_blocks(config, tower) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"DyMU needs a single vision_feature_layer, got {layer!r}: merged tokens differ between layers")
    n = len(_vision_parts(tower).encoder.layers)
    blocks = n + 1 + layer if layer < 0 else layer
    if not 1 <= blocks <= n:
        raise ValueError(f"vision_feature_layer={layer} selects no encoder block of {n}")
    return blocks


def clip_like_stages(config, tower) -> Tuple[Stage, ...]:
    """``Family.stages`` of the LLaVA-type families: one threshold per block
    the model reads (``vision_feature_layer``); thresholds for the whole
    tower are accepted too (the published CLIP-L ones: 24 for LLaVA's 23)."""
    blocks = _vision_blocks(config, tower)
    total = len(_vision_parts(tower).encoder.layers)
    return (Stage("vit", "encoder block", blocks, whole=total, fixed_r=True),)


def clip_like_encoder(config, tower, merge: MergeArguments, backend: str, trim: Union[str, bool]):
    """``Family.build_encoder`` of the LLaVA-type families: the DToMe encoder
    over the model's transformers vision ``tower`` for the blocks
    ``config.vision_feature_layer`` reads, and the feature-select strategy
    the projector's input follows (checked)."""
    strategy = config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"unsupported vision_feature_select_strategy {strategy!r}")
    blocks = _vision_blocks(config, tower)
    encoder = DToMeVisionEncoder(tower, merge.thresholds["vit"], r=merge.r, num_layers=blocks, backend=backend,
                                 trim=trim)
    if strategy == "default" and not encoder.cls_token:
        raise ValueError("vision_feature_select_strategy='default' drops a CLS token this vision tower does not have")
    return encoder, strategy


def check_per_call(config, patch: Patch, vision_kwargs) -> None:
    """A per-call ``vision_feature_layer`` / ``vision_feature_select_strategy``
    (transformers honours them per call) must be what the DToMe tower was
    built for: its merges are made up to that block; ValueError naming the
    argument otherwise (re-apply DyMU after changing the config instead)."""
    layer = vision_kwargs.get("vision_feature_layer")
    if layer is not None:
        blocks = None
        if isinstance(layer, int) and not isinstance(layer, bool):
            n = len(patch.encoder.vision.encoder.layers)
            blocks = n + 1 + layer if layer < 0 else layer
        if blocks != patch.encoder.num_layers:
            raise ValueError(
                f"vision_feature_layer={layer!r} per call: this DyMU-patched model merges up to the block "
                f"config.vision_feature_layer={config.vision_feature_layer!r} selects; set the config's and "
                f"apply_dymu again to read another block")
    strategy = vision_kwargs.get("vision_feature_select_strategy")
    if strategy is not None and strategy != patch.select_strategy:
        raise ValueError(
            f"vision_feature_select_strategy={strategy!r} per call: this DyMU-patched model was built for "
            f"config.vision_feature_select_strategy={patch.select_strategy!r}; set the config's and apply_dymu again")


def merged_tower(self, patch: Patch, pixel_values, dtype, modality: str = "image", vision_kwargs=None):
    """The tower's merged tokens of a batch of images (crops, frames), projected:
    ``(features [n, U_cap, C], counts [n], slots [n, P], tower)``, minus CLS for
    ``"default"``; their counts become ``dymu_stats(model, modality)``.
    ``tower``: the tower's ``last_hidden_state`` / ``hidden_states`` at every
    token, in transformers' shapes (:class:`~.spec.Encoded`'s fields) —
    by default only the block ``vision_feature_layer`` selects, as
    transformers returns them; all with ``output_hidden_states=True``."""
    check_per_call(self.config, patch, vision_kwargs or {})
    wanted = (vision_kwargs or {}).get("output_hidden_states")
    if wanted is None or wanted is False:
        wanted = patch.encoder.num_layers
    out = patch.encoder(pixel_values.to(dtype), output_hidden_states=wanted)
    feats, counts, slots = tower_tokens(out, patch.select_strategy)
    patch.counts[modality] = ItemCounts(counts, out.tokens_per_layer, slots.shape[1])
    tower = {"last_hidden_state": patch.encoder.last_hidden_state(out), "hidden_states": out.hidden_states}
    return self.multi_modal_projector(feats), counts, slots, tower


def tower_tokens(out, select_strategy: str):
    """The merged tower tokens the projector reads from an encoder output:
    ``(features [n, U_cap, C_vis], counts [n], slots [n, P])`` — minus CLS for
    ``"default"``; ``slots`` maps each of the ``P`` placeholders to its unique token."""
    if select_strategy == "default":  # drop CLS (always slot 0: it never merges)
        return out.features[:, 1:], out.lengths.long() - 1, out.pos_map[:, 1:].long() - 1
    return out.features, out.lengths.long(), out.pos_map.long()
