"""LLaVA-OneVision end to end on this device: stock vs DyMU, a many-crop image and a video.

    python3 benchmarks/bench_onevision.py            # CPU: OneVision-0.5B widths, 8 + 8 layers
    python3 benchmarks/bench_onevision.py --quick    # tiny widths: a smoke test of seconds

A randomly initialised ``LlavaOnevisionForConditionalGeneration`` with the
widths of llava-onevision-qwen2-0.5b (SigLIP-so400m/14-384: 1152 wide, 16
heads; Qwen2-0.5B: 896 wide, 14 heads, 2 KV heads), cut to ``--vision-layers``
/ ``--lm-layers`` blocks so a CPU run takes minutes. Two prompts: one
768 × 768 photograph (AnyRes: base + 2 × 2 crops, 5 × 729 tower tokens,
anyres_max_9 packing with newlines) and one 8-frame video (8 × 196 + 1
placeholders), each with 20 text tokens. DyMU merges a fixed ``r`` tokens per
block and crop / frame (no SigLIP thresholds were published; fixed r gives
exact, image-independent counts).

Per prompt and config: placeholders and unique tokens the language model runs
on, prefill time (median and min–max of ``--samples`` runs after a warm-up,
side by side in one run), the prefill FLOPs (FlopCounterMode) and the KV-cache
bytes. Rows: ``benchmarks/results/onevision_<device>.jsonl`` (device,
versions, commit).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_e2e import count_flops, load_photos  # noqa: E402
from common import add_run_args, check_run_args, print_table, sample_times, write_rows  # noqa: E402

IMG, VID = 151646, 151647
PINPOINTS = [[384, 384], [384, 768], [768, 384], [768, 768], [384, 1152], [1152, 384], [768, 1152], [1152, 768],
             [1152, 1152]]
WIDTHS = {
    "0.5b": dict(vision=dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384,
                             patch_size=14),
                 text=dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                           vocab_size=151648)),
    "quick": dict(vision=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, image_size=384,
                              patch_size=14),
                  text=dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=151648)),
}


def build(widths: str, vision_layers: int, lm_layers: int, seed: int):
    import transformers

    w = WIDTHS[widths]
    vision = transformers.SiglipVisionConfig(**w["vision"], num_hidden_layers=vision_layers)
    text = transformers.Qwen2Config(**w["text"], num_hidden_layers=lm_layers, max_position_embeddings=8192)
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS,
                                               vision_aspect_ratio="anyres_max_9", image_token_id=IMG,
                                               video_token_id=VID, vision_feature_layer=-1,
                                               vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    return transformers.LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def prompts(model, seed: int):
    """``{"image": kwargs, "video": kwargs}``: a 768 × 768 photograph as AnyRes
    crops (its placeholder count from the model's own packing) and an 8-frame
    video of the same photograph panning."""
    gen = torch.Generator().manual_seed(seed)
    photo = load_photos(["astronaut"], 768)[0]  # [3, 768, 768], CLIP-normalised
    crops = torch.stack([torch.nn.functional.interpolate(photo[None], size=384, mode="bilinear")[0]]
                        + [photo[:, r * 384:(r + 1) * 384, c * 384:(c + 1) * 384] for r in range(2) for c in range(2)])
    pix, sizes = crops[None], torch.tensor([[768, 768]])
    with torch.no_grad():
        placeholders = model.model.get_image_features(pixel_values=pix, image_sizes=sizes).pooler_output[0].shape[0]
    text = torch.randint(3, 1000, (20,), generator=gen)
    image_ids = torch.cat([text[:10], torch.full((placeholders,), IMG), text[10:]])[None]
    frames = torch.stack([photo[:, 100 + 20 * f: 484 + 20 * f, 100 + 20 * f: 484 + 20 * f] for f in range(8)])
    video_ids = torch.cat([text[:10], torch.full((8 * 196 + 1,), VID), text[10:]])[None]
    return {"image": dict(input_ids=image_ids, pixel_values=pix, image_sizes=sizes),
            "video": dict(input_ids=video_ids, pixel_values_videos=frames[None])}


def measure(model, name: str, inputs, args):
    from dymu_kernels.hf import kv_cache_bytes
    from dymu_kernels.hf.cache import cache_state

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    with torch.inference_mode():
        out = prefill()
        state = cache_state(out.past_key_values)
        rows = int(out.past_key_values.layers[0].get_seq_length())
        kv = kv_cache_bytes(out.past_key_values)
        del out
        t = sample_times(prefill, "cpu", samples=args.samples, warmup=0)
        flops = count_flops(prefill)
    n = inputs["input_ids"].shape[1]
    return {"op": "onevision_prefill", "prompt": name, "positions": n, "lm_tokens": rows,
            "unique_visual": rows - 20 if state is not None else None, "prefill_s": t["median"], "prefill_min": t["min"],
            "prefill_max": t["max"], "n_samples": t["n_samples"], "gflops": flops / 1e9, "kv_mib": kv["bytes"] / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-layers", type=int, default=8)
    p.add_argument("--lm-layers", type=int, default=8)
    p.add_argument("--r", type=int, nargs="+", default=[76, 40], help="merges per block and crop/frame")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny widths, 2 + 2 layers")
    add_run_args(p, samples=3)
    args = p.parse_args(argv)
    check_run_args(p, args)
    if args.quick:
        args.vision_layers, args.lm_layers, args.r = 2, 2, [100]
    from dymu_kernels.hf import apply_dymu, remove_dymu

    model = build("quick" if args.quick else "0.5b", args.vision_layers, args.lm_layers, args.seed)
    inputs = prompts(model, args.seed)
    rows = []
    for config in ["stock"] + [f"r={r}" for r in args.r]:
        if config != "stock":
            apply_dymu(model, r=int(config[2:]))
        for name, kw in inputs.items():
            row = measure(model, name, kw, args)
            rows.append({"config": config, "vision_layers": args.vision_layers, "lm_layers": args.lm_layers,
                         "widths": "quick" if args.quick else "llava-onevision-qwen2-0.5b", **row})
            print(f"  {config:>6} {name:<5} prefill {row['prefill_s']:.3f} s, LM tokens {row['lm_tokens']}", flush=True)
        remove_dymu(model)
    for r in rows:
        stock = next(s for s in rows if s["config"] == "stock" and s["prompt"] == r["prompt"])
        r["speedup"] = stock["prefill_s"] / r["prefill_s"]
        r["flop_ratio"] = r["gflops"] / stock["gflops"]
    print_table(rows, ["config", "prompt", "positions", "lm_tokens", "prefill_s", "prefill_min", "prefill_max",
                       "speedup", "gflops", "flop_ratio", "kv_mib"])
    if not args.no_save:
        print("rows appended to", write_rows(f"onevision_{'quick' if args.quick else 'cpu'}", rows, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
