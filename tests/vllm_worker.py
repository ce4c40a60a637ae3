"""Runs vLLM on a job file and writes what it generated (run by the vLLM tests).

Runs inside the vLLM environment (scripts/setup_vllm.sh), never imported by
the test suite itself: ``python vllm_worker.py JOB.json OUT.json``.

JOB: ``{"engines": [{"name", "model": DIR, "plugin": bool (default true), "env": {variables},
"engine": {LLM kwargs}, "dymu": {engine_kwargs} | null, "prompt_logprobs": bool, "probe_nonfinite": bool, "rank1_disagrees": bool, "batches": {name: [{"prompt", "images": [PNG paths],
"videos": [NPY paths of frames]}]}, "max_tokens", "ignore_eos", "rejects": {name: {"prompt", "images",
"mm_processor_kwargs"}}}], "folders": [{"model": DIR, "kind", "requests": {name: request}, "dump": PT path}],
"scripts": [{"name", "code": Python source}]}``.
Each folder is made first: a tiny Qwen-VL or LLaVA-OneVision of that kind saved at DIR
(``benchmarks/vllm_folder.py``) and its processor's outputs per request dumped (what transformers is then
given). Engines run one after another in this process (a process start is most of a tiny engine's cost):
those with ``"plugin": false`` are vLLM without the plugin (``VLLM_PLUGINS=none``) and come first; vLLM then
loads the plugin from its entry point for the rest, as a fresh process would. ``env`` holds variables for one
engine (its worker processes inherit them). Each engine is probed first where its spec says (``_nonfinite_probe``), then sent its rejects (each one request that must
fail), then serves all its batches (each batch one ``generate`` call, in order: a later batch can hit
the prefix cache of an earlier one). Scripts run last, in this process
with the plugin loaded, each as ``__main__`` (the README's example: a fresh process would import vLLM again).
OUT: ``{engine: {batch: [{"tokens", "logprobs", "prompt_token_ids", "cached", "prompt_logprobs" (where asked:
from the second prompt token on)}], "stats": {...} | null, "rejects": {name: error | null},
"tower_linears": [the DyMU tower's nn.Linear layers, those on vLLM's CPU GEMM] | null (one-worker engines),
"nonfinite": _nonfinite_probe's result (engines with "probe_nonfinite"), "stats_other_ranks": [...] (tensor
parallel; "rank1_disagrees": rank 1 merges otherwise, see _Rank1Disagrees)}}``
or ``{engine: {"error": message}}`` when the engine refused to start; ``{script: {"stdout", "error":
traceback | null}}``.
"""

import contextlib
import gc
import json
import os
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: stats readable
# The KV cache of each engine, unless its spec gives one: the tiny models need a few MiB (vLLM's CPU default
# takes most of the machine's memory; zeroing even 1 GiB costs each engine start a second).
KV_CACHE_BYTES = 128 * 2**20
# benchmarks/vllm_folder.py: the tiny model folders and vLLM's video items.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


def _mm_data(req):
    import numpy as np
    from PIL import Image
    from vllm_folder import video_item

    data = {}
    if req.get("images"):
        data["image"] = [Image.open(p).convert("RGB") for p in req["images"]]
    if req.get("videos"):
        data["video"] = [video_item(np.load(p)) for p in req["videos"]]
    return data


def _save_folder(model_dir: str, spec) -> None:
    """Save the tiny model of ``spec["kind"]`` (a Qwen-VL or LLaVA-OneVision)
    and dump its processor's outputs per request."""
    import torch
    from transformers.video_utils import VideoMetadata

    import vllm_folder

    kind = spec["kind"]
    if kind == "llava_onevision":
        processor = vllm_folder.save_onevision_folder(model_dir)
    else:
        processor = vllm_folder.save_qwen_folder(kind, model_dir)
    dumped = {}
    for name, req in spec["requests"].items():
        data = _mm_data(req)
        kwargs = {}
        if "image" in data:
            kwargs["images"] = data["image"]
        if "video" in data:
            kwargs["videos"] = [frames for frames, _ in data["video"]]
            if kind != "llava_onevision":  # Qwen's video processors need the frames' metadata
                kwargs["video_metadata"] = [VideoMetadata(**{k: v for k, v in meta.items() if k != "do_sample_frames"})
                                            for _, meta in data["video"]]
                kwargs["do_sample_frames"] = False
        enc = processor(text=[req["prompt"]], return_tensors="pt", **kwargs)
        dumped[name] = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
    torch.save(dumped, spec["dump"])


