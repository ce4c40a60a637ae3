"""End to end: does DyMU make a LLaVA model faster? Stock vs DyMU, side by side.

One ``LlavaForConditionalGeneration`` with RANDOM weights (no downloads) is
built from a config of the LLaVA-1.5 shape: a CLIP ViT-L/14-336 vision tower
(24 blocks, LLaVA reads block 23: ``vision_feature_layer=-2``, "default"
strategy), the 2-layer GELU projector, and a Llama language model:

- ``--size small`` (default, CPU-sized): a 1B-class Llama (hidden 2048, MLP
  5632, 32 heads, 4 KV heads) cut to 8 layers (``--lm-layers 22`` = full);
- ``--size 7b``: LLaVA-1.5-7B's Llama (32 layers, hidden 4096, MLP 11008,
  32 heads, 32 KV heads), for a GPU;
- ``--quick``: tiny CLIP and Llama (a smoke test of seconds).

The vocabulary is 32000 + 64 added ids as llava-hf pads it (the image token is
id 32000). Input: one real photograph per sample (scikit-image's astronaut,
then coffee, chelsea, ... for ``--batch`` > 1), resized and normalised like
the CLIP processor, and a prompt of 5 + 61 random text tokens around the 576
image placeholders (642 positions).

The same model instance is patched (``apply_dymu``), measured, restored
(``remove_dymu``) and patched with the next configuration:

- ``stock``: the unmodified model (HF SDPA attention);
- ``r=N``: fixed-r ToMe merging, N tokens per image per vision block — the
  same count for every image (r=21 keeps 576 - 21*23 = 93); ``r=0`` runs the
  whole DyMU path with nothing merged (its overhead alone);
- ``threshold``: DyMU's threshold merging, with thresholds calibrated on this
  random tower (scikit-image photographs, r=21 per block on average), so the
  tokens kept vary per image. The published thresholds fit OpenAI's trained
  weights only: random weights give other similarities.

Metrics, per configuration:

- prefill: ``model(**inputs, use_cache=True, logits_to_keep=1)`` under
  ``torch.inference_mode`` (what generate() runs first) — seconds, median and
  min/max of ``--samples`` runs after one warm-up;
- generate: ``model.generate(**inputs, max_new_tokens=T, min_new_tokens=T,
  do_sample=False)`` — seconds, and new tokens/s = batch * T / median;
- decode step: (generate - prefill) / (T - 1), the mean cost of one new token,
  and the same measured directly between consecutive logits-processor calls
  ("direct"); the warm-up generate also checks the KV cache really covers
  all positions (a decode step that silently re-runs without cache is flagged);
- FLOPs of one prefill forward (``torch.utils.flop_counter.FlopCounterMode``:
  2 per multiply-add of matmuls/convolutions/attention; causal attention
  counts half; VTU attention counts the original attention at the full
  length, which the fused kernel computes) — the FLOP ratio is the bound the
  time ratio is compared with;
- image tokens kept (``dymu_stats``), KV-cache bytes of the prefill's cache
  (``kv_cache_bytes``), and peak memory above what was resident before the
  warm-up prefill / generate (CPU: peak RSS; CUDA: max_memory_allocated);
- breakdown: the vision tower + projector alone, ``model.model.get_image_features``
  (stock: HF's tower, which runs all 24 blocks; DyMU: the patched path, 23
  merging blocks), time and FLOP ratios.

Ratios are against ``stock`` from the same run (always run first):
``x stock`` of a time or FLOP count is config / stock (< 1 is cheaper); of
tokens/s, config / stock (> 1 is faster).

A VTU-attention micro-benchmark follows (``--no-attention`` skips it): at N =
642 positions, N_un = 159 unique tokens (93 image groups + 66 text), H = 32,
D = 64 (KV heads 32 and 4) and 128, batch 1: the reference
(``reference.vtu_attention_expand``: gather, RoPE, eager N×N softmax, segment
mean) and ``dymu_kernels.vtu_attention`` per backend ("torch": expand + SDPA
+ segment mean; "cpp" on the CPU; "triton" on CUDA; a backend that cannot run
is recorded "unavailable" with the reason) against SDPA on pre-expanded,
pre-rotated Q/K/V (is_causal) — the floor; and one decode step
(``vtu_decode_attention`` vs SDPA over an expanded cache).

Rows go to ``<results-dir>/e2e_<cpu|cuda>.jsonl`` (one per config and metric,
with device, versions and commit), a chart to ``e2e_<cpu|cuda>.png``, and a
Markdown table to stdout.

Run: ``python3 benchmarks/bench_e2e.py`` (CPU, about 10 minutes on 2 cores),
``--configs stock r=21 --samples 3`` for a pair, ``--quick`` for a smoke test,
``--device cuda --size 7b --dtype bfloat16`` on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR, PeakMemory, environment, sample_times, summarize, time_ms, write_rows  # noqa: E402

import dymu_kernels  # noqa: E402
from dymu_kernels import reference as ref  # noqa: E402

DEFAULT_CONFIGS = ("stock", "r=21", "r=16", "r=8", "threshold")
CALIBRATION_R = 21  # DyMU "low": r_i = 21 merges per block on average
ADDED_TOKENS = 64  # llava-hf pads the 32000-token Llama vocabulary by 64; the image token is the first added id
TEXT_BEFORE, TEXT_AFTER = 5, 61  # "<s> USER: <image>\n ... ASSISTANT:" -> 66 text tokens around the image
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
SIZES = {
    "small": dict(name="CLIP ViT-L/14-336 + 1B-class Llama", vision=CLIP_L_336, lm_layers=8,
                  text=dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                            vocab_size=32000 + ADDED_TOKENS)),
    "7b": dict(name="CLIP ViT-L/14-336 + Llama-7B (LLaVA-1.5-7B)", vision=CLIP_L_336, lm_layers=32,
               text=dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                         vocab_size=32000 + ADDED_TOKENS)),
    "quick": dict(name="tiny CLIP + tiny Llama (--quick)", lm_layers=2,
                  vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                              image_size=224, patch_size=14, projection_dim=32, hidden_act="quick_gelu"),
                  text=dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=1000 + ADDED_TOKENS)),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def clip_preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """What the CLIP image processor does: resize the shortest side to ``size``
    (bicubic, antialiased), centre-crop ``size x size``, scale to [0, 1] and
    normalise with CLIP's mean/std. HW / HWC / HWC+alpha uint8 (or bool)
    array -> ``[3, size, size]`` float32."""
    a = np.asarray(image)
    t = torch.from_numpy(a.astype(np.float32) / (1.0 if a.dtype == bool else 255.0))
    if t.dim() == 2:
        t = t[:, :, None].expand(-1, -1, 3)
    t = t[:, :, :3].permute(2, 0, 1)[None]
    h, w = t.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    t = F.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    t = t[0, :, top : top + size, left : left + size]
    return (t - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def load_photos(names, size: int) -> torch.Tensor:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("bench_e2e.py needs scikit-image for its photographs: pip install scikit-image") from None
    return torch.stack([clip_preprocess(getattr(skimage.data, n)(), size) for n in names])


def make_inputs(model, batch: int, device, dtype, seed: int) -> Dict[str, torch.Tensor]:
    """``input_ids`` (BOS, text, one placeholder per patch, text), ``attention_mask``
    and ``pixel_values`` of ``batch`` photographs."""
    cfg = model.config
    size = cfg.vision_config.image_size
    patches = (size // cfg.vision_config.patch_size) ** 2
    gen = torch.Generator().manual_seed(seed)
    image_id = cfg.image_token_id
    text = torch.randint(3, image_id, (batch, TEXT_BEFORE + TEXT_AFTER - 1), generator=gen)
    ids = torch.cat([torch.ones(batch, 1, dtype=torch.long), text[:, : TEXT_BEFORE - 1],
                     torch.full((batch, patches), image_id), text[:, TEXT_BEFORE - 1 :]], dim=1)
    names = [PHOTOS[i % len(PHOTOS)] for i in range(batch)]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": load_photos(names, size).to(device=device, dtype=dtype)}


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def llava_config(size: str, lm_layers: int):
    import transformers

    spec = SIZES[size]
    text = transformers.LlamaConfig(**spec["text"], num_hidden_layers=lm_layers, max_position_embeddings=4096,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = transformers.CLIPVisionConfig(**spec["vision"])
    return transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=text.vocab_size - ADDED_TOKENS,
                                    vision_feature_layer=-2, vision_feature_select_strategy="default",
                                    projector_hidden_act="gelu")


def count_params(config) -> int:
    import transformers

    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration._from_config(config)
    return sum(p.numel() for p in model.parameters())


def build_model(config, device: str, dtype: torch.dtype, seed: int):
    """Random weights, built directly on the device in the target dtype."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = 0
    return model.eval()


