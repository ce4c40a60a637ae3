"""Whole-model FLOPs: stock LLaVA vs DyMU low / mid / high, per component.

    python3 benchmarks/flop_tables.py            # LLaVA-1.5-7B shape and the CPU benchmark's shape

Counted with ``FlopCounterMode`` on the meta device (no weights, nothing
runs) for one image and 66 text tokens (N = 642 positions), batch 1:

- **vision tower + projector.** Stock: the HF CLIP forward (all 24 blocks, as
  transformers runs them, although LLaVA reads block 23) and the projector on
  576 tokens. DyMU: the patch embedding, then the 23 blocks LLaVA reads, block i run at the tokens left
  after i blocks of fixed-r merging (``577 - r·i``; the block's attention,
  matching, merge and MLP), then the projector on the ``576 - 23·r`` image
  tokens left. DyMU's thresholds make the count image-dependent; fixed r gives
  the same average exactly (the paper's calibrated averages are 89 / 195 /
  394 tokens; fixed r = 21 / 16 / 8 keeps 93 / 208 / 392).
- **language model, prefill**: the decoder layers and final norm. Stock at
  N = 642 tokens; DyMU at ``66 + kept`` tokens with VTU attention over the
  642 virtual positions. Attention counts QKᵀ and AV (2 FLOPs per MAC), causal
  halved — the same formula for SDPA and VTU (``bench_e2e.flop_mapping``).

The FLOP ratio is the bound end-to-end prefill timings are compared with
(``bench_e2e.py`` counts the same way on real runs).

**Qwen2.5-VL-7B** (one 448 × 448 image: 1024 patches = 256 units / language-model
tokens, and 66 text tokens), DyMU inside the tower with fixed ``r`` units per
block: block i runs its norms, ``qkv``, ``proj`` and MLP on the ``256 - r·i``
unique units left (four patch rows each; the MLP after the block's merge), its
attention over all 1024 patches in the tower's own segments (16 windows of 64
patches, whole image in the full-attention blocks), the unit matching; the
merger runs on the units left; the language model as above.

**Qwen3-VL-8B** (one 448 × 448 image: 784 patches of 16 px = 196 units, and 66
text tokens): the same, without windows (every block attends over the whole
image), and each deepstack tap merger on the units left at its block.

Writes ``benchmarks/results/flops_model.jsonl`` and ``flops_model.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import SIZES, TEXT_AFTER, TEXT_BEFORE, flop_mapping, llava_config  # noqa: E402
from common import RESULTS_DIR, environment, write_rows  # noqa: E402

SETTINGS = {"low": 21, "mid": 16, "high": 8}  # fixed-r merges per block (docs/design.md §1.2)
QWEN_SETTINGS = {"low": 6, "mid": 4, "high": 2}  # units merged per block: 64 / 128 / 192 of 256 kept
QWEN_GRID = (1, 32, 32)  # a 448 x 448 image
QWEN_WIDTHS = {
    "7b": dict(name="Qwen2.5-VL-7B", vision=dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420,
                                                 out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31]),
               text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]})),
    "quick": dict(name="tiny Qwen2.5-VL", vision=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                                                      out_hidden_size=64, fullatt_block_indexes=[1, 3]),
                  text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=300,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [2, 3, 3]})),
}

# Qwen3-VL-8B: no windows, 16-px patches (a 448 x 448 image: 28 x 28 patches = 196 units), deepstack taps.
QWEN3_GRID = (1, 28, 28)
QWEN3_SETTINGS = {"low": 6, "mid": 4, "high": 2}  # units merged per block: 34 / 88 / 142 of 196 kept
QWEN3_WIDTHS = {
    "8b": dict(name="Qwen3-VL-8B", vision=dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304,
                                               out_hidden_size=4096, deepstack_visual_indexes=[8, 16, 24]),
               text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936,
                         rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                          "mrope_section": [24, 20, 20], "mrope_interleaved": True})),
    "quick3": dict(name="tiny Qwen3-VL", vision=dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48,
                                                     out_hidden_size=64, deepstack_visual_indexes=[0, 2]),
                   text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=300,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [2, 3, 3], "mrope_interleaved": True})),
}


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def meta_llava(size: str, lm_layers: int):
    import transformers

    with torch.device("meta"):
        return transformers.LlavaForConditionalGeneration._from_config(llava_config(size, lm_layers),
                                                                        attn_implementation="sdpa").eval()


def stock_flops(model) -> Dict[str, int]:
    cfg = model.config.vision_config
    pixels = torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta")
    patches = (cfg.image_size // cfg.patch_size) ** 2
    vision = _flops(lambda: model.model.vision_tower(pixels))
    projector = _flops(lambda: model.model.multi_modal_projector(torch.empty(1, patches, cfg.hidden_size, device="meta")))
    n = TEXT_BEFORE + TEXT_AFTER + patches
    return {"vision": vision + projector, "lm": _lm_flops(model, n, torch.arange(n, dtype=torch.int32)[None]),
            "image_tokens": patches, "lm_tokens": n}


def _lm_flops(model, n_compact: int, merge_map: torch.Tensor) -> int:
    """Decoder layers + norm on ``n_compact`` tokens, attention through VTU over the map's positions."""
    from dymu_kernels.hf.attention import VTUContext, install_vtu

    lm = model.model.language_model
    undo = []
    install_vtu(lm, undo)  # what apply_dymu does to the language model
    try:
        head_dim = lm.config.hidden_size // lm.config.num_attention_heads
        n = merge_map.shape[1]
        ctx = VTUContext(merge_map.to("meta"), torch.empty(1, n, head_dim, device="meta"),
                         torch.empty(1, n, head_dim, device="meta"), decode=False, backend="torch")
        x = torch.empty(1, n_compact, lm.config.hidden_size, device="meta")
        from transformers import DynamicCache

        # With a cache transformers skips its packed-sequence check, which reads values (none on meta).
        return _flops(lambda: lm(inputs_embeds=x, cache=DynamicCache(config=lm.config), use_cache=True, dymu_vtu=ctx))
    finally:
        for step in reversed(undo):
            step()