def _tower_linears(model):
    """``[nn.Linear layers of the DyMU tower, those on vLLM's CPU GEMM]``; None without DyMU."""
    import torch

    if getattr(model, "dymu", None) is None:
        return None
    layers = [m for m in getattr(model, model.dymu_tower_attr).modules() if isinstance(m, torch.nn.Linear)]
    return [len(layers), sum(hasattr(m, "cpu_linear") for m in layers)]


def _nonfinite_probe(model):
    """The DyMU tower encoding an image whose tower output overflows (its first
    layer's weights scaled by 1e30), in the engine's own model: ``{"rows":
    placeholders, "unique": unique rows, "nonfinite_rows": crops left unmerged}``
    or ``{"error": message}``. The weights are restored after."""
    import torch

    from dymu_kernels.vllm.groups import untag_pieces

    tower = getattr(model, model.dymu_tower_attr)
    first = next(m for m in tower.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    size = model.config.vision_config.image_size
    before = model._dymu_encoded.nonfinite_rows
    saved = first.weight.detach().clone()
    try:
        with torch.no_grad():
            first.weight.mul_(1e30)
            tagged = model._dymu_encode("image", torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)),
                                        {})
    except Exception as e:  # the test shows it
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        with torch.no_grad():
            first.weight.copy_(saved)
    _, ids = untag_pieces(tagged)
    out = {"rows": int(ids[0].numel()), "unique": int(ids[0].unique().numel()),
           "nonfinite_rows": model._dymu_encoded.nonfinite_rows - before}
    model._dymu_encoded = type(model._dymu_encoded)()  # not an item vLLM encoded: not counted
    return out


# Run at the start of each worker process of an engine under _Rank1Disagrees (a sitecustomize module).
_RANK1_NOISE = """
import torch
from vllm.distributed import get_tp_group

from dymu_kernels.vllm.model import DyMUServing

_encode = DyMUServing._dymu_encode


def _noisy(model, modality, pixels, vision_kwargs):
    if get_tp_group().rank_in_group == 1:
        noise = torch.randn(pixels.shape, generator=torch.Generator().manual_seed(1))
        pixels = pixels + noise.to(pixels)
    return _encode(model, modality, pixels, vision_kwargs)


DyMUServing._dymu_encode = _noisy
"""


class _Rank1Disagrees:
    """While held, tensor-parallel rank 1's DToMe tower sees other pixels than
    rank 0's (noise added), so the ranks decide other merges. vLLM's CPU
    platform spawns its workers: they get the patch from a sitecustomize
    module on their PYTHONPATH (this process is not a rank)."""

    def __enter__(self):
        import tempfile

        self.folder = tempfile.TemporaryDirectory()
        open(os.path.join(self.folder.name, "sitecustomize.py"), "w").write(_RANK1_NOISE)
        self.saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (self.folder.name, self.saved) if p)

    def __exit__(self, *exc):
        if self.saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = self.saved
        self.folder.cleanup()


class _Environment:
    """The variables one engine runs under: set before it starts, restored after
    (vLLM caches its variables once an engine is up: the cache is reset)."""

    def __init__(self, values):
        self.values, self.saved = values, {}

    def __enter__(self):
        import vllm.envs

        for key, value in self.values.items():
            self.saved[key] = os.environ.get(key)
            os.environ[key] = value
        vllm.envs.disable_envs_cache()

    def __exit__(self, *exc):
        import vllm.envs

        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        vllm.envs.disable_envs_cache()


def _load_plugin_from_now_on() -> None:
    """vLLM loads its general plugins once per process: after the engines without
    the plugin, let it load them (from the entry point) at the next engine's
    start, and forget the model classes it resolved per model folder (else the
    plugin's engines would get the stock classes the first engines resolved)."""
    import vllm.envs
    import vllm.plugins
    from vllm.model_executor.model_loader import utils

    os.environ.pop("VLLM_PLUGINS", None)
    vllm.envs.disable_envs_cache()
    vllm.plugins.plugins_loaded = False
    utils._MODEL_ARCH_BY_HASH.clear()