def check_memory(config, device: str, dtype: torch.dtype) -> Optional[str]:
    """A sentence when the weights alone would not fit (else None)."""
    need = count_params(config) * torch.finfo(dtype).bits // 8
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
        where = "free GPU memory"
    else:
        free = None
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            pass
        where = "MemAvailable"
    if free is not None and need > 0.9 * free:
        return f"the weights need {need / 2**30:.1f} GiB but {where} is {free / 2**30:.1f} GiB"
    return None


# ----------------------------------------------------------------------------
# DyMU configurations
# ----------------------------------------------------------------------------


def vision_blocks(model) -> int:
    """Vision blocks LLaVA reads (23 of CLIP-L's 24 for vision_feature_layer=-2)."""
    n = model.config.vision_config.num_hidden_layers
    layer = model.config.vision_feature_layer
    return n + 1 + layer if layer < 0 else layer


def calibrate(model, photos: torch.Tensor, batch: int, progress: bool):
    """Per-block thresholds for this random tower: ``calibrate_thresholds`` on
    ``photos`` with r = 21 merges per block on average."""
    from dymu_kernels.core.encoder import DToMeVisionEncoder

    blocks = vision_blocks(model)
    encoder = DToMeVisionEncoder(model.model.vision_tower, num_layers=blocks)  # merges as the policy says
    with torch.inference_mode():
        return dymu_kernels.calibrate_thresholds(encoder, photos.split(batch), CALIBRATION_R, num_layers=blocks,
                                                 model="random-init CLIP (bench_e2e.py)", progress=progress)


