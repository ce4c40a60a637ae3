"""Qwen2.5-VL / Qwen3-VL / Qwen3.5 end to end on this device: stock vs DyMU, a photograph and a video.

    python3 benchmarks/bench_qwen.py            # CPU: Qwen2.5-VL-3B widths, 8 + 4 layers
    python3 benchmarks/bench_qwen.py --family qwen3_vl --r 10 20   # CPU: Qwen3-VL-8B widths, 8 + 4 layers
    python3 benchmarks/bench_qwen.py --family qwen3_5 --r 10 20    # CPU: Qwen3.5 (9B-class), 8 + 4 layers
    python3 benchmarks/bench_qwen.py --quick    # tiny widths: a smoke test of seconds
    python3 benchmarks/bench_qwen.py --device cuda --dtype bfloat16 --vision-layers 32 --lm-layers 36   # GPU, whole 3B

A randomly initialised ``Qwen2_5_VLForConditionalGeneration`` with the widths
of Qwen2.5-VL-3B (tower: 1280 wide, 16 heads, 112-px windows with a
full-attention block every 4; language model: 2048 wide, 16 heads, 2 KV
heads, M-RoPE), cut to ``--vision-layers`` / ``--lm-layers`` blocks so a CPU
run takes minutes. Two prompts, each with 20 text tokens: one 448 × 448
photograph through the model's own image processor (32 × 32 patches, 256
placeholders) and an 8-frame 252 × 252 video panning over it (4 frame pairs
of 18 × 18 patches, 324 placeholders).

``--family qwen3_vl``: a ``Qwen3VLForConditionalGeneration`` with the widths
of Qwen3-VL-8B (tower: 1152 wide, 16 heads, 16-px patches, learned position
embeddings, deepstack taps after 3 evenly spread blocks of the cut tower;
language model: 4096 wide, 32 heads, 8 KV heads, interleaved M-RoPE): the
photograph is 28 × 28 patches (196 placeholders), the video 8 frames of
256 × 256 (4 frame pairs of 16 × 16 patches, each after its timestamp, 256
placeholders).

``--family qwen3_5``: a ``Qwen3_5ForConditionalGeneration`` with the widths
of transformers' ``Qwen3_5Config`` defaults (a 9B-class model): Qwen3-VL's
tower (1152 wide, no deepstack) and a hybrid language model, 4096 wide, whose
layers are Gated DeltaNet linear attention (16 key / 32 value heads of 128)
but every fourth, gated full attention (16 heads of 256, 4 KV heads, RoPE on
a quarter of each head): a cut depth of 4 is 3 linear + 1 full layer. The
prompts are Qwen3-VL's. Rows also say where the language model's prefill
time goes by layer part (:func:`layer_type_times`): the Gated DeltaNet
layers' full-length mixing (conv, delta rule, gated norm — DyMU's floor
there) apart from their projections.

Configs, side by side in one run (stock first and last): DyMU merging inside
the tower a fixed ``r`` units per block and image / frame pair (``--r``: two
levels), and per-block thresholds calibrated on 8 photographs for the heavier
level. Per prompt and config: the unique tokens the language model runs on,
the tower time (``get_image_features`` / ``get_video_features``) and the
prefill time (median and min–max of ``--samples`` runs after a warm-up; time
ratios against the median of both stock runs' samples pooled), the FLOPs of
both (FlopCounterMode: the bound a time ratio can reach) and the KV-cache
bytes. Rows: ``benchmarks/results/qwen_<device>.jsonl`` (device,
versions, commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import add_run_args, check_run_args, print_table, sample_times, write_rows  # noqa: E402

IMG, VID, VSTART, VEND = 151655, 151656, 151652, 151653
WIDTHS = {
    "3b": {"vision": dict(hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=2048),
           "text": dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]})},
    "quick": {"vision": dict(hidden_size=64, num_heads=2, intermediate_size=96, out_hidden_size=64),
              "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})},
}
# Tiny widths vLLM's CPU attention takes (head dim 64): bench_vllm.py --family qwen2_5_vl --size quick.
WIDTHS["quick-vllm"] = {"vision": WIDTHS["quick"]["vision"] | dict(out_hidden_size=128),
                        "text": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2,
                                     num_key_value_heads=1, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 10000.0,
                                                                             "mrope_section": [8, 12, 12]})}
# Qwen3-VL: the 8B's widths, and tiny ones for --quick.
QWEN3_WIDTHS = {
    "8b": {"vision": dict(hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096),
           "text": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                                       "mrope_section": [24, 20, 20], "mrope_interleaved": True})},
    # Qwen3-VL-4B (tied embeddings): what bench_vllm.py --family qwen3_vl serves (the 8B's untied 4096-wide
    # embeddings alone would be 5 GB in fp32, twice over: the saved folder and vLLM's copy).
    "4b": {"vision": dict(hidden_size=1024, num_heads=16, intermediate_size=4096, out_hidden_size=2560),
           "text": dict(hidden_size=2560, intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                         "mrope_section": [24, 20, 20], "mrope_interleaved": True})},
    "quick": {"vision": dict(hidden_size=64, num_heads=2, intermediate_size=96, out_hidden_size=64),
              "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "mrope_section": [2, 3, 3], "mrope_interleaved": True})},
}
# Tiny widths vLLM's CPU attention takes (head dim 64): bench_vllm.py --family qwen3_vl --size quick.
QWEN3_WIDTHS["quick-vllm"] = {"vision": QWEN3_WIDTHS["quick"]["vision"] | dict(out_hidden_size=128),
                              "text": QWEN3_WIDTHS["quick"]["text"] | dict(hidden_size=128, num_attention_heads=2,
                                                                           num_key_value_heads=1, head_dim=64,
                                                                           rope_parameters={
                                                                               "rope_type": "default",
                                                                               "rope_theta": 10000.0,
                                                                               "mrope_section": [8, 12, 12],
                                                                               "mrope_interleaved": True})}
# Qwen3.5 (hybrid: Gated DeltaNet layers and every fourth gated full attention with partial rotary): the widths of
# transformers' Qwen3_5Config defaults (a 4096-wide, 9B-class model), and tiny ones for --quick.
QWEN3_5_WIDTHS = {
    "9b": {"vision": dict(hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096),
           "text": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=16, num_key_value_heads=4,
                        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128,
                        linear_value_head_dim=128, linear_conv_kernel_dim=4,
                        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                         "mrope_section": [11, 11, 10], "mrope_interleaved": True})},
    "quick": {"vision": dict(hidden_size=64, num_heads=2, intermediate_size=96, out_hidden_size=64),
              "text": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                           linear_value_head_dim=16,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                            "mrope_section": [2, 1, 1], "mrope_interleaved": True})},
}
# Tiny widths vLLM's CPU attention and Gated DeltaNet take (head dims 64): bench_vllm.py --family qwen3_5 --size quick.
QWEN3_5_WIDTHS["quick-vllm"] = {"vision": QWEN3_5_WIDTHS["quick"]["vision"] | dict(out_hidden_size=128),
                                "text": QWEN3_5_WIDTHS["quick"]["text"] | dict(
                                    hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                    linear_key_head_dim=64, linear_value_head_dim=64,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 0.25, "mrope_section": [2, 3, 3],
                                                     "mrope_interleaved": True})}
PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_5": 16}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins")


def build(family: str, widths: str, vision_layers: int, lm_layers: int, seed: int):
    import transformers

    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if family == "qwen3_5":
        w = QWEN3_5_WIDTHS[widths]
        vision = dict(w["vision"], depth=vision_layers, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=2304)
        # layer_types: transformers' default, full attention every fourth layer (a cut depth of 4: 3 linear + 1 full)
        text = dict(w["text"], num_hidden_layers=lm_layers, vocab_size=248320, max_position_embeddings=32768)
        config = transformers.Qwen3_5Config(vision_config=vision, text_config=text, **ids)
        cls = transformers.Qwen3_5ForConditionalGeneration
    elif family == "qwen3_vl":
        w = QWEN3_WIDTHS[widths]
        # The released taps (after blocks 8, 16, 24 of 27); a cut tower: three spread over its blocks.
        taps = [8, 16, 24] if vision_layers >= 25 else sorted({vision_layers * k // 4 for k in (1, 2, 3)})
        vision = dict(w["vision"], depth=vision_layers, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                      num_position_embeddings=2304, deepstack_visual_indexes=taps)
        text = dict(w["text"], num_hidden_layers=lm_layers, vocab_size=151936, max_position_embeddings=32768)
        tie = text.pop("tie_word_embeddings", False)  # the model reads it from the top-level config
        config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=tie, **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    else:
        w = WIDTHS[widths]
        full = sorted({min(i, vision_layers - 1) for i in range(3, vision_layers, 4)} | {vision_layers - 1})
        vision = dict(w["vision"], depth=vision_layers, fullatt_block_indexes=full, window_size=112, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2)
        text = dict(w["text"], num_hidden_layers=lm_layers, vocab_size=152064, max_position_embeddings=32768)
        config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="sdpa").eval()


def processor(family: str = "qwen2_5_vl"):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = PATCH[family]
    return Qwen2VLImageProcessorPil(patch_size=patch, min_pixels=(4 * patch) ** 2, max_pixels=448 * 448)


def photographs(names, size: int):
    import skimage.data
    from PIL import Image

    out = []
    for n in names:
        a = getattr(skimage.data, n)()
        a = a if a.ndim == 3 else a[..., None].repeat(3, -1)
        out.append(Image.fromarray(a[..., :3]).convert("RGB").resize((size, size)))
    return out


def video_rows(frames: torch.Tensor, proc):
    """``frames [T, 3, H, W]`` (0..1) as the processor lays a video out: normalised, rows of
    ``2 × p × p`` patches of each frame pair in 2×2-unit order; and its grid."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (proc.image_mean, proc.image_std))
    x = (frames - mean) / std
    T, C, H, W = x.shape
    p = proc.patch_size
    t, h, w = T // 2, H // p, W // p
    x = x.reshape(t, 2, C, h // 2, 2, p, w // 2, 2, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, C * 2 * p * p), torch.tensor([[t, h, w]])


def prompts(seed: int, family: str = "qwen2_5_vl"):
    """``{"image": kwargs, "video": kwargs}`` (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    proc = processor(family)
    photo = photographs(["astronaut"], 448)[0]
    enc = proc(images=[photo], return_tensors="pt")
    frames = torch.tensor(list(photo.getdata()), dtype=torch.float32).view(448, 448, 3).permute(2, 0, 1) / 255
    timestamps = family in ("qwen3_vl", "qwen3_5")  # videos as timestamped frames (Qwen3-VL's layout)
    side = 256 if PATCH[family] == 16 else 252  # a multiple of two patches
    video, video_grid = video_rows(torch.stack([frames[:, 20 * f: 20 * f + side, 20 * f: 20 * f + side]
                                                for f in range(8)]), proc)
    text = torch.randint(3, 1000, (20,), generator=gen)

    def ids(token, grid):
        t, h, w = grid
        if timestamps and token == VID:  # Qwen3-VL / Qwen3.5: each frame pair after its timestamp tokens
            vision = torch.cat([torch.cat([torch.tensor([1000 + f, VSTART]), torch.full((h * w // 4,), token),
                                           torch.tensor([VEND])]) for f in range(t)])
        else:
            vision = torch.cat([torch.tensor([VSTART]), torch.full((t * h * w // 4,), token), torch.tensor([VEND])])
        seq = torch.cat([text[:10], vision, text[10:]])[None]
        return seq, (seq == IMG).long() + 2 * (seq == VID).long()

    image_ids, image_types = ids(IMG, enc["image_grid_thw"][0].tolist())
    video_ids, video_types = ids(VID, video_grid[0].tolist())
    return {"image": dict(input_ids=image_ids, mm_token_type_ids=image_types, pixel_values=enc["pixel_values"],
                          image_grid_thw=enc["image_grid_thw"]),
            "video": dict(input_ids=video_ids, mm_token_type_ids=video_types, pixel_values_videos=video,
                          video_grid_thw=video_grid)}


def calibrate(model, r: int, blocks: int, device, dtype, family: str = "qwen2_5_vl"):
    """Per-block thresholds for ``r`` merges per block on average, from 8 photographs."""
    from dymu_kernels import calibrate_thresholds
    from dymu_kernels.families.qwen_vit import QwenUnitDToMe

    enc = processor(family)(images=photographs(PHOTOS, 448), return_tensors="pt")
    tower = QwenUnitDToMe(model.model.visual)
    return calibrate_thresholds(lambda batch, policy: tower(*batch, policy=policy),
                                [(enc["pixel_values"].to(device, dtype), enc["image_grid_thw"].to(device))], r,
                                num_layers=blocks, progress=False)


def layer_type_times(model, prefill, samples: int) -> dict:
    """Where a prefill's language-model time goes, by layer part (CPU: forward
    hooks read the clock; median over ``samples`` prefills, seconds summed over
    layers): ``full_attention_s`` (attention layers' mixer), and for a hybrid
    model's Gated DeltaNet layers ``linear_mixer_s`` with its token-wise
    ``linear_projections_s`` (in_proj_* and out_proj: what DyMU runs on the
    unique rows) and ``linear_mixing_s``, the rest (the conv, the delta rule and
    the gated norm over every position: DyMU's floor there); ``mlp_s``. Empty
    for a model without linear layers."""
    import functools
    import time

    layers = model.model.language_model.layers
    if not any(hasattr(layer, "linear_attn") for layer in layers):
        return {}
    watched = []
    for layer in layers:
        mixer = getattr(layer, "linear_attn", None)
        if mixer is not None:
            watched.append(("linear_mixer_s", mixer))
            watched += [("linear_projections_s", getattr(mixer, n))
                        for n in ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")]
        else:
            watched.append(("full_attention_s", layer.self_attn))
        watched.append(("mlp_s", layer.mlp))
    runs = []
    for _ in range(samples):
        spent, started, hooks = {}, {}, []
        def start(module, args):
            started[id(module)] = time.perf_counter()

        def stop(module, args, output, key):
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - started[id(module)]

        for key, module in watched:
            hooks.append(module.register_forward_pre_hook(start))
            hooks.append(module.register_forward_hook(functools.partial(stop, key=key)))
        try:
            prefill()
        finally:
            for h in hooks:
                h.remove()
        spent["linear_mixing_s"] = spent["linear_mixer_s"] - spent["linear_projections_s"]
        runs.append(spent)
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def measure(model, name: str, inputs, args):
    device = args.device
    from bench_e2e import count_flops

    from dymu_kernels.hf import kv_cache_bytes

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    if name == "image":
        def tower():
            return model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    else:
        def tower():
            return model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])

    with torch.inference_mode():
        out = prefill()
        # rows the attention layers' KV cache holds (a hybrid model's linear layers keep states instead)
        rows = int(next(layer for layer in out.past_key_values.layers if hasattr(layer, "keys")).get_seq_length())
        kv = kv_cache_bytes(out.past_key_values)
        del out
        t_prefill = sample_times(prefill, device, samples=args.samples, warmup=0)
        t_tower = sample_times(tower, device, samples=args.samples, warmup=1)
        flops, tower_flops = count_flops(prefill), count_flops(tower)
        parts = layer_type_times(model, prefill, args.samples) if device == "cpu" else {}
    return {**parts, "op": "qwen_prefill", "prompt": name, "positions": inputs["input_ids"].shape[1], "lm_tokens": rows,
            "prefill_s": t_prefill["median"], "prefill_min": t_prefill["min"], "prefill_max": t_prefill["max"],
            "tower_s": t_tower["median"], "tower_min": t_tower["min"], "tower_max": t_tower["max"],
            "prefill_samples": t_prefill["samples"], "tower_samples": t_tower["samples"],
            "n_samples": t_prefill["n_samples"], "gflops": flops / 1e9, "tower_gflops": tower_flops / 1e9,
            "kv_mib": kv["bytes"] / 2**20}


WIDTH_NAMES = {"qwen2_5_vl": "qwen2.5-vl-3b", "qwen3_vl": "qwen3-vl-8b", "qwen3_5": "qwen3.5-9b-class"}
RESULT_NAMES = {"qwen2_5_vl": "qwen", "qwen3_vl": "qwen3", "qwen3_5": "qwen3_5"}  # benchmarks/results/<name>_<device>


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vision-layers", type=int, default=8)
    p.add_argument("--lm-layers", type=int, default=4)
    p.add_argument("--r", type=int, nargs=2, default=[12, 24], help="units merged per block and set: two levels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--quick", action="store_true", help="tiny widths, 4 + 2 layers")
    p.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl", "qwen3_5"), default="qwen2_5_vl",
                   help="Qwen2.5-VL-3B, Qwen3-VL-8B or Qwen3.5 (9B-class) widths (module doc)")
    add_run_args(p, samples=3)
    args = p.parse_args(argv)
    check_run_args(p, args)
    if args.quick:  # (Qwen3.5: 4 LM layers, the first attention layer being the fourth)
        args.vision_layers, args.lm_layers = 4, 4 if args.family == "qwen3_5" else 2
    from dymu_kernels.hf import apply_dymu, remove_dymu

    widths = "quick" if args.quick else {"qwen2_5_vl": "3b", "qwen3_vl": "8b", "qwen3_5": "9b"}[args.family]
    dtype = getattr(torch, args.dtype)
    model = build(args.family, widths, args.vision_layers, args.lm_layers, args.seed).to(args.device, dtype)
    # Inference only. (Qwen3.5's conv1d reaches a hub-kernel layer as an argument: FlopCounterMode's module tracker
    # would hook its weight's gradient, which fails in inference mode while the weight requires grad.)
    model.requires_grad_(False)
    inputs = {name: {k: (v.to(args.device, dtype) if v.is_floating_point() else v.to(args.device))
                     for k, v in kw.items()} for name, kw in prompts(args.seed, args.family).items()}
    thresholds = calibrate(model, max(args.r), args.vision_layers, args.device, dtype, args.family)
    print("thresholds calibrated for r =", max(args.r), ":", ", ".join(f"{t:.3f}" for t in thresholds.thresholds))
    configs = [("stock", None), *[(f"r={r}", dict(r=r)) for r in args.r], ("thresholds", dict(thresholds=thresholds)),
               ("stock (last)", None)]
    rows = []
    for config, kwargs in configs:
        if kwargs is not None:
            apply_dymu(model, backend="auto", **kwargs)
        for name, kw in inputs.items():
            row = measure(model, name, kw, args)
            rows.append({"config": config, "vision_layers": args.vision_layers, "lm_layers": args.lm_layers,
                         "dtype": args.dtype,
                         "family": args.family,
                         "widths": "quick" if args.quick else WIDTH_NAMES[args.family], **row})
            print(f"  {config:>12} {name:<5} prefill {row['prefill_s']:.3f} s, tower {row['tower_s']:.3f} s, "
                  f"LM tokens {row['lm_tokens']}", flush=True)
        remove_dymu(model)
    for r in rows:
        # Time ratios against the median of both stock runs' samples pooled (first and last: the
        # machine's drift in between counts against neither side); FLOP ratios are exact.
        first, last = (next(s for s in rows if s["config"] == c and s["prompt"] == r["prompt"])
                       for c in ("stock", "stock (last)"))
        base = {k: statistics.median(first[k] + last[k]) for k in ("prefill_samples", "tower_samples")}
        r["speedup"] = base["prefill_samples"] / r["prefill_s"]
        r["flop_bound"] = first["gflops"] / r["gflops"]
        r["tower_speedup"] = base["tower_samples"] / r["tower_s"]
        r["tower_flop_bound"] = first["tower_gflops"] / r["tower_gflops"]
        r["stock_drift"] = last["prefill_s"] / first["prefill_s"]
    print_table(rows, ["config", "prompt", "positions", "lm_tokens", "prefill_s", "prefill_min", "prefill_max",
                       "speedup", "flop_bound", "tower_s", "tower_speedup", "tower_flop_bound", "kv_mib",
                       "stock_drift"] + (["linear_mixing_s", "linear_projections_s", "full_attention_s", "mlp_s"]
                                         if "mlp_s" in rows[0] else []))
    if not args.no_save:
        name = f"{RESULT_NAMES[args.family]}_{'quick' if args.quick else args.device}"
        print("rows appended to", write_rows(name, rows, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
