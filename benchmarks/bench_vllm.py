"""Offline throughput of vLLM with and without the DyMU plugin, side by side.

    python3 benchmarks/bench_vllm.py                 # CPU: the small LLaVA of bench_e2e.py
    python3 benchmarks/bench_vllm.py --size quick    # a tiny model, seconds
    python3 benchmarks/bench_vllm.py --family qwen2_5_vl --configs stock,r=24,threshold,stock --requests 4
                                                     # Qwen2.5-VL (3B widths, cut): photographs and a video
    python3 benchmarks/bench_vllm.py --family qwen3_vl --configs stock,r=20,threshold,stock --requests 4
                                                     # Qwen3-VL (4B widths, cut; deepstack): the same requests
    python3 benchmarks/bench_vllm.py --family qwen3_5 --configs stock,r=20,threshold,stock --requests 4
                                                     # Qwen3.5 (9B widths, cut; hybrid, bfloat16): the same
    python3 benchmarks/bench_vllm.py --workload chat --configs stock,r=21,stock --requests 4 --turns 3
                                                     # multi-turn chats over an image, prefix caching on

Builds bench_e2e.py's random LLaVA (CLIP ViT-L/14-336 + an 8-layer 1B-class
Llama at ``small``), saves it as a vLLM folder (benchmarks/vllm_folder.py),
calibrates DyMU thresholds for its tower on the photographs (r = 21 merges
per block on average, the paper's "low"), then starts one engine per
configuration in the vLLM environment (scripts/setup_vllm.sh) and times
``LLM.generate`` of ``--requests`` image prompts (66 text tokens around the
image, ``--new-tokens`` generated, EOS ignored) over ``--samples`` runs:

- ``stock``: vLLM without the plugin (``VLLM_PLUGINS=none``), eager, as the
  plugin runs — the like-for-like baseline the ratios use;
- ``r=21``: DyMU merging 21 tokens per block; ``threshold``: DyMU with the
  calibrated thresholds (both eager);
- ``<config>-compiled``: the same under torch.compile — stock with vLLM's
  defaults (CUDA graphs too on a GPU), DyMU with ``enforce_eager=False``
  (steps where nothing merged, decode among them, run compiled; see
  dymu_kernels/vllm/model.py).

``stock`` runs first and last by default: the machine's speed drifts over the
minutes a run takes, so the baseline of every ratio pools the samples of both
``stock`` engines, and their two medians show the drift.

Rows (``vllm_<device>.jsonl/.md`` under benchmarks/results/) carry requests/s
and tokens/s (median and spread), the time ratio to ``stock``, and what DyMU
saved and kept at full length: vision tokens kept, the language model's
token-wise work (rows / positions), while attention and the KV cache run at
every position (vLLM fixes the placeholder count before the tower runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_e2e  # noqa: E402
import bench_qwen  # noqa: E402
from common import add_run_args, check_run_args, environment, print_table, summarize, write_rows  # noqa: E402
from vllm_folder import save_llava_folder  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VLLM_PYTHON = os.path.join(ROOT, "build", "vllm-env", "bin", "python")
CONFIGS = ("stock", "r=21", "threshold")  # each also "<config>-compiled"


def engine_spec(config: str, thresholds_path: str):
    """(plugins env value or None, dymu engine_kwargs or None, LLM kwargs) of a configuration."""
    base, compiled = (config[:-len("-compiled")], True) if config.endswith("-compiled") else (config, False)
    if base == "stock":
        # Eager as DyMU's engines on the CPU (engine_kwargs); prefix caching as vLLM sets it, on both sides.
        return "none", None, ({} if compiled else {"enforce_eager": True})
    if base.startswith("r=") and base[2:].isdigit():
        dymu = {"r": int(base[2:])}
    elif base == "threshold":
        dymu = {"thresholds": thresholds_path}
    else:
        raise ValueError(f"unknown config {config!r}; expected one of {CONFIGS} or r=N, each optionally -compiled")
    return None, dymu, ({"enforce_eager": False} if compiled else {})


def prompt_text(config) -> str:
    """BOS, text, one ``<image>`` (the processor expands it), text: 66 text tokens as in bench_e2e.py."""
    words = [f"w{3 + (7 * i) % (config.image_token_id - 3)}" for i in range(bench_e2e.TEXT_BEFORE + bench_e2e.TEXT_AFTER - 1)]
    before, after = words[: bench_e2e.TEXT_BEFORE - 1], words[bench_e2e.TEXT_BEFORE - 1:]
    return " ".join(["<s>", *before, "<image>", *after])


def chat_prompts(config, conversations: int, turns: int):
    """A multi-turn chat per conversation: the first turn is the throughput
    prompt (the system words, the image, a question); each later turn appends
    an answer (12 words, as if generated) and a new question (8 words, its
    own per conversation and turn). ``[[turn prompts] per conversation]``."""
    vocab = config.image_token_id - 3

    def words(seed: int, n: int) -> str:
        return " ".join(f"w{3 + (seed * 31 + 17 * i) % vocab}" for i in range(n))

    out = []
    for c in range(conversations):
        text, prompts = prompt_text(config), []
        for t in range(turns):
            if t:
                text += f" {words(1000 + 10 * c + t, 12)} {words(2000 + 10 * c + t, 8)}"
            prompts.append(text)
        out.append(prompts)
    return out


def save_photos(folder: str, size: int):
    """bench_e2e.py's photographs, square at the tower's size, as PNG files."""
    import skimage.data
    from PIL import Image

    paths = []
    for name in bench_e2e.PHOTOS:
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((size, size), Image.BICUBIC)
        paths.append(os.path.join(folder, f"{name}.png"))
        img.save(paths[-1])
    return paths


def prepare_llava(args, folder: str):
    """bench_e2e.py's random LLaVA saved for vLLM, thresholds calibrated on the
    photographs, one image request per photograph: ``(model dir, items,
    thresholds file, LM layers)``."""
    spec = bench_e2e.SIZES[args.size]
    lm_layers = args.lm_layers or spec["lm_layers"]
    config = bench_e2e.llava_config(args.size, lm_layers)
    model = bench_e2e.build_model(config, "cpu", torch.float32, seed=0)
    size = config.vision_config.image_size
    photos = save_photos(folder, size)
    print(f"[bench_vllm] calibrating thresholds for the random tower ({spec['name']})", flush=True)
    thresholds = bench_e2e.calibrate(model, bench_e2e.load_photos(bench_e2e.PHOTOS, size), batch=4, progress=False)
    thresholds_path = os.path.join(folder, "thresholds.json")
    thresholds.save(thresholds_path)
    model_dir = os.path.join(folder, "model")
    save_llava_folder(model, model_dir)
    prompt = prompt_text(config)
    chat = chat_prompts(config, args.requests, args.turns) if args.workload == "chat" else None
    return model_dir, [{"prompt": prompt, "image": p} for p in photos], thresholds_path, lm_layers, chat


QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": bench_qwen.IMG, "<|video_pad|>": bench_qwen.VID}


# Per family: the widths it is served at (bench_qwen.py), its tower blocks, and the photographs' side.
QWEN_SERVED = {"qwen2_5_vl": {"widths": "3b", "name": "Qwen2.5-VL (3B widths, cut)", "video_side": 252},
               "qwen3_vl": {"widths": "4b", "name": "Qwen3-VL (4B widths, cut)", "video_side": 256},
               # Served in bfloat16 on the CPU (vLLM's CPU Gated DeltaNet takes nothing else)
               "qwen3_5": {"widths": "9b", "name": "Qwen3.5 (9B widths, cut)", "video_side": 256,
                           "cpu_dtype": "bfloat16"}}


def prepare_qwen(args, folder: str):
    """bench_qwen.py's random Qwen2.5-VL (3B widths) or Qwen3-VL (4B widths:
    deepstack taps, interleaved M-RoPE), cut to 8 tower + ``--lm-layers``
    blocks (``--size quick``: tiny widths), saved for vLLM with a byte-level
    tokenizer at the released token ids and the 448-px processor (written in
    the vLLM environment: its processors need torchvision); per-block
    thresholds calibrated on the photographs for ``--calibrate-r`` (default:
    24 for Qwen2.5-VL's 256 units of a 448-px photograph, 20 for Qwen3-VL's
    196); requests: 448 × 448 photographs and, every fourth, bench_qwen.py's
    8-frame video panning over the first (252 / 256 px: two patches' multiple)."""
    quick = args.size == "quick"
    served = QWEN_SERVED[args.family]
    vision_layers, lm_layers = (4, 2) if quick else (8, args.lm_layers or 4)
    model = bench_qwen.build(args.family, "quick-vllm" if quick else served["widths"], vision_layers, lm_layers,
                             seed=0)
    model.config.architectures = [type(model).__name__]  # what vLLM picks its model class by
    model_dir = os.path.join(folder, "model")
    model.save_pretrained(model_dir)
    r = args.calibrate_r or (24 if args.family == "qwen2_5_vl" else 20)
    thresholds = bench_qwen.calibrate(model, r, vision_layers, "cpu", torch.float32, family=args.family)
    thresholds_path = os.path.join(folder, "thresholds.json")
    thresholds.save(thresholds_path)
    del model
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import vllm_folder as f; "
            "f.save_qwen_processor(sys.argv[4], sys.argv[2], f.qwen_tokenizer(json.loads(sys.argv[3])), "
            "min_pixels=56 * 56, max_pixels=448 * 448)")
    proc = subprocess.run([args.vllm_python, "-c", code, os.path.dirname(os.path.abspath(__file__)), model_dir,
                           json.dumps(QWEN_IDS), args.family], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[bench_vllm] the Qwen processor could not be saved:\n{proc.stderr[-3000:]}")
    photos = bench_qwen.photographs(bench_qwen.PHOTOS, 448)
    items = []
    for i, photo in enumerate(photos):
        path = os.path.join(folder, f"photo{i}.png")
        photo.save(path)
        items.append({"prompt": qwen_prompt("image", "Describe this photograph in a few words."), "image": path})
    frames, side = np.asarray(photos[0]), served["video_side"]
    video = np.stack([frames[20 * f: 20 * f + side, 20 * f: 20 * f + side] for f in range(8)])  # panning
    np.save(os.path.join(folder, "video.npy"), video)
    items.insert(3, {"prompt": qwen_prompt("video", "What happens in this video?"),
                     "video": os.path.join(folder, "video.npy")})
    return model_dir, items, thresholds_path, lm_layers, None


def qwen_prompt(kind: str, text: str) -> str:
    return (f"<|im_start|>user\n<|vision_start|><|{kind}_pad|><|vision_end|>{text}<|im_end|>\n"
            "<|im_start|>assistant\n")


# The tiny model's KV cache needs a few MiB: zeroing vllm_throughput.py's default (4 GiB) would be most of a
# quick engine's start.
QUICK_KV = {"quick": {"kv_cache_memory_bytes": 256 * 2**20}}


def run_engine(vllm_python: str, job: dict, plugins, folder: str, name: str) -> dict:
    job_path, out_path = os.path.join(folder, f"{name}.job.json"), os.path.join(folder, f"{name}.out.json")
    json.dump(job, open(job_path, "w"))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    proc = subprocess.run([vllm_python, os.path.join(ROOT, "benchmarks", "vllm_throughput.py"), job_path, out_path],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[bench_vllm] {name} failed:\n{proc.stderr[-4000:]}")
    return json.load(open(out_path))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("llava",) + tuple(QWEN_SERVED), default="llava")
    parser.add_argument("--size", choices=("small", "quick"), default="small")
    parser.add_argument("--lm-layers", type=int, default=None, help="language-model layers (default: the size's)")
    parser.add_argument("--configs", default="stock,r=21,threshold,stock",
                        help=f"comma list of {CONFIGS} or r=N, each optionally -compiled, in run order (a config may repeat)")
    parser.add_argument("--requests", type=int, default=8, help="requests per run (chat: conversations)")
    parser.add_argument("--workload", choices=("throughput", "chat"), default="throughput",
                        help="chat: --turns turns per conversation over its image, one generate call per turn, "
                             "prefix caching on (vLLM's default) in every engine; LLaVA only")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--calibrate-r", type=int, default=None,
                        help="Qwen: the r the thresholds are calibrated for (default 24 Qwen2.5-VL, 20 Qwen3-VL)")
    parser.add_argument("--dtype", default=None, help="vLLM dtype (default float32 on the CPU, Qwen3.5 bfloat16; "
                        "auto on CUDA)")
    parser.add_argument("--vllm-python", default=os.environ.get("DYMU_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
    parser.add_argument("--work-dir", default=None, help="where the model folder goes (default: a temporary one)")
    add_run_args(parser, samples=3)
    args = parser.parse_args(argv)
    check_run_args(parser, args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        engine_spec(c, "")
    if "stock" not in configs:
        parser.error("--configs must include 'stock' (the baseline of the ratios)")
    if args.workload == "chat" and args.family != "llava":
        parser.error("--workload chat runs the LLaVA model (--family llava)")
    if args.turns < 1:
        parser.error("--turns must be >= 1")
    if not os.path.exists(args.vllm_python):
        parser.error(f"no vLLM environment at {args.vllm_python}: run bash scripts/setup_vllm.sh")
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("auto" if cuda else QWEN_SERVED.get(args.family, {}).get("cpu_dtype", "float32"))

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work_dir or tmp
        os.makedirs(folder, exist_ok=True)
        if args.family == "llava":
            model_dir, items, thresholds_path, lm_layers, chat = prepare_llava(args, folder)
        else:
            model_dir, items, thresholds_path, lm_layers, chat = prepare_qwen(args, folder)
        runs_requests = args.requests * (args.turns if chat else 1)  # requests per timed run
        rows, stock_samples = [], []
        for i, c in enumerate(configs):
            plugins, dymu, engine = engine_spec(c, thresholds_path)
            job = {"model": model_dir, "items": items, "requests": args.requests,
                   "new_tokens": args.new_tokens, "samples": args.samples, "dymu": dymu,
                   "engine": {"dtype": dtype, **QUICK_KV.get(args.size, {}), **engine}}
            if chat:
                job["chat"] = chat
            print(f"[bench_vllm] {c}: starting an engine", flush=True)
            out = run_engine(args.vllm_python, job, plugins, folder, f"{i}_{c.replace('=', '')}")
            s = summarize(out["seconds"])
            stats = out.get("stats") or {}
            row = {"bench": "vllm_offline" if not chat else "vllm_chat", "family": args.family, "size": args.size,
                   "lm_layers": lm_layers, "config": c,
                   "requests": runs_requests, "new_tokens": args.new_tokens, "prompt_tokens": out["prompt_tokens"],
                   "output_tokens": out["output_tokens"], "seconds": s,
                   "requests_per_s": runs_requests / s["median"], "output_tokens_per_s": out["output_tokens"] / s["median"],
                   "total_tokens_per_s": (out["prompt_tokens"] + out["output_tokens"]) / s["median"],
                   "startup_s": out["startup_s"], "worker_threads": out["threads"], "vllm": out["vllm"],
                   "vllm_transformers": out["vllm_transformers"], "vllm_torch": out["vllm_torch"], "vllm_dtype": dtype,
                   "vision_kept_fraction": stats.get("tower_kept_fraction", 1.0),
                   "llm_tokenwise_fraction": stats.get("llm_tokenwise_fraction", 1.0),
                   "attention_kv_fraction": 1.0}  # every placeholder keeps its position and KV entry
            if chat:
                row.update(conversations=args.requests, turns=args.turns, ttft_s=summarize(out["ttft_s"]),
                           cached_prompt_fraction=sum(out["cached_tokens"]) / (out["prompt_tokens"] * args.samples))
            if c == "stock":
                stock_samples += out["seconds"]
            rows.append(row)
        stock_median = summarize(stock_samples)["median"]  # every stock engine's samples, pooled
        for row in rows:
            row["stock_samples_pooled"] = len(stock_samples)
            row["time_ratio_vs_stock"] = row["seconds"]["median"] / stock_median
            row["speedup_vs_stock"] = stock_median / row["seconds"]["median"]
    columns = ["config", "requests_per_s", "output_tokens_per_s", "time_ratio_vs_stock", "speedup_vs_stock",
               "vision_kept_fraction", "llm_tokenwise_fraction", "startup_s"]
    print_table(rows, columns + (["cached_prompt_fraction"] if chat else []))
    if not args.no_save:
        env = environment()
        prefix = {"llava": "", "qwen2_5_vl": "qwen_", "qwen3_vl": "qwen3_", "qwen3_5": "qwen3_5_"}[args.family]
        name = f"vllm_{prefix}{'chat_' if chat else ''}{'cuda' if cuda else 'cpu'}"
        path = write_rows(name, rows, args.results_dir)
        with open(os.path.join(args.results_dir, f"{name}.md"), "w") as f:
            f.write(markdown(rows, env))
        print(f"[bench_vllm] rows appended to {path}")
    return 0


def markdown(rows, env) -> str:
    r0 = rows[0]
    if r0["bench"] == "vllm_chat":
        return chat_markdown(rows, env)
    model = "LLaVA" if r0["family"] == "llava" else QWEN_SERVED[r0["family"]]["name"]
    lines = [f"# vLLM offline throughput, {r0['size']} {model} ({r0['lm_layers']} LM layers), with and without DyMU", "",
             f"{env['device']}; vLLM {r0['vllm']} (torch {r0['vllm_torch']}, transformers {r0['vllm_transformers']}), "
             f"commit {env['commit']}, {env['date']}. {r0['requests']} requests of {r0['prompt_tokens'] // r0['requests']} "
             f"prompt tokens (one image or video each), {r0['new_tokens']} new tokens each; median (min-max) of "
             f"{r0['seconds']['n_samples']} runs per engine, in the order below; ratios against the median of all "
             f"{r0['stock_samples_pooled']} stock samples.", "",
             "| config | s per run | requests/s | output tok/s | time vs stock | vision tokens kept | LLM token-wise work | attention + KV positions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['config']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {r['requests_per_s']:.3f} | "
                     f"{r['output_tokens_per_s']:.2f} | {r['time_ratio_vs_stock']:.2f}x | {r['vision_kept_fraction']:.1%} | "
                     f"{r['llm_tokenwise_fraction']:.1%} | 100% |")
    return "\n".join(lines) + "\n"


def chat_markdown(rows, env) -> str:
    r0 = rows[0]
    lines = [f"# vLLM multi-turn chat, {r0['size']} LLaVA ({r0['lm_layers']} LM layers), prefix caching on, with and "
             "without DyMU", "",
             f"{env['device']}; vLLM {r0['vllm']} (torch {r0['vllm_torch']}, transformers {r0['vllm_transformers']}), "
             f"commit {env['commit']}, {env['date']}. {r0['conversations']} conversations of {r0['turns']} turns over "
             f"their image (one generate call per turn, {r0['new_tokens']} new tokens each; every prompt extends the "
             f"previous turn's); median (min-max) of {r0['seconds']['n_samples']} runs per engine, in the order below; "
             f"ratios against the median of all {r0['stock_samples_pooled']} stock samples.", "",
             "| config | s per run | requests/s | time vs stock | time to first token, s: mean (median, max) | "
             "prompt tokens cached | vision tokens kept | LLM token-wise work |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        s, t = r["seconds"], r["ttft_s"]
        mean = sum(t["samples"]) / len(t["samples"])  # first turns wait for the image prefills, later ones hit the cache
        lines.append(f"| {r['config']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | {r['requests_per_s']:.3f} | "
                     f"{r['time_ratio_vs_stock']:.2f}x | {mean:.2f} ({t['median']:.2f}, {t['max']:.2f}) | "
                     f"{r['cached_prompt_fraction']:.1%} | {r['vision_kept_fraction']:.1%} | "
                     f"{r['llm_tokenwise_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