def _image_merge_map(positions: int, kept: int) -> torch.Tensor:
    """``[1, N]`` merge map of the prompt: text, then the image's ``positions``
    on ``kept`` unique tokens, then text, as the compact layout has it."""
    image = torch.arange(positions) * kept // positions + TEXT_BEFORE
    merge_map = torch.cat([torch.arange(TEXT_BEFORE), image, torch.arange(TEXT_AFTER) + TEXT_BEFORE + kept])
    return merge_map.to(torch.int32)[None]


def dymu_flops(model, r: int) -> Dict[str, int]:
    from dymu_kernels.core.encoder import DToMeVisionEncoder
    from dymu_kernels.reference.dtome import init_merge_state

    cfg = model.config.vision_config
    patches = (cfg.image_size // cfg.patch_size) ** 2
    blocks = cfg.num_hidden_layers - 1  # vision_feature_layer = -2
    encoder = DToMeVisionEncoder(model.model.vision_tower, r=r, num_layers=blocks, backend="torch", trim=False)
    pixels = torch.empty(1, 3, cfg.image_size, cfg.image_size, device="meta")
    vision = _flops(lambda: encoder.vision.embeddings(pixels))  # the patch embedding (a convolution)
    for i, layer in enumerate(encoder.vision.encoder.layers[:blocks]):
        state = init_merge_state(torch.empty(1, patches + 1 - r * i, cfg.hidden_size, device="meta"))
        vision += _flops(lambda: encoder._block(layer, state, i))
    kept = patches - blocks * r
    vision += _flops(lambda: model.model.multi_modal_projector(torch.empty(1, kept, cfg.hidden_size, device="meta")))
    text = TEXT_BEFORE + TEXT_AFTER
    return {"vision": vision, "lm": _lm_flops(model, text + kept, _image_merge_map(patches, kept)),
            "image_tokens": kept, "lm_tokens": text + kept}


def qwen_config(size: str):
    import transformers

    spec = QWEN_WIDTHS[size]
    vision = dict(spec["vision"], window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=dict(spec["text"]),
                                         image_token_id=spec["text"]["vocab_size"] - 1)


def meta_qwen(size: str):
    import transformers

    with torch.device("meta"):
        if size in QWEN3_WIDTHS:
            spec = QWEN3_WIDTHS[size]
            vision = dict(spec["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                          num_position_embeddings=2304)
            config = transformers.Qwen3VLConfig(vision_config=vision, text_config=dict(spec["text"]),
                                                image_token_id=spec["text"]["vocab_size"] - 1)
            return transformers.Qwen3VLForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
        return transformers.Qwen2_5_VLForConditionalGeneration._from_config(qwen_config(size),
                                                                            attn_implementation="sdpa").eval()


def _qwen_segments(visual, grid: torch.Tensor):
    """Each block's attention segments (lengths in patches), as the tower makes them."""
    from transformers import vision_utils

    full, _ = vision_utils.get_vision_attention_seqlens(grid, visual.config)
    if not hasattr(visual, "fullatt_block_indexes"):  # no windows (Qwen2-VL, Qwen3-VL): whole images
        return [full.diff().tolist()] * len(visual.blocks)
    _, windows = vision_utils.get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                     window_size=visual.window_size, patch_size=visual.patch_size)
    return [(full if i in visual.fullatt_block_indexes else windows).diff().tolist()
            for i in range(len(visual.blocks))]


def _qwen_tower_flops(visual, grid, units_per_block: List[int], dymu: bool) -> int:
    """The tower on the meta device: patch embedding; per block the token-wise
    work on ``units_per_block[i]`` units (MLP on block i + 1's count when DyMU
    merged in between), attention over every patch in the block's segments,
    DyMU's unit matching; the merger on the units left."""
    import torch.nn.functional as F

    from dymu_kernels.reference.dtome import bipartite_match

    C, H = visual.config.hidden_size, visual.config.num_heads
    L = int(grid.prod())
    meta = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    p = visual.patch_size
    flops = _flops(lambda: visual.patch_embed(meta(L, 3 * 2 * p * p)))
    taps = dict(zip(getattr(visual, "deepstack_visual_indexes", ()), getattr(visual, "deepstack_merger_list", ())))
    for i, (blk, segments) in enumerate(zip(visual.blocks, _qwen_segments(visual, grid))):
        rows, after = 4 * units_per_block[i], 4 * units_per_block[i + 1]
        flops += _flops(lambda: blk.attn.qkv(blk.norm1(meta(rows, C))))
        flops += _flops(lambda: [F.scaled_dot_product_attention(*(meta(1, H, n, C // H) for _ in range(3)))
                                 for n in segments if n > 0])
        flops += _flops(lambda: blk.attn.proj(meta(rows, C)))
        if dymu:
            u = units_per_block[i]
            flops += _flops(lambda: bipartite_match(meta(1, H, u, C // H), torch.tensor([u], device="meta"),
                                                    cls_token=False))
        flops += _flops(lambda: blk.mlp(blk.norm2(meta(after, C))))
        if i in taps:  # a deepstack tap merger on the units left after this block
            flops += _flops(lambda: taps[i](meta(after, C)))
    return flops + _flops(lambda: visual.merger(meta(4 * units_per_block[-1], C)))


def qwen_flops(model, r: int = 0) -> Dict[str, int]:
    """Tower and language-model prefill FLOPs of one 448 × 448 image and 66
    text tokens; ``r`` units merged per block (0: the stock model)."""
    visual = model.model.visual
    grid = torch.tensor([QWEN3_GRID if hasattr(visual, "deepstack_merger_list") else QWEN_GRID])
    units = int(grid.prod()) // 4
    blocks = len(visual.blocks)
    per_block = [units - r * i for i in range(blocks + 1)]
    vision = _qwen_tower_flops(visual, grid, per_block, dymu=r > 0)
    kept = per_block[-1]
    text = TEXT_BEFORE + TEXT_AFTER
    return {"vision": vision, "lm": _lm_flops(model, text + kept, _image_merge_map(units, kept)),
            "image_tokens": kept, "lm_tokens": text + kept}


def qwen_table(size: str = "7b") -> List[Dict[str, object]]:
    model = meta_qwen(size)
    stock = qwen_flops(model)
    rows = []
    settings = QWEN3_SETTINGS if size in QWEN3_WIDTHS else QWEN_SETTINGS
    configs = [("stock", stock)] + [(f"DyMU {k} (r={r} units/block)", qwen_flops(model, r))
                                    for k, r in settings.items()]
    for name, counts in configs:
        total, stock_total = counts["vision"] + counts["lm"], stock["vision"] + stock["lm"]
        rows.append({"op": "model_flops", "model": {**QWEN_WIDTHS, **QWEN3_WIDTHS}[size]["name"],
                     "size": f"qwen-{size}",
                     "lm_layers": model.config.text_config.num_hidden_layers, "config": name,
                     "image_tokens": counts["image_tokens"], "lm_tokens": counts["lm_tokens"],
                     "vision_gflops": counts["vision"] / 1e9, "lm_gflops": counts["lm"] / 1e9,
                     "total_gflops": total / 1e9, "vision_ratio": counts["vision"] / stock["vision"],
                     "lm_ratio": counts["lm"] / stock["lm"], "total_ratio": total / stock_total})
    return rows


def table(size: str, lm_layers: int) -> List[Dict[str, object]]:
    model = meta_llava(size, lm_layers)
    stock = stock_flops(model)
    rows = []
    for name, counts in [("stock", stock)] + [(f"DyMU {k} (r={r})", dymu_flops(model, r)) for k, r in SETTINGS.items()]:
        total = counts["vision"] + counts["lm"]
        stock_total = stock["vision"] + stock["lm"]
        rows.append({"op": "model_flops", "model": SIZES[size]["name"], "size": size, "lm_layers": lm_layers,
                     "config": name, "image_tokens": counts["image_tokens"], "lm_tokens": counts["lm_tokens"],
                     "vision_gflops": counts["vision"] / 1e9, "lm_gflops": counts["lm"] / 1e9,
                     "total_gflops": total / 1e9, "vision_ratio": counts["vision"] / stock["vision"],
                     "lm_ratio": counts["lm"] / stock["lm"], "total_ratio": total / stock_total})
    return rows


def markdown(rows: List[Dict[str, object]]) -> str:
    r0 = rows[0]
    lines = [f"### {r0['model']}, {r0['lm_layers']} LM layers: prefill of one image + 66 text tokens (GFLOPs)", "",
             "| config | image tokens | LM tokens | vision tower (+ projector / merger) | × stock | LM prefill | × stock | "
             "total | × stock |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['image_tokens']} | {r['lm_tokens']} | {r['vision_gflops']:.1f} | "
                     f"{r['vision_ratio']:.2f} | {r['lm_gflops']:.1f} | {r['lm_ratio']:.2f} | {r['total_gflops']:.1f} | "
                     f"{r['total_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=RESULTS_DIR)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    parts, all_rows = [], []
    for rows in (table("7b", SIZES["7b"]["lm_layers"]), table("small", SIZES["small"]["lm_layers"]), qwen_table("7b"),
                 qwen_table("8b")):
        all_rows += rows
        parts.append(markdown(rows))
        print(parts[-1], flush=True)
    env = environment()
    note = (f"Counted with FlopCounterMode on the meta device; torch {env['torch']}, transformers "
            f"{env['transformers']}, commit {env['commit']}.\n")
    if not args.no_save:
        write_rows("flops_model", all_rows, args.results_dir)
        with open(os.path.join(args.results_dir, "flops_model.md"), "w") as f:
            f.write("\n".join(parts) + "\n" + note)
        print(f"rows and table: {os.path.join(args.results_dir, 'flops_model')}.jsonl / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