def apply_config(model, config: str, thresholds, backend: str, trim) -> None:
    from dymu_kernels.hf import apply_dymu

    if config == "stock":
        return
    kwargs = {"backend": backend}
    if trim is not None:
        kwargs["trim"] = trim
    if config == "threshold":
        apply_dymu(model, thresholds, **kwargs)
    else:
        apply_dymu(model, r=int(config[2:]), **kwargs)


# ----------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------


def _attention_flops_formula(op):
    """FLOPs of an SDPA kernel op: QKᵀ and AV, 2 per MAC, GQA-aware; causal
    (square) attention counts half, as ``dymu_kernels`` counts VTU attention.
    torch counts nothing for the CPU kernel and the full square for causal
    GPU kernels; this formula replaces both so stock and DyMU count alike."""
    names = [a.name for a in op.default._schema.arguments]
    causal_at = names.index("is_causal") - 3 if "is_causal" in names else None  # among the args after q, k, v

    def formula(q, k, v, *args, out_shape=None, **kwargs):
        causal = kwargs.get("is_causal", args[causal_at] if causal_at is not None and len(args) > causal_at else False)
        b, h, s_q, d = q
        s_k, d_v = k[-2], v[-1]
        flops = 2 * b * h * s_q * s_k * (d + d_v)
        return flops // 2 if causal and s_q == s_k else flops

    return formula


def flop_mapping():
    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    return {getattr(aten, n): _attention_flops_formula(getattr(aten, n)) for n in names if hasattr(aten, n)}


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


