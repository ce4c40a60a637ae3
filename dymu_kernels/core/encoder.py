"""The DToMe encoder driver: merging in every block of a pre-norm ViT.

:class:`DToMeVisionEncoder` wraps an existing vision tower *without
modifying it* — transformers' ``CLIPVisionModel`` (LLaVA-1.5) and
``SiglipVisionModel`` (LLaVA-OneVision), and anything with their block
protocol (no transformers import here):

- ``embeddings(pixel_values) -> [B, N0, C]`` (CLIP: ``class_embedding``
  marks a CLS token at slot 0), an optional ``pre_layrnorm``, an optional
  ``post_layernorm`` (SigLIP's applies to ``last_hidden_state``);
- ``encoder.layers``, each with ``layer_norm1``, ``self_attn`` (``q_proj``,
  ``k_proj``, ``v_proj``, ``out_proj``, ``num_heads``, ``head_dim``),
  ``layer_norm2`` and ``mlp``.

It reuses the model's own embedding, layer norms, projections and MLPs, and
runs each encoder block as

    x = x + out_proj(proportional_attention(q, k, v, size))   # +log(size) per key
    state = dtome_merge(state, keys=k, threshold_i)             # merge A -> B
    x = x + mlp(layer_norm2(x))

on the batched merge state (docs/design.md §2). CLIP has a CLS token at slot
0, which never merges; SigLIP has none (no pre-layernorm either), so its
unmerged tokens follow the official order rule (b) (docs/design.md §1.1).
Features are taken before any post-layernorm, as ``hidden_states[k]`` are.
The only host syncs are the
optional trims of the padded capacity (one per block, see ``trim``); with
``trim=False`` — the default on CUDA — nothing synchronises, so a GPU forward
can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from torch import nn

from ..ops.dtome import dtome_merge
from ..reference.attention import proportional_attention
from .thresholds import Stage, Thresholds, stage_r, stage_thresholds
from ..reference.dtome import MergeState, init_merge_state, policy_merge, trim_state


@dataclass
class DToMeVisionOutput:
    """Merged features and the merge state after the last block run."""

    features: torch.Tensor  # [B, N_cap, C]; slots >= lengths are padding; CLS (CLIP) at slot 0
    size: torch.Tensor  # [B, N_cap] original patches per token (0 = empty)
    lengths: torch.Tensor  # [B] tokens kept per image
    pos_map: torch.Tensor  # [B, N0] original token -> slot in features
    tokens_per_layer: List[torch.Tensor]  # one [B] tensor per block run
    # Only when ``forward(output_hidden_states=...)`` asks: transformers' ``hidden_states``
    # of the tower (entry 0 the embeddings, entry i block i's output), each
    # [B, N0, C] with every original token carrying its merged token; None
    # where not selected.
    hidden_states: Optional[Tuple[Optional[torch.Tensor], ...]] = None


def check_trim(trim: Union[str, bool]) -> Union[str, bool]:
    """``trim`` as a DToMe tower takes it: ``"auto"``, True or False (else ValueError)."""
    if not (isinstance(trim, bool) or trim == "auto"):
        raise ValueError(f"trim must be 'auto', True or False, got {trim!r}")
    return trim


def trims_on(trim: Union[str, bool], device: torch.device) -> bool:
    """Whether a merged forward on ``device`` trims the padded capacity after
    each merge (``trim``: see :class:`DToMeVisionEncoder`). ``"auto"`` never
    trims under ``torch.compile`` either: each trim reads a length back, which
    would split the compiled graph once per block."""
    if trim == "auto":
        return device.type != "cuda" and not torch.compiler.is_compiling()
    return trim


def unmerge_tokens(x: torch.Tensor, pos_map: torch.Tensor) -> torch.Tensor:
    """``[B, N_cap, C]`` merged tokens -> ``[B, N0, C]``: each original token's merged token."""
    return x.gather(1, pos_map.long()[..., None].expand(-1, -1, x.shape[-1]))


def _vision_parts(model: nn.Module):
    """The embeddings / encoder layers (and CLIP's pre-norm) of a CLIP or SigLIP
    vision model (with or without the ``vision_model`` wrapper)."""
    inner = getattr(model, "vision_model", model)
    missing = [n for n in ("embeddings", "encoder") if not hasattr(inner, n)]
    if missing or not hasattr(inner.encoder, "layers"):
        raise TypeError(
            f"expected a transformers CLIPVisionModel or SiglipVisionModel (or its vision_model), got "
            f"{type(model).__name__} without {missing or ['encoder.layers']}"
        )
    return inner