def _serve(llm, spec) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 6), logprobs=0,
                            ignore_eos=spec.get("ignore_eos", False),
                            prompt_logprobs=0 if spec.get("prompt_logprobs") else None)
    out = {"rejects": {}}
    for name, req in spec.get("rejects", {}).items():
        item = {"prompt": req["prompt"], "multi_modal_data": _mm_data(req)}
        if req.get("mm_processor_kwargs"):
            item["mm_processor_kwargs"] = req["mm_processor_kwargs"]
        try:
            llm.generate([item], params, use_tqdm=False)
            out["rejects"][name] = None
        except Exception as e:  # the engine's batches below show it still serves
            out["rejects"][name] = f"{type(e).__name__}: {e}"
    for name, batch in spec["batches"].items():
        prompts = []
        for req in batch:
            item = {"prompt": req["prompt"]}
            if req.get("images") or req.get("videos"):
                item["multi_modal_data"] = _mm_data(req)
            prompts.append(item)
        gens = llm.generate(prompts, params, use_tqdm=False)
        out[name] = [{"tokens": list(g.outputs[0].token_ids), "prompt_token_ids": list(g.prompt_token_ids),
                      "logprobs": [lp[t].logprob for lp, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)],
                      "cached": g.num_cached_tokens}  # the prompt tokens its prefix-cache hit covered
                     for g in gens]
        if spec.get("prompt_logprobs"):  # each prompt token's log-probability after the ones before it
            for o, g in zip(out[name], gens):
                o["prompt_logprobs"] = [lp[t].logprob for lp, t in zip(g.prompt_logprobs[1:], g.prompt_token_ids[1:])]
    return out


def main(job_path: str, out_path: str) -> None:
    job = json.load(open(job_path))
    for folder in job.get("folders", []):
        _save_folder(folder["model"], folder)
    engines = job["engines"]
    stock = [spec.get("plugin", True) is False for spec in engines]
    if stock != sorted(stock, reverse=True):
        raise ValueError("engines without the plugin must come before those with it (vLLM loads plugins once)")
    if any(stock):
        os.environ["VLLM_PLUGINS"] = "none"
    from vllm import LLM

    results = {}
    for spec, without_plugin in zip(engines, stock):
        if not without_plugin and os.environ.get("VLLM_PLUGINS") == "none":
            _load_plugin_from_now_on()
        kwargs = dict(dict(model=spec["model"], dtype="float32", seed=0, max_model_len=1024,
                           kv_cache_memory_bytes=KV_CACHE_BYTES), **spec.get("engine", {}))
        if spec.get("dymu") is not None:
            from dymu_kernels.vllm import engine_kwargs

            kwargs.update(engine_kwargs(**spec["dymu"]))
            kwargs.update(spec.get("engine", {}))
        start = time.perf_counter()
        disagree = _Rank1Disagrees() if spec.get("rank1_disagrees") else contextlib.nullcontext()
        with _Environment(spec.get("env", {})), disagree:
            try:
                llm = LLM(**kwargs)
            except Exception as e:  # the refusals the tests check
                results[spec["name"]] = {"error": f"{type(e).__name__}: {e}"}
                continue
            probe = llm.apply_model(_nonfinite_probe)[0] if spec.get("probe_nonfinite") else None
            out = _serve(llm, spec)  # (after a probe: the engine serves on)
            if probe is not None:
                out["nonfinite"] = probe
            from dymu_kernels.vllm import serving_stats

            out["stats"], *others = serving_stats(llm)
            if others:  # tensor-parallel ranks 1, 2, ...
                out["stats_other_ranks"] = others
            if kwargs.get("tensor_parallel_size", 1) == 1:  # (a function of this script reaches no worker process)
                out["tower_linears"] = llm.apply_model(_tower_linears)[0]
            del llm
            gc.collect()
            out["seconds"] = time.perf_counter() - start  # start, serve, stop: where a test's time goes
            results[spec["name"]] = out
    for script in job.get("scripts", []):
        if os.environ.get("VLLM_PLUGINS") == "none":
            _load_plugin_from_now_on()
        # A script's LLM() passes no KV size (the README's does not): 1 GiB, not the CPU platform's default of
        # most of the machine's memory.
        with _Environment({"VLLM_CPU_KVCACHE_SPACE": "1"}):
            results[script["name"]] = _run_script(script)
    json.dump(results, open(out_path, "w"))


def _run_script(script) -> dict:
    import contextlib
    import io
    import traceback

    stdout, error = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(stdout):
            exec(compile(script["code"], script["name"], "exec"), {"__name__": "__main__"})
    except Exception:  # the test shows it
        error = traceback.format_exc()
    gc.collect()
    return {"stdout": stdout.getvalue(), "error": error}


if __name__ == "__main__":
    main(*sys.argv[1:3])