class StepClock:
    """A logits processor that stamps the time of every generation step: the
    gaps between consecutive stamps are the decode steps."""

    def __init__(self, device: str):
        self.device, self.stamps = device, []

    def __call__(self, input_ids, scores):
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        return scores

    def steps(self) -> List[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def _cache(out):
    """The KV cache of a model or generate output (``cache`` in transformers
    >= 5.2x, ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        c = out.get(name) if hasattr(out, "get") else getattr(out, name, None)
        if c is not None:
            return c
    return None


def cache_positions(cache) -> Optional[int]:
    """Full positions a KV cache covers (DyMU: its merge map; stock: its length)."""
    state = getattr(cache, "_dymu_state", None)
    if state is not None:
        return int(state.merge_map.shape[1])
    return int(cache.get_seq_length()) if cache is not None else None


def measure_config(model, config: str, inputs, args, bar) -> Dict[str, object]:
    from transformers import LogitsProcessorList

    from dymu_kernels.hf import dymu_stats, kv_cache_bytes

    device, T = args.device, args.new_tokens
    B, N = inputs["input_ids"].shape
    cfg = model.config
    patches = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    m = {"config": config}

    def step(what):
        bar.set_description(f"{config}: {what}")

    def tick():
        bar.update(1)

    def prefill():
        return model(**inputs, use_cache=True, logits_to_keep=1)

    def generate(processors=None, **kw):
        return model.generate(**inputs, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                              logits_processor=processors, **kw)

    def vision():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                              vision_feature_layer=cfg.vision_feature_layer,
                                              vision_feature_select_strategy=cfg.vision_feature_select_strategy)

    with torch.inference_mode():
        step("FLOPs")
        m["flops"] = count_flops(prefill)
        m["flops_vision"] = count_flops(vision)
        tick()

        step("prefill")
        with PeakMemory(device) as mem:
            out = prefill()  # the warm-up
        tick()
        m["peak_mem_prefill"], m["mem_method"] = mem.peak_bytes, mem.method
        m["kv"] = kv_cache_bytes(_cache(out))
        stats = dymu_stats(model)
        m["tokens_kept"] = list(stats.tokens_kept) if stats is not None else [patches] * B
        del out
        m["prefill"] = sample_times(prefill, device, args.samples, warmup=args.warmup - 1, tick=tick)

        step("generate")
        with PeakMemory(device) as mem:
            g = generate(return_dict_in_generate=True)
        tick()
        m["peak_mem_generate"] = mem.peak_bytes
        m["sequences"] = g.sequences[:, N:].cpu()
        m["cache_positions"] = cache_positions(_cache(g))
        m["cache_positions_expected"] = N + T - 1
        del g
        for _ in range(args.warmup - 1):
            generate()
            tick()
        clock = StepClock(device)
        m["generate"] = sample_times(lambda: generate(LogitsProcessorList([clock])), device, args.samples, warmup=0, tick=tick)
        steps = clock.steps()
        # Stamps of one generate() are T apart; drop the gaps between calls.
        direct = [s for i, s in enumerate(steps) if (i + 1) % T != 0]
        m["decode_direct"] = summarize(direct) if direct else None

        step("vision")
        m["vision"] = sample_times(vision, device, args.samples, warmup=args.warmup, tick=tick)
    return m


def steps_per_config(args) -> int:
    return 1 + 2 * (args.warmup + args.samples) + args.warmup + args.samples


# ----------------------------------------------------------------------------
# Rows, tables, chart
# ----------------------------------------------------------------------------


def _ratio(a, b):
    return a / b if a is not None and b else None


def derive(results: List[Dict[str, object]], batch: int, new_tokens: int) -> None:
    """Decode step (ms), tokens/s and the decode check of every result."""
    for m in results:
        m["step_ms"] = (m["generate"]["median"] - m["prefill"]["median"]) / (new_tokens - 1) * 1e3
        m["tok_s"] = batch * new_tokens / m["generate"]["median"]
        m["direct_ms"] = m["decode_direct"]["median"] * 1e3 if m["decode_direct"] else None
        m["decode_ok"] = m["cache_positions"] == m["cache_positions_expected"]


def e2e_rows(results: List[Dict[str, object]], common: Dict[str, object]) -> List[Dict[str, object]]:
    """One row per config and metric; ratios against the stock result (see :func:`derive`)."""
    stock = results[0]
    rows = []
    for m in results:
        c = m["config"]
        base = {"op": "e2e_llava", "config": c, **common}
        pre, gen, vis = m["prefill"], m["generate"], m["vision"]
        flop_ratio = _ratio(m["flops"], stock["flops"])
        step_ms, tok_s, decode_ok = m["step_ms"], m["tok_s"], m["decode_ok"]
        rows += [
            {**base, "metric": "prefill", "unit": "s", **pre, "time_ratio": _ratio(pre["median"], stock["prefill"]["median"]),
             "flop_ratio": flop_ratio},
            {**base, "metric": "generate", "unit": "s", **gen, "tokens_per_s": tok_s,
             "tokens_per_s_ratio": _ratio(tok_s, stock["tok_s"]), "time_ratio": _ratio(gen["median"], stock["generate"]["median"]),
             "same_generated_tokens_as_stock": m.get("same_tokens_as_stock")},
            {**base, "metric": "decode_step", "unit": "ms", "median": step_ms, "ratio": _ratio(step_ms, stock["step_ms"]),
             "how": "(generate median - prefill median) / (new_tokens - 1)", "decode_ok": decode_ok,
             "cache_positions": m["cache_positions"], "cache_positions_expected": m["cache_positions_expected"]},
            {**base, "metric": "decode_step_direct", "unit": "s", **(m["decode_direct"] or {}),
             "ratio": _ratio(m["direct_ms"], stock["direct_ms"]),
             "how": "gaps between consecutive logits-processor calls of the timed generate() runs"},
            {**base, "metric": "vision_tower", "unit": "s", **vis, "time_ratio": _ratio(vis["median"], stock["vision"]["median"]),
             "flop_ratio": _ratio(m["flops_vision"], stock["flops_vision"]), "flops": m["flops_vision"],
             "how": "model.model.get_image_features (tower + projector; stock runs all CLIP blocks)"},
            {**base, "metric": "prefill_flops", "unit": "FLOP", "value": m["flops"], "ratio": flop_ratio},
            {**base, "metric": "tokens_kept", "unit": "image tokens", "value": m["tokens_kept"],
             "mean": statistics.mean(m["tokens_kept"]), "of": common["image_tokens"]},
            {**base, "metric": "kv_cache", "unit": "bytes", "value": m["kv"]["bytes"],
             "bytes_without_dymu": m["kv"]["bytes_without_dymu"], "ratio": _ratio(m["kv"]["bytes"], stock["kv"]["bytes"])},
            {**base, "metric": "peak_memory", "unit": "bytes", "prefill": m["peak_mem_prefill"],
             "generate": m["peak_mem_generate"], "method": m["mem_method"]},
        ]
    return rows


def _f(x, spec=".2f", none="n/a"):
    return none if x is None else format(x, spec)


def _kept(values) -> str:
    return str(values[0]) if len(set(values)) == 1 else "/".join(str(v) for v in values)


def markdown_table(results, stock) -> str:
    lines = [
        "| config | image tokens kept | prefill s, median (min–max) | prefill ×stock | FLOPs ×stock | generate tok/s "
        "| tok/s ×stock | decode ms/step | step ×stock | decode ms/step, direct | direct ×stock | KV cache MiB "
        "| peak mem MiB (prefill / generate) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in results:
        p = m["prefill"]
        flag = "" if m["decode_ok"] else " ⚠ no cache"
        lines.append(
            f"| {m['config']} | {_kept(m['tokens_kept'])} | {p['median']:.3f} ({p['min']:.3f}–{p['max']:.3f}) "
            f"| {_f(_ratio(p['median'], stock['prefill']['median']))} | {_f(_ratio(m['flops'], stock['flops']))} "
            f"| {m['tok_s']:.2f} | {_f(_ratio(m['tok_s'], stock['tok_s']))} "
            f"| {_f(m['step_ms'], '.1f')}{flag} | {_f(_ratio(m['step_ms'], stock['step_ms']))} "
            f"| {_f(m['direct_ms'], '.1f')} | {_f(_ratio(m['direct_ms'], stock['direct_ms']))} "
            f"| {m['kv']['bytes'] / 2**20:.1f} | {m['peak_mem_prefill'] / 2**20:.0f} / {m['peak_mem_generate'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def vision_table(results, stock) -> str:
    lines = ["| config | vision tower + projector s, median (min–max) | ×stock | FLOPs ×stock |", "|---|---|---|---|"]
    for m in results:
        v = m["vision"]
        lines.append(f"| {m['config']} | {v['median']:.3f} ({v['min']:.3f}–{v['max']:.3f}) "
                     f"| {_f(_ratio(v['median'], stock['vision']['median']))} | {_f(_ratio(m['flops_vision'], stock['flops_vision']))} |")
    return "\n".join(lines)


def attention_table(rows) -> str:
    lines = ["| op | shape | provider | ms (p20–p80) | ×floor | reference ÷ this |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("unavailable"):
            lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | unavailable: {r['unavailable']} | | |")
        else:
            lines.append(f"| {r['op']} | {r['shape']} | {r['provider']} | {r['ms']:.3f} ({r['ms_p20']:.3f}–{r['ms_p80']:.3f}) "
                         f"| {_f(r.get('vs_floor'))} | {_f(r.get('speedup_vs_reference'))} |")
    return "\n".join(lines)


def draw_chart(results, title: str, path: str) -> Optional[str]:
    """Bars of prefill / generate / vision-tower time per config (min–max
    whiskers), the FLOP-proportional time marked. Returns a note if skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install matplotlib, or the 'bench' extra)"
    stock = results[0]
    names = [m["config"] for m in results]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(4.4 * 3, 4.6))
    panels = [("prefill", "prefill (s)", "flops"), ("generate", "generate %d tokens (s)" % (results[0]["new_tokens"]), None),
              ("vision", "vision tower + projector (s)", "flops_vision")]
    for ax, (key, label, flop_key) in zip(axes, panels):
        med = np.array([m[key]["median"] for m in results])
        err = np.array([[m[key]["median"] - m[key]["min"], m[key]["max"] - m[key]["median"]] for m in results]).T
        bars = ax.bar(x, med, yerr=err, capsize=3, color=["#888888"] + ["#3b7dd8"] * (len(names) - 1))
        tops = [m[key]["max"] for m in results]
        if flop_key:
            bound = [stock[key]["median"] * m[flop_key] / stock[flop_key] for m in results]
            ax.scatter(x, bound, marker="_", s=700, linewidths=2.5, color="#d62728", zorder=3,
                       label="stock time × FLOP ratio")
            labels = [f"×{m[key]['median'] / stock[key]['median']:.2f} time\n×{m[flop_key] / stock[flop_key]:.2f} FLOPs"
                      for m in results]
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), frameon=False)
        else:
            labels = [f"{m['tok_s']:.1f} tok/s\n×{m['tok_s'] / stock['tok_s']:.2f}" for m in results]
        for b, top, text in zip(bars, tops, labels):
            ax.annotate(text, (b.get_x() + b.get_width() / 2, top), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_ylabel(label)
        ax.set_ylim(0, max(tops) * 1.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------
# VTU attention micro-benchmark
# ----------------------------------------------------------------------------


def merge_map_642(gen, groups: int = 93, patches: int = 576) -> torch.Tensor:
    """``[1, N]`` map of the e2e prompt: 5 text singletons, ``patches`` image
    positions in ``groups`` groups (every group non-empty, members scattered
    like merged patches), 61 text singletons."""
    g = torch.cat([torch.arange(groups), torch.randint(0, groups, (patches - groups,), generator=gen)])
    g = g[torch.randperm(patches, generator=gen)]
    before = torch.arange(TEXT_BEFORE)
    after = TEXT_BEFORE + groups + torch.arange(TEXT_AFTER)
    return torch.cat([before, TEXT_BEFORE + g, after])[None].to(torch.int32)


def attention_rows(device: str, dtype: torch.dtype, quick: bool) -> List[Dict[str, object]]:
    from dymu_kernels.backends import select_backend
    from dymu_kernels.ops import vtu as vtu_ops

    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 2, 64)] if quick else [(32, 32, 64), (32, 4, 64), (32, 32, 128)]
    backends = ["torch", "cpp"] if device == "cpu" else ["torch", "triton"]
    merge_map = merge_map_642(gen).to(device)
    try:
        auto = select_backend("vtu_attention", "auto", vtu_ops.BACKENDS, torch.device(device), dtype)
    except ValueError as e:
        auto = f"none ({e})"
    rows = []
    for H, H_kv, D in shapes:
        rows += _attention_shape_rows(H, H_kv, D, merge_map, backends, device, dtype, gen, 0.1 if quick else 0.5, auto)
    return rows