class DToMeVisionEncoder(nn.Module):
    """A CLIP / SigLIP-like vision tower (module doc) with DToMe merging in every block.

    Args:
        vision_model: a ``transformers`` ``CLIPVisionModel`` (shared, not copied).
        thresholds: per-block thresholds (list, :class:`Thresholds`, or a path
            to a threshold JSON file); a block merges A tokens scoring above it.
        r: instead of thresholds, merge exactly ``r`` (int, or one per block)
            tokens per image and block — the ToMe baseline.
        num_layers: blocks to run (LLaVA reads block 23 of 24: pass 23);
            default all.
        backend: ``"auto" | "triton" | "cpp" | "torch"`` for the merge.
        trim: ``"auto"`` (default) ``| True | False``. Trimming shrinks the
            padded capacity to the longest image after each block, reading
            ``lengths`` (one host sync per block), so later blocks run on
            fewer slots. The result is the same either way (up to float
            rounding of the shorter matmuls): same ``lengths``, ``pos_map``,
            ``size`` and features on valid slots; only the capacity — the
            second dimension of ``features`` and ``size`` — differs.

            - On the CPU trimming is exact and cheap (the "sync" is a read of
              memory already there) and saves compute in proportion to the
              tokens dropped: ``"auto"`` trims.
            - On CUDA it is one host sync per block against running every
              block at the padded capacity. Which is faster must be settled by
              measurement on a GPU (none was available when this was
              written); until then ``"auto"`` keeps the full capacity there,
              so the forward stays sync-free and can be captured in a CUDA
              graph. ``True`` forces trimming on any device; ``False`` never
              trims (what CUDA-graph capture needs).

    Neither thresholds nor r: no merging (but proportional attention still on).

    Raises:
        ValueError for a bad ``trim``, thresholds/r or num_layers; TypeError
        for a model that is not a CLIP vision model.
    """

    def __init__(
        self,
        vision_model: nn.Module,
        thresholds: Union[None, Sequence[float], Thresholds, str, os.PathLike] = None,
        *,
        r: Union[None, int, Sequence[int]] = None,
        num_layers: Optional[int] = None,
        backend: str = "auto",
        trim: Union[str, bool] = "auto",
    ):
        super().__init__()
        self.vision = _vision_parts(vision_model)
        # CLIP prepends a class token (slot 0, never merged); SigLIP has none.
        self.cls_token = hasattr(self.vision.embeddings, "class_embedding")
        # transformers normalises SigLIP's last_hidden_state with post_layernorm;
        # CLIP's post_layernorm touches only its pooled CLS token.
        self._last_norm = getattr(self.vision, "post_layernorm", None) if "Siglip" in type(self.vision).__name__ else None
        n_total = len(self.vision.encoder.layers)
        self.num_layers = n_total if num_layers is None else int(num_layers)
        if not 1 <= self.num_layers <= n_total:
            raise ValueError(f"num_layers must be in [1, {n_total}], got {num_layers}")
        if thresholds is not None and r is not None:
            raise ValueError("give thresholds (DyMU) or r (ToMe), not both")
        stage = Stage("vit", "encoder block", self.num_layers, whole=n_total, fixed_r=True)
        self.thresholds = stage_thresholds(thresholds, stage)
        self.r = stage_r(r, stage)
        self.backend = backend
        self.trim = check_trim(trim)

    def trims_on(self, device: torch.device) -> bool:
        return trims_on(self.trim, device)

    def _block(self, layer: nn.Module, state: MergeState, i: int, policy=None, merge: bool = True) -> MergeState:
        attn = layer.self_attn
        x = state.x
        B, N, C = x.shape
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).view(B, N, attn.num_heads, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        o = proportional_attention(q, k, v, state.size, scale=attn.scale)
        x = x + attn.out_proj(o.transpose(1, 2).reshape(B, N, C))
        state = state._replace(x=x)
        cls = self.cls_token
        if not merge:  # a tower block after the merging ones (hidden states on request): no merge
            pass
        elif policy is not None:  # calibration: the policy chooses the merges (reference ops; not a hot path)
            state = policy_merge(state, k, policy, i, cls_token=cls)
        elif self.thresholds is not None:
            state = dtome_merge(*state, k, self.thresholds[i], cls_token=cls, backend=self.backend)
        elif self.r is not None:
            state = dtome_merge(*state, k, r=self.r[i], cls_token=cls, backend=self.backend)
        return state._replace(x=state.x + layer.mlp(layer.layer_norm2(state.x)))

    def _hidden_state_selection(self, output_hidden_states) -> Optional[List[int]]:
        """The tower's hidden-state entries (0 .. all blocks) a request selects, as transformers reads
        ``output_hidden_states``: a flag (True: every entry), or an int / ints (negative from the end)."""
        if output_hidden_states is None or output_hidden_states is False:
            return None
        n = len(self.vision.encoder.layers) + 1
        if output_hidden_states is True:
            return list(range(n))
        wanted = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
        for k in wanted:
            if isinstance(k, bool) or not isinstance(k, int) or not -n <= k < n:
                raise ValueError(
                    f"output_hidden_states must be True/False or entry indices in [-{n}, {n}) of the tower's {n} "
                    f"hidden states (embeddings, then {n - 1} blocks), got {output_hidden_states!r}"
                )
        return sorted({k % n for k in wanted})

    def last_hidden_state(self, out: DToMeVisionOutput) -> torch.Tensor:
        """transformers' ``last_hidden_state`` of this tower run to ``num_layers``
        blocks (the tower DyMU runs ends at the block LLaVA's
        ``vision_feature_layer`` selects): ``[B, N0, C]``, every original token
        carrying its merged token's output of that block — for SigLIP after
        ``post_layernorm``, as transformers returns it."""
        x = out.features if self._last_norm is None else self._last_norm(out.features)
        return unmerge_tokens(x, out.pos_map)

    def forward(self, pixel_values: torch.Tensor, policy=None, *, output_hidden_states=None) -> DToMeVisionOutput:
        """Encode ``pixel_values [B, 3, H, W]`` (as the CLIP processor makes them).

        ``features``/``size`` have ``N_cap`` slots: all ``N0`` without
        trimming, the longest image's length (>= 1) with it.

        ``policy``: an object whose ``select(block, node_max)`` returns the
        merge mask of each block, used instead of the thresholds / r — what
        :func:`dymu_kernels.calibrate_thresholds` passes, so
        ``calibrate_thresholds(DToMeVisionEncoder(tower, num_layers=23), batches, r=21, num_layers=23)``
        calibrates a real CLIP tower.

        ``output_hidden_states``: None / False (default: nothing recorded,
        nothing extra computed), True (all ``L + 1`` entries of the whole
        tower), or an int / ints selecting entries (negative from the end), as
        transformers takes it. The output's ``hidden_states`` then has ``L + 1``
        entries, None where not selected; entry ``i`` is block ``i``'s output
        (0: the embeddings) at every original token, each carrying its merged
        token. Entries past ``num_layers`` run the remaining tower blocks on the
        merged tokens without merging (only when selected); the merge state
        returned is always that after ``num_layers`` blocks.
        """
        selected = self._hidden_state_selection(output_hidden_states)
        x = self.vision.embeddings(pixel_values)
        if hasattr(self.vision, "pre_layrnorm"):  # CLIP only
            x = self.vision.pre_layrnorm(x)
        state = init_merge_state(x)
        hidden = None if selected is None else [None] * (len(self.vision.encoder.layers) + 1)

        def record(k, s):
            if hidden is not None and k in selected:
                hidden[k] = unmerge_tokens(s.x, s.pos_map)

        record(0, state)
        trim = self.trims_on(x.device)
        counts = []
        for i, layer in enumerate(self.vision.encoder.layers[: self.num_layers]):
            if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
                # transformers' gradient_checkpointing_enable() marks the CLIP layers;
                # recompute this block (merge included: it is deterministic) in backward.
                # The state's tensors go in as arguments (reentrant checkpointing only tracks those).
                ckpt = getattr(layer, "_gradient_checkpointing_func", None) or functools.partial(
                    torch.utils.checkpoint.checkpoint, use_reentrant=False)
                block = lambda *t, layer=layer, i=i: tuple(self._block(layer, MergeState(*t), i, policy))  # noqa: E731
                state = MergeState(*ckpt(block, *state))
            else:
                state = self._block(layer, state, i, policy)
            if trim:
                state = trim_state(state)
            counts.append(state.lengths)
            record(i + 1, state)
        out = DToMeVisionOutput(state.x, state.size, state.lengths, state.pos_map, counts)
        if hidden is not None:
            tail = state
            for i in range(self.num_layers, max(selected, default=0)):  # blocks after the merging ones, only when asked
                tail = self._block(self.vision.encoder.layers[i], tail, i, merge=False)
                record(i + 1, tail)
            out.hidden_states = tuple(hidden)
        return out
