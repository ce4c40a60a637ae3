"""Runs vLLM on a job file and writes what it generated (run by tests/test_vllm_plugin.py).

Runs inside the vLLM environment (scripts/setup_vllm.sh), never imported by
the test suite itself: ``python vllm_worker.py JOB.json OUT.json``.

JOB: ``{"model": DIR, "engines": [{"name", "engine": {LLM kwargs}, "dymu": {engine_kwargs} | null,
"batches": {name: [{"prompt", "images": [PNG paths]}]}, "max_tokens",
"rejects": {name: {"prompt", "images", "mm_processor_kwargs"}}}]}``. Each engine is
started once, is sent its rejects first (each one request that must fail), then serves
all its batches (each batch one ``generate`` call);
OUT: ``{engine: {batch: [{"tokens", "logprobs"}], "stats": {...} | null, "rejects": {name: error | null}}}``
or ``{engine: {"error": message}}`` when the engine refused to start.
"""

import gc
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model in this process: stats readable
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes most of the machine's memory


def _onevision_refusal():
    """LLaVA-OneVision with a dymu entry: the error its class raises at load time."""
    import types

    from dymu_kernels.vllm.llava import DyMULlavaOnevisionForConditionalGeneration

    cfg = types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=types.SimpleNamespace(dymu={"r": 2})))
    try:
        DyMULlavaOnevisionForConditionalGeneration(vllm_config=cfg)
    except ValueError as e:
        return str(e)
    return None


def main(job_path: str, out_path: str) -> None:
    from PIL import Image
    from vllm import LLM, SamplingParams

    job = json.load(open(job_path))
    results = {}
    for spec in job["engines"]:
        kwargs = dict(model=job["model"], dtype="float32", seed=0, max_model_len=1024, **spec.get("engine", {}))
        if spec.get("dymu") is not None:
            from dymu_kernels.vllm import engine_kwargs

            kwargs.update(engine_kwargs(**spec["dymu"]))
            kwargs.update(spec.get("engine", {}))
        try:
            llm = LLM(**kwargs)
        except Exception as e:  # the refusals the tests check
            results[spec["name"]] = {"error": f"{type(e).__name__}: {e}"}
            continue
        params = SamplingParams(temperature=0, max_tokens=spec.get("max_tokens", 6), logprobs=0)
        out = {"rejects": {}}
        for name, req in spec.get("rejects", {}).items():
            item = {"prompt": req["prompt"], "multi_modal_data": {"image": [Image.open(p).convert("RGB")
                                                                            for p in req["images"]]}}
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
                if req.get("images"):
                    item["multi_modal_data"] = {"image": [Image.open(p).convert("RGB") for p in req["images"]]}
                prompts.append(item)
            gens = llm.generate(prompts, params, use_tqdm=False)
            out[name] = [{"tokens": list(g.outputs[0].token_ids),
                          "logprobs": [lp[t].logprob for lp, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]}
                         for g in gens]
        from dymu_kernels.vllm import serving_stats

        out["stats"] = serving_stats(llm)[0]
        results[spec["name"]] = out
        del llm
        gc.collect()
    if job.get("onevision_refusal"):
        results["onevision_refusal"] = _onevision_refusal()
    json.dump(results, open(out_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:3])