def _attention_shape_rows(H, H_kv, D, merge_map, backends, device, dtype, gen, min_run, auto) -> List[Dict[str, object]]:
    """Prefill (N positions, N_un unique tokens) and one decode step at one head shape."""
    N, n_un = merge_map.shape[1], int(merge_map.max()) + 1

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    q, k, v = rnd(1, H, n_un, D), rnd(1, H_kv, n_un, D), rnd(1, H_kv, n_un, D)
    cos, sin = ref.rope_cos_sin(torch.arange(N + 1, device=device), D, dtype=dtype)
    gqa = {"enable_gqa": True} if H_kv < H else {}
    qe = ref.apply_rope(ref.unmerge(q, merge_map), cos[:N], sin[:N])
    ke = ref.apply_rope(ref.unmerge(k, merge_map), cos[:N], sin[:N])
    ve = ref.unmerge(v, merge_map)
    shape = f"B=1 H={H} H_kv={H_kv} N={N} N_un={n_un} D={D}"
    providers = {"reference (expand, eager softmax)": functools.partial(ref.vtu_attention_expand, q, k, v, merge_map,
                                                                        cos[:N], sin[:N])}
    providers.update({f"vtu_attention {b}": functools.partial(dymu_kernels.vtu_attention, q, k, v, merge_map, cos[:N],
                                                              sin[:N], backend=b) for b in backends})
    providers["sdpa on expanded Q/K/V (floor)"] = functools.partial(F.scaled_dot_product_attention, qe, ke, ve,
                                                                     is_causal=True, **gqa)
    rows = _time_providers("vtu_attention", shape, providers, device, dtype, min_run, auto)
    # Decode: one new token at position N, its K/V appended as unique row N_un.
    map2 = torch.cat([merge_map, torch.full((1, 1), n_un, dtype=torch.int32, device=device)], 1)
    k2, v2 = torch.cat([k, rnd(1, H_kv, 1, D)], 2), torch.cat([v, rnd(1, H_kv, 1, D)], 2)
    q1 = rnd(1, H, 1, D)
    k2e, v2e = ref.apply_rope(ref.unmerge(k2, map2), cos, sin), ref.unmerge(v2, map2)
    q1r = ref.apply_rope(q1, cos[N:], sin[N:])
    shape = f"B=1 H={H} H_kv={H_kv} N={N + 1} N_un={n_un + 1} D={D} T=1"
    providers = {"reference (expand, eager softmax)": functools.partial(ref.vtu_decode_attention_ref, q1, k2, v2, map2,
                                                                        cos, sin)}
    providers.update({f"vtu_decode_attention {b}": functools.partial(dymu_kernels.vtu_decode_attention, q1, k2, v2, map2,
                                                                     cos, sin, backend=b) for b in backends})
    providers["sdpa over expanded cache (floor)"] = functools.partial(F.scaled_dot_product_attention, q1r, k2e, v2e, **gqa)
    return rows + _time_providers("vtu_decode", shape, providers, device, dtype, min_run, auto)


