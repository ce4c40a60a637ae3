"""One engine's offline throughput (run by benchmarks/bench_vllm.py in the vLLM environment).

``python vllm_throughput.py JOB.json OUT.json``. JOB: ``{"model", "items": [{"prompt",
"image": PNG | "video": NPY of frames [T, H, W, 3]}], "requests", "new_tokens", "samples",
"dymu": engine_kwargs | null, "engine": {LLM kwargs}, "chat": [[turn prompts of conversation 0], ...] | absent}``;
request ``i`` is item ``i mod len(items)``.
Starts one ``LLM``, runs one untimed ``generate`` of all requests, then
``samples`` timed ones (the DyMU statistics count those only). Every request of every run gets an image of its own
(one pixel changed), so neither vLLM's encoder cache nor its processor cache
serves a repeat. With ``chat``, a run is a multi-turn chat: conversation ``c`` (item ``c mod len(items)``'s image,
new per run) sends its turns' prompts one ``generate`` call per turn, all conversations together — each turn's
prompt extends the one before (what prefix caching serves), and every conversation starts with the same system
prompt. OUT: seconds per run, tokens, startup seconds, the model's
DyMU statistics and the worker's thread count and versions (chat: also each request's time to first token,
``ttft_s``, and the prompt tokens vLLM found cached, ``cached_tokens``, over the timed runs).
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: stats readable


def _probe(model):
    import torch

    from dymu_kernels.vllm import model_stats

    return {"threads": torch.get_num_threads(), "stats": model_stats(model)}


def _reset_stats(model):
    """Zero the model's DyMU statistics after the untimed run, so that they
    count the timed runs only."""
    from dymu_kernels.vllm.model import ServingStats

    if getattr(model, "dymu_stats", None) is not None:
        model.dymu_stats = ServingStats()


def main(job_path: str, out_path: str) -> None:
    import numpy as np
    import torch
    import transformers
    import vllm
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm_folder import video_item  # this script's folder

    job = json.load(open(job_path))
    if "kv_cache_memory_bytes" not in job.get("engine", {}):  # (on the CPU the variable wins over the argument)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")  # GiB: enough for the batch, leaves the machine its memory
    kwargs = dict(model=job["model"], seed=0, max_model_len=2048)
    if job.get("chat"):  # per-request timings (first token) need vLLM's statistics
        kwargs["disable_log_stats"] = False
    if job.get("dymu") is not None:
        from dymu_kernels.vllm import engine_kwargs

        kwargs.update(engine_kwargs(**job["dymu"], **job.get("engine", {})))  # the job's engine settings win
    else:
        kwargs.update(job.get("engine", {}))
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    items = [(item["prompt"], "image" if "image" in item else "video",
              np.asarray(Image.open(item["image"]).convert("RGB")) if "image" in item else np.load(item["video"]))
             for item in job["items"]]
    params = SamplingParams(temperature=0, max_tokens=job["new_tokens"], ignore_eos=True)

    def requests(run: int):
        out = []
        for i in range(job["requests"]):
            prompt, kind, pixels = items[i % len(items)]
            pixels = pixels.copy()
            pixels.flat[0] = (int(pixels.flat[0]) + run + 1) % 256  # a new image / video for the caches
            data = Image.fromarray(pixels) if kind == "image" else video_item(pixels)
            out.append({"prompt": prompt, "multi_modal_data": {kind: data}})
        return out

    def chat_turns(run: int):
        """The chat's turns of one run: per turn, the conversations' requests."""
        turns = []
        for t in range(len(job["chat"][0])):
            batch = []
            for c, conversation in enumerate(job["chat"]):
                _, kind, pixels = items[c % len(items)]
                pixels = pixels.copy()
                pixels.flat[0] = (int(pixels.flat[0]) + run + 1) % 256  # a new image per run, kept over its turns
                data = Image.fromarray(pixels) if kind == "image" else video_item(pixels)
                batch.append({"prompt": conversation[t], "multi_modal_data": {kind: data}})
            turns.append(batch)
        return turns

    times, prompt_tokens, output_tokens, ttft, cached = [], 0, 0, [], []
    for run in range(job["samples"] + 1):
        batches = chat_turns(run) if job.get("chat") else [requests(run)]
        t = time.perf_counter()
        gens = [g for batch in batches for g in llm.generate(batch, params, use_tqdm=False)]
        elapsed = time.perf_counter() - t
        if run:  # run 0 warms up
            times.append(elapsed)
            if job.get("chat"):
                ttft += [g.metrics.first_token_latency for g in gens]
                cached += [g.num_cached_tokens or 0 for g in gens]
        else:
            llm.apply_model(_reset_stats)
        prompt_tokens = sum(len(g.prompt_token_ids) for g in gens)
        output_tokens = sum(len(g.outputs[0].token_ids) for g in gens)
    probe = llm.apply_model(_probe)[0]
    json.dump({"seconds": times, "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
               "startup_s": startup, "vllm": vllm.__version__, "vllm_transformers": transformers.__version__,
               "vllm_torch": torch.__version__, "ttft_s": ttft, "cached_tokens": cached, **probe},
              open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
