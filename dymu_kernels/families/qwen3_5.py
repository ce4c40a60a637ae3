"""Qwen3.5 (``model_type`` ``qwen3_5``): Qwen3-VL's tower without deepstack
in front of a **hybrid** language model — three of every four layers Gated
DeltaNet linear attention, the fourth gated full attention with partial
rotary.

The tower, its DToMe stages and the positions are Qwen3-VL's
(:mod:`.qwen3_vl`: 2×2 units inside the tower and/or rounds after the
merger, interleaved M-RoPE, videos as timestamped frames). The language
model runs on the unique rows like every family's; what differs:

- **Gated DeltaNet** layers (``linear_attention``) run under VTU as the
  :class:`~.spec.SequenceMixer` :data:`GATED_DELTANET` states: ``in_proj_qkv``,
  ``in_proj_z`` (the output gate), ``in_proj_b`` (β) and ``in_proj_a`` (the
  decay) on the unique rows, gathered to every virtual position; the causal
  conv1d and the delta rule over the whole virtual sequence (the layer's conv
  and recurrent states are the virtual sequence's); the gated RMSNorm at
  every position with its group's ``z``; the **average per group after the
  gated norm**, then ``out_proj`` on the unique rows. Each step is the stock
  layer's own code.
- **Gated full attention** (``full_attention``): VTU attention with
  ``rotary_dim`` (RoPE on the first quarter of each head,
  ``partial_rotary_factor`` 0.25); q/k norms are per row and the output gate
  ``sigmoid(gate)`` per token, equal within a group, so it applies to the
  re-merged output unchanged.

Nothing merged is the unpatched model.
"""

from __future__ import annotations

from dataclasses import replace

from .qwen3_vl import FAMILY as QWEN3_VL
from .spec import SequenceMixer

GATED_DELTANET = SequenceMixer(layer_type="linear_attention", attr="linear_attn",
                               inputs=("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"), output="out_proj")

FAMILY = replace(QWEN3_VL, model_type="qwen3_5", class_name="Qwen3_5ForConditionalGeneration", lm_inputs=None,
                 feature_output=None, mixers=(GATED_DELTANET,), partial_rotary=True)
