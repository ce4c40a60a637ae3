"""The vLLM plugin serving Qwen2.5-VL and Qwen2-VL (dymu_kernels.vllm.qwen).

A tiny random model of each family is saved in the vLLM environment (its
processors need torchvision, see ``scripts/setup_vllm.sh``) together with
its processor's outputs for every request; vLLM serves the requests — stock
(no plugin), and with the plugin merging nothing, merging in the tower
(``r``), merging after the patch merger (``thresholds={"merger": ...}``),
under chunked prefill, and on two tensor-parallel CPU workers — and the
package's patched transformers model (``apply_dymu``, transformers 5.24 here)
generates from the same processor outputs. Plugin == patched transformers
(tokens, logprobs) with merging; == stock vLLM with nothing merged.
"""

import os

import numpy as np
import pytest
import torch

from conftest import VLLM_PYTHON, assert_same_generation, greedy_generation, run_vllm_worker

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, remove_dymu  # noqa: E402

NEW_TOKENS = 4


def _chat(*items, text="Describe."):
    pads = "".join(f"<|vision_start|><|{kind}_pad|><|vision_end|>" for kind in items)
    return f"<|im_start|>user\n{pads}{text}<|im_end|>\n<|im_start|>assistant\n"


# name: (prompt, images (width, height), videos (frames, width, height))
REQUESTS = {
    "img": (_chat("image"), [(168, 112)], []),  # grid 1 x 8 x 12: 24 placeholders
    "vid": (_chat("video", text="What happens?"), [], [(4, 112, 112)]),  # 2 x 8 x 8: 32
    "both": (_chat("image", "video", text="Compare."), [(112, 168)], [(4, 140, 112)]),
    "two": (_chat("image", "image", text="Which?"), [(112, 112), (196, 168)], []),
    "text": (_chat(text="Say something long enough."), [], []),
}
BATCHES = {"single": ["img"], "mixed": ["img", "vid", "text", "both", "two"]}
R = 2  # units merged per set and vision block
MERGER = {"merger": [0.5]}  # one DToMe round after the patch merger
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 256}  # vLLM: >= the largest item (224)
KINDS = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
         "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}


def _media(folder):
    """PNG images and NPY frame stacks for the requests; ``{name: (images, videos)}`` paths."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = {}
    for name, (_, images, videos) in REQUESTS.items():
        paths = ([], [])
        for i, (w, h) in enumerate(images):
            ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))  # smooth: merges under thresholds
            pixels = (0.6 * ramp + 0.4 * rng.integers(0, 256, (h, w, 3))).astype(np.uint8)
            paths[0].append(os.path.join(folder, f"{name}_img{i}.png"))
            Image.fromarray(pixels).save(paths[0][-1])
        for i, (n, w, h) in enumerate(videos):
            paths[1].append(os.path.join(folder, f"{name}_vid{i}.npy"))
            np.save(paths[1][-1], rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8))
        out[name] = paths
    return out


def _serve(kind, folder):
    """What stock vLLM, the plugin (every engine) and patched transformers generated."""
    media = _media(folder)
    requests = {k: {"prompt": p, "images": media[k][0], "videos": media[k][1]} for k, (p, _, _) in REQUESTS.items()}
    model_dir, dump = os.path.join(folder, "model"), os.path.join(folder, "inputs.pt")

    def engine(name, dymu, batches, **llm):
        return {"name": name, "dymu": dymu, "engine": llm, "max_tokens": NEW_TOKENS, "ignore_eos": True,
                "batches": {b: [requests[k] for k in BATCHES[b]] for b in batches}}

    stock = {"model": model_dir, "engines": [engine("stock", None, ["single", "mixed"], enforce_eager=True)],
             "qwen_folder": {"kind": kind, "requests": requests, "dump": dump}}
    vllm = run_vllm_worker(stock, folder, "stock", plugins="none")  # also saves the model and the inputs
    engines = [engine("r0", {"r": 0}, ["single", "mixed"]), engine("r2", {"r": R}, ["single", "mixed"]),
               engine("merger", {"thresholds": MERGER}, ["mixed"]),
               engine("r2_chunked", {"r": R}, ["mixed"], **CHUNKED)]
    vllm.update(run_vllm_worker({"model": model_dir, "engines": engines}, folder, "plugin"))
    # Tensor parallel: two CPU workers, one core each (vLLM binds one NUMA node's cores per worker otherwise).
    tp = {"model": model_dir, "engines": [engine("r2_tp2", {"r": R}, ["mixed"], tensor_parallel_size=2)]}
    vllm.update(run_vllm_worker(tp, folder, "tp", VLLM_CPU_OMP_THREADS_BIND="0|1", OMP_NUM_THREADS="1"))
    inputs = torch.load(dump)
    model = KINDS[kind].from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every request makes all its tokens
    hf = {}
    for name, patch in (("stock", None), ("r2", dict(r=R)), ("merger", dict(thresholds=MERGER))):
        if patch is not None:
            apply_dymu(model, **patch)
        hf[name] = {k: greedy_generation(model, inputs[k], NEW_TOKENS) for k in REQUESTS}
        remove_dymu(model)
    return {"hf": hf, "vllm": vllm, "inputs": inputs}


@pytest.fixture(scope="module", params=sorted(KINDS))
def served(request, tmp_path_factory):
    if not os.path.exists(VLLM_PYTHON):
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (bash scripts/setup_vllm.sh makes it)")
    return request.param, _serve(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.mark.slow
def test_stock_vllm_equals_transformers_and_plugin_unmerged_equals_stock(served):
    """Stock vLLM gives transformers' tokens (images, videos, both, text);
    the plugin with nothing merged gives stock vLLM's."""
    kind, s = served
    for batch in ("single", "mixed"):
        for key, stock, unmerged in zip(BATCHES[batch], s["vllm"]["stock"][batch], s["vllm"]["r0"][batch]):
            assert_same_generation(stock, s["hf"]["stock"][key], f"{kind}: stock vLLM vs transformers, {batch}/{key}")
            assert_same_generation(unmerged, stock, f"{kind}: plugin r=0 vs stock vLLM, {batch}/{key}")
    stats = s["vllm"]["r0"]["stats"]
    assert stats["tower_tokens_kept"] == stats["tower_tokens"] > 0 and stats["llm_rows"] == stats["llm_positions"]


@pytest.mark.slow
@pytest.mark.parametrize("engine,batch", [("r2", "single"), ("r2", "mixed"), ("merger", "mixed"),
                                          ("r2_chunked", "mixed"), ("r2_tp2", "mixed")])
def test_merged_equals_patched_transformers(served, engine, batch):
    """With merging in the tower (r) or after the patch merger (thresholds),
    every request of a batch mixing images, videos, both and text, prefilled
    whole or in chunks, on one worker or two, gives what the patched
    transformers model gives for it alone."""
    kind, s = served
    ref = s["hf"]["merger" if engine == "merger" else "r2"]
    for key, got in zip(BATCHES[batch], s["vllm"][engine][batch]):
        assert_same_generation(got, ref[key], f"{kind}: {engine}/{batch}/{key}")
    stats = s["vllm"][engine]["stats"]
    assert stats["tower_tokens_kept"] < stats["tower_tokens"] and stats["llm_rows"] < stats["llm_positions"]
    if engine == "r2_chunked":  # the batch's prompts took more than one step
        prompt = sum(s["inputs"][k]["input_ids"].shape[1] for k in BATCHES[batch])
        assert stats["max_step_positions"] <= CHUNKED["max_num_batched_tokens"] < prompt