def _time_providers(op, shape, providers, device, dtype, min_run, auto) -> List[Dict[str, object]]:
    rows, times = [], {}
    for name, fn in providers.items():
        row = {"op": op, "provider": name, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "auto_backend": auto}
        try:
            fn()
        except Exception as e:  # noqa: BLE001 — a backend that cannot run is a result too
            rows.append({**row, "unavailable": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            continue
        with torch.inference_mode():
            t = time_ms(fn, device, min_run_time=min_run)
        times[name] = t["ms"]
        rows.append({**row, **t})
    floor = next((v for k, v in times.items() if "floor" in k), None)
    ref_ms = next((v for k, v in times.items() if k.startswith("reference")), None)
    for r in rows:
        if "ms" in r:
            r["vs_floor"] = _ratio(r["ms"], floor)
            if "floor" not in r["provider"]:
                r["speedup_vs_reference"] = _ratio(ref_ms, r["ms"])
    return rows


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------


def _samples(value: str) -> int:
    n = int(value)
    if n < 3:
        raise argparse.ArgumentTypeError(f"must be >= 3 (a median and a spread need 3 samples), got {n}")
    return n


def _config(value: str) -> str:
    if value in ("stock", "threshold"):
        return value
    if value.startswith("r=") and value[2:].isdigit():
        return f"r={int(value[2:])}"
    raise argparse.ArgumentTypeError(f"a config is 'stock', 'threshold' or 'r=N' (e.g. r=21), got {value!r}")


def _trim(value: str):
    choices = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"must be auto, true or false, got {value!r}")
    return choices[value.lower()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Metrics and configurations: see the module docstring (python3 -c "
                                       "\"import benchmarks.bench_e2e as b; help(b)\") or the file's head.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", choices=("small", "7b"), default="small", help="language model shape (default small)")
    p.add_argument("--lm-layers", type=int, help="language model layers (default: small 8, 7b 32, quick 2)")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--batch", type=int, default=1, help="images (= prompts) per batch (default 1)")
    p.add_argument("--samples", type=_samples, default=3, help="timed runs per measurement, >= 3 (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones, >= 1 (default 1)")
    p.add_argument("--configs", type=_config, nargs="+", default=list(DEFAULT_CONFIGS),
                   help="subset of: stock r=N threshold (default: %(default)s); stock always runs first")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generate() makes (default 16)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "cpp", "torch"), help="apply_dymu backend")
    p.add_argument("--trim", type=_trim, metavar="{auto,true,false}",
                   help="apply_dymu(trim=...) where supported (default: apply_dymu's own default)")
    p.add_argument("--calib-images", type=int, default=len(PHOTOS), help=f"photographs for calibration (1..{len(PHOTOS)})")
    p.add_argument("--calib-batch", type=int, default=4, help="calibration batch size (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, %d here)" % torch.get_num_threads())
    p.add_argument("--quick", action="store_true", help="tiny CLIP and Llama: a smoke test of seconds")
    p.add_argument("--no-attention", action="store_true", help="skip the VTU attention micro-benchmark")
    p.add_argument("--attention-only", action="store_true", help="only the VTU attention micro-benchmark")
    p.add_argument("--results-dir", default=RESULTS_DIR, help="where rows and the chart go (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print only; write no rows or chart")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: no CUDA device is available to torch {torch.__version__} "
                f"({'a CPU-only build' if torch.version.cuda is None else 'CUDA ' + torch.version.cuda + ', no GPU visible'})")
    for name, lo in (("batch", 1), ("warmup", 1), ("new_tokens", 2), ("calib_batch", 1)):
        if getattr(args, name) < lo:
            p.error(f"--{name.replace('_', '-')} must be >= {lo}")
    if not 1 <= args.calib_images <= len(PHOTOS):
        p.error(f"--calib-images must be in 1..{len(PHOTOS)}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.lm_layers is not None and args.lm_layers < 1:
        p.error("--lm-layers must be >= 1")
    if args.no_attention and args.attention_only:
        p.error("--no-attention and --attention-only exclude each other")
    args.dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    if args.trim is not None:
        from dymu_kernels.hf import apply_dymu

        if "trim" not in inspect.signature(apply_dymu).parameters:
            p.error("--trim: this dymu_kernels' apply_dymu has no trim argument")
    configs = list(dict.fromkeys(args.configs))
    args.added_stock = "stock" not in configs
    args.configs = ["stock"] + [c for c in configs if c != "stock"]
    args.size_key = "quick" if args.quick else args.size
    if args.lm_layers is None:
        args.lm_layers = SIZES[args.size_key]["lm_layers"]
    return args, p


def run_e2e(args, parser):
    import transformers
    from tqdm.auto import tqdm

    from dymu_kernels.hf import dymu_stats, remove_dymu

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    notes = []
    config = llava_config(args.size_key, args.lm_layers)
    problem = check_memory(config, args.device, args.dtype)
    if problem:
        parser.error(f"--size {args.size} --lm-layers {args.lm_layers} --dtype {str(args.dtype)[6:]} on {args.device}: "
                     f"{problem}; use --size small, fewer --lm-layers or a GPU")
    t0 = time.perf_counter()
    model = build_model(config, args.device, args.dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    inputs = make_inputs(model, args.batch, args.device, args.dtype, args.seed)
    B, N = inputs["input_ids"].shape
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    spec = SIZES[args.size_key]
    print(f"model: {spec['name']}, {args.lm_layers} LM layers, {n_params / 1e6:.0f}M parameters, random weights, "
          f"{str(args.dtype)[6:]} on {args.device} (built in {time.perf_counter() - t0:.0f} s)")
    print(f"input: batch {B} x {N} positions ({patches} image placeholders + {N - patches} text tokens), "
          f"photos {[PHOTOS[i % len(PHOTOS)] for i in range(B)]}, generate {args.new_tokens} tokens; "
          f"{args.samples} timed samples after {args.warmup} warm-up; torch threads {torch.get_num_threads()}")
    if args.added_stock:
        notes.append("stock was added to --configs: every ratio is against it")

    thresholds = None
    if "threshold" in args.configs:
        photos = load_photos(PHOTOS[: args.calib_images], config.vision_config.image_size).to(args.device, args.dtype)
        try:
            t0 = time.perf_counter()
            thresholds = calibrate(model, photos, args.calib_batch, progress=sys.stderr.isatty())
            print(f"thresholds calibrated on {thresholds.num_images} photographs for r={CALIBRATION_R}/block in "
                  f"{time.perf_counter() - t0:.0f} s: " + ", ".join(f"{t:.3f}" for t in thresholds.thresholds))
            apply_config(model, "threshold", thresholds, args.backend, args.trim)
            with torch.inference_mode():
                model.model.get_image_features(pixel_values=photos, vision_feature_layer=config.vision_feature_layer,
                                               vision_feature_select_strategy=config.vision_feature_select_strategy)
            kept = dymu_stats(model).tokens_kept
            remove_dymu(model)
            target = patches - CALIBRATION_R * vision_blocks(model)
            print("threshold mode, image tokens kept per photograph: "
                  + ", ".join(f"{n} {k}" for n, k in zip(PHOTOS, kept))
                  + f" (mean {statistics.mean(kept):.0f}; fixed r={CALIBRATION_R} keeps {target})")
        except Exception as e:  # noqa: BLE001 — skip the config, keep the others
            remove_dymu(model)
            msg = f"threshold config skipped: calibrating this CLIP tower failed ({type(e).__name__}: {e})"
            print(msg)
            notes.append(msg)
            args.configs = [c for c in args.configs if c != "threshold"]

    results = []
    bar = tqdm(total=steps_per_config(args) * len(args.configs), unit="step", disable=None, dynamic_ncols=True)
    for c in args.configs:
        t0 = time.perf_counter()
        apply_config(model, c, thresholds, args.backend, args.trim)
        try:
            m = measure_config(model, c, inputs, args, bar)
        finally:
            remove_dymu(model)
        m["new_tokens"] = args.new_tokens
        if results:
            m["same_tokens_as_stock"] = bool(torch.equal(m["sequences"], results[0]["sequences"]))
        results.append(m)
        bar.write(f"{c}: prefill {m['prefill']['median']:.3f} s, generate {m['generate']['median']:.3f} s, "
                  f"{statistics.mean(m['tokens_kept']):.0f} image tokens kept ({time.perf_counter() - t0:.0f} s)")
    bar.close()

    common = {"size": args.size_key, "model": spec["name"], "lm_layers": args.lm_layers, "params": n_params,
              "dtype": str(args.dtype)[6:], "device_type": args.device, "batch": B, "positions": N,
              "image_tokens": patches, "text_tokens": N - patches, "new_tokens": args.new_tokens,
              "backend": args.backend, "trim": args.trim, "warmup": args.warmup}
    derive(results, B, args.new_tokens)
    rows = e2e_rows(results, common)
    for m in results:
        if not m["decode_ok"]:
            notes.append(f"{m['config']}: after generate() the KV cache covers {m['cache_positions']} positions, not "
                         f"{m['cache_positions_expected']} — decode steps did not run on the cache, so generate and "
                         "decode-step numbers of this config are not valid")
    return results, rows, notes


def main(argv=None) -> int:
    args, parser = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, parser)
    finally:
        torch.set_num_threads(threads)


def _main(args, parser) -> int:
    rows, notes, results = [], [], None
    if not args.attention_only:
        results, rows, notes = run_e2e(args, parser)
        stock = results[0]
        print()
        print(f"## End to end: {SIZES[args.size_key]['name']}, {args.lm_layers} LM layers, {str(args.dtype)[6:]}, "
              f"{args.device}, batch {args.batch}, {rows[0]['positions']} positions, {args.new_tokens} new tokens")
        print()
        print(markdown_table(results, stock))
        print()
        print(vision_table(results, stock))
        print()
        print("prefill / vision: median of %d runs (min–max); ×stock = config / stock (time, FLOPs: < 1 is cheaper; "
              "tok/s: > 1 is faster). decode ms/step = (generate - prefill) / %d; direct = median gap between "
              "consecutive generation steps. Peak memory: %s." % (args.samples, args.new_tokens - 1, stock["mem_method"]))
        n_vis = SIZES[args.size_key]["vision"]["num_hidden_layers"]
        print("FLOPs: FlopCounterMode, 2 per MAC of matmuls, convolutions and attention (causal attention halved; VTU "
              f"attention counted at the full length). Stock HF LLaVA runs all {n_vis} CLIP blocks though it reads "
              f"block {n_vis - 1}'s output; DyMU runs {n_vis - 1}.")
        for m in results[1:]:  # "a decode step is never slower than stock", within 5% noise
            ratios = [r for r in (_ratio(m["step_ms"], stock["step_ms"]), _ratio(m["direct_ms"], stock["direct_ms"]))
                      if r is not None and r > 0]
            if ratios and min(ratios) > 1.05:
                notes.append(f"{m['config']}: a decode step takes {' / '.join(f'{r:.2f}' for r in ratios)}x stock's "
                             "(subtraction / direct): slower than stock")
    if not args.no_attention:
        with torch.inference_mode():
            att = attention_rows(args.device, args.dtype, args.quick)
        print()
        print(f"## VTU attention ({args.device}, {str(args.dtype)[6:]}; backend='auto' picks {att[0]['auto_backend']})")
        print()
        print(attention_table(att))
        rows += att
    for n in notes:
        print(f"NOTE: {n}")
    if not args.no_save and rows:
        path = write_rows(f"e2e_{args.device}", rows, args.results_dir)
        print(f"\nrows appended to {path}")
        if results:
            env = environment()
            title = (f"DyMU vs stock — {SIZES[args.size_key]['name']}, {args.lm_layers} LM layers, {str(args.dtype)[6:]}, "
                     f"batch {args.batch}, random weights\n{env['device']}, torch {env['torch']}, commit {env['commit']}")
            png = os.path.join(args.results_dir, f"e2e_{args.device}.png")
            skipped = draw_chart(results, title, png)
            print(skipped or f"chart written to {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
