"""The vLLM plugin serving Qwen3.5 and Qwen3-VL (dense and MoE each), Qwen2.5-VL,
Qwen2-VL and LLaVA-OneVision (dymu_kernels.vllm.qwen, dymu_kernels.vllm.llava).

A tiny random model of each family is saved in the vLLM environment (its
processors need torchvision, see ``scripts/setup_vllm.sh``) together with
its processor's outputs for every request; vLLM serves the requests — stock
(no plugin), and with the plugin merging nothing, merging in the tower
(``r``), merging by thresholds (Qwen: after the patch merger; OneVision: in
the SigLIP tower) under chunked prefill, under a compiled engine and on two
tensor-parallel CPU workers (where ``Kind`` says so) — all in one vLLM
worker process — and the package's patched transformers model
(``apply_dymu``) generates from the same processor outputs. Plugin ==
patched transformers (tokens, logprobs) with merging; == stock vLLM with
nothing merged.

Qwen3.5 is served in bfloat16 (vLLM's CPU Gated DeltaNet takes nothing
else): there every engine is compared with the float32 transformers model
(stock or patched) by every prompt token's log-probability (teacher-forced,
so a near tie cannot send the two down different continuations) and the
first new token, within :data:`BF16_LOGPROB_ATOL` — stock vLLM's own
distance from transformers, measured below it, and small enough to catch a
Gated DeltaNet output not averaged per group — and each check also asserts
that merging moved the reference log-probabilities many times further.
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch

from conftest import TP2_ENV, assert_same_generation, greedy_generation, require_vllm_env, run_vllm_worker

transformers = pytest.importorskip("transformers")

from dymu_kernels.hf import apply_dymu, remove_dymu  # noqa: E402

NEW_TOKENS = 4
R = 2  # tokens (Qwen: units) merged per set and vision block
# bfloat16 engines vs the float32 transformers model: the largest, and the mean, prompt-token log-probability
# difference allowed. Measured (tiny Qwen3.5, the image request): stock vLLM 0.19 (mean 0.056), the plugin merging
# 0.17-0.19 (0.053); the plugin with its Gated DeltaNet output taking each group's first row instead of the mean,
# 0.58-0.68 (0.16-0.25); merging moves the reference itself by 7.7-8.2.
BF16_LOGPROB_ATOL, BF16_LOGPROB_MEAN = 0.35, 0.1


def _qwen_chat(*items, text="Describe."):
    pads = "".join(f"<|vision_start|><|{kind}_pad|><|vision_end|>" for kind in items)
    return f"<|im_start|>user\n{pads}{text}<|im_end|>\n<|im_start|>assistant\n"


def _onevision_chat(*items, text="Describe."):
    return f"<|im_start|>user {''.join(f'<{kind}>' for kind in items)}\n{text}<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Kind:
    """One family's tiny served model and its requests."""

    model: Callable  # transformers' class
    # name: (prompt, images (width, height), videos (frames, width, height))
    requests: Dict[str, Tuple[str, list, list]]
    # What the "thresholds" engine (chunked prefill) merges with: thresholds, or — for a bfloat16 engine, whose tower
    # decides a similarity near a threshold otherwise than the float32 reference's — {"r": R}.
    thresholds: object
    budget: int  # chunked prefill's max_num_batched_tokens (vLLM: >= the largest item)
    # Requests with mm_processor_kwargs the tower cannot take, each refused alone while processed:
    # name: (request, mm_processor_kwargs, what the error says).
    rejects: Dict[str, Tuple[str, dict, str]]
    vllm_layout: Tuple[str, ...] = ()  # requests transformers' processor lays out otherwise: vLLM's prompt given
    # Requests where stock vLLM and stock transformers answer differently (their engines' M-RoPE rules for text
    # after a video, ../MODELS.md): compared engine to engine only (plugin with nothing merged == stock vLLM).
    engines_only: Tuple[str, ...] = ()
    # Also under a compiled engine. vLLM compiles the language model only (its towers run eagerly): Qwen3-VL's
    # runs it (deepstack, interleaved M-RoPE); Qwen2-VL / Qwen2.5-VL (M-RoPE, Qwen2 layers), Qwen3-VL-MoE (Qwen3-VL's
    # serving class) and OneVision (Qwen2, 1-D RoPE) run paths that it and test_vllm_plugin's compiled LLaVA engine
    # (inductor) run: they skip it (20 s per engine in CI).
    compiled: bool = True
    # On two tensor-parallel workers: that path is the serving mixin's, the same for every family (rank 0's
    # items, deepstack rows among them, broadcast); Qwen3-VL runs it, and Qwen3.5 (its Gated DeltaNet heads and
    # projections sharded under the mixer hooks), each such engine start costing half a minute in CI.
    tensor_parallel: bool = False
    # The thresholds engine (chunked prefill): the scheduler's and the stage code's, shared by classes; Qwen2-VL
    # (Qwen2.5-VL's serving class) and Qwen3-VL-MoE (Qwen3-VL's) skip it (an engine start is seconds in CI).
    thresholds_engine: bool = True
    dtype: str = "float32"  # what vLLM serves it in (compared as the module doc says where not float32)
    # The plugin merging nothing (== stock vLLM): the serving class's and tower's path; variants sharing both with
    # a kind that runs it (Qwen2-VL, the MoE models: their r2 engine checks their tower's weights) skip it.
    unmerged_engine: bool = True

    def thresholds_merge(self) -> dict:
        """The "thresholds" engine's merge arguments (engine_kwargs and apply_dymu take the same)."""
        return self.thresholds if "r" in self.thresholds else {"thresholds": self.thresholds}


QWEN_REQUESTS = {
    "img": (_qwen_chat("image"), [(168, 112)], []),  # grid 1 x 8 x 12: 24 placeholders
    "vid": (_qwen_chat("video", text="What happens?"), [], [(4, 112, 112)]),  # 2 x 8 x 8: 32
    "both": (_qwen_chat("image", "video", text="Compare."), [(112, 168)], [(4, 140, 112)]),
    "two": (_qwen_chat("image", "image", text="Which?"), [(112, 112), (196, 168)], []),
    "text": (_qwen_chat(text="Say something long enough."), [], []),
}
ONEVISION_REQUESTS = {
    "img": (_onevision_chat("image"), [(300, 150)], []),  # wide: 2 x 4 crops of 84 px, unpadded rows
    "vid": (_onevision_chat("video", text="What happens?"), [], [(4, 100, 90)]),  # 4 frames x 3 x 3 + 1
    # Tall image. Videos of one frame count: stock vLLM 0.32 returns 3-D embeddings for a batch of videos of
    # different frame counts (LlavaOnevisionForConditionalGeneration._process_video_pixels) and fails.
    "both": (_onevision_chat("image", "video", text="Compare."), [(130, 250)], [(4, 84, 84)]),
    # Two images: vLLM gives each all its crops (transformers' processor the base crop only); the second one's
    # 4 x 4 grid of 6 x 6 patches exceeds anyres_max_9 and takes the bilinear downscale.
    "two": (_onevision_chat("image", "image", text="Which?"), [(84, 84), (330, 320)], []),
    "text": (_onevision_chat(text="Say something long enough."), [], []),
}
QWEN_REJECTS = {
    "patch_size": ("img", {"patch_size": 16}, "the vision tower takes [patches, 1176] (patch_size 14"),
    "merge_size": ("both", {"merge_size": 1}, "merge_size 1: the vision tower merges 2 x 2 patches"),
}
ONEVISION_REJECTS = {
    "crop": ("img", {"size": {"height": 56, "width": 56}}, "expected 84, got 56"),
    "video_crop": ("vid", {"size": {"height": 56, "width": 56}}, "expected 84, got 56"),
}
QWEN3_REJECTS = {
    "patch_size": ("img", {"patch_size": 14}, "the vision tower takes [patches, 1536] (patch_size 16"),
    "merge_size": ("both", {"merge_size": 1}, "merge_size 1: the vision tower merges 2 x 2 patches"),
}
KINDS = {
    # Qwen2.5-VL and Qwen2-VL share the serving class and language model; Qwen3-VL's (deepstack, interleaved
    # M-RoPE) runs compiled and on two workers; Qwen3.5's (hybrid language model, its whole class compiled by vLLM)
    # compiled.
    "qwen2_5_vl": Kind(transformers.Qwen2_5_VLForConditionalGeneration, QWEN_REQUESTS, {"merger": [0.5]}, 256,
                       QWEN_REJECTS, compiled=False),
    # Qwen3-VL videos (timestamped frames): stock vLLM 0.32 and transformers 5.25 agree on the prompt and the first
    # new token, then differ (positions after a video).
    "qwen3_vl": Kind(transformers.Qwen3VLForConditionalGeneration, QWEN_REQUESTS, {"merger": [0.5]}, 256,
                     QWEN3_REJECTS, engines_only=("vid", "both"), tensor_parallel=True),
    "qwen3_vl_moe": Kind(transformers.Qwen3VLMoeForConditionalGeneration, QWEN_REQUESTS, {"merger": [0.5]}, 256,
                         QWEN3_REJECTS, engines_only=("vid", "both"), compiled=False, thresholds_engine=False,
                         unmerged_engine=False),
    "qwen2_vl": Kind(transformers.Qwen2VLForConditionalGeneration, QWEN_REQUESTS, {"merger": [0.5]}, 256,
                     QWEN_REJECTS, compiled=False, thresholds_engine=False, unmerged_engine=False),
    "qwen3_5": Kind(transformers.Qwen3_5ForConditionalGeneration, QWEN_REQUESTS, {"r": R}, 256,
                    QWEN3_REJECTS, engines_only=("vid", "both"), tensor_parallel=True, dtype="bfloat16"),
    "qwen3_5_moe": Kind(transformers.Qwen3_5MoeForConditionalGeneration, QWEN_REQUESTS, {"r": R}, 256,
                        QWEN3_REJECTS, engines_only=("vid", "both"), compiled=False, thresholds_engine=False,
                        unmerged_engine=False, dtype="bfloat16"),
    "llava_onevision": Kind(transformers.LlavaOnevisionForConditionalGeneration, ONEVISION_REQUESTS, [0.5, 0.5],
                            768, ONEVISION_REJECTS, vllm_layout=("two",), compiled=False),
}
BATCHES = {"single": ["img"], "mixed": ["img", "vid", "text", "both", "two"]}


def _media(folder, requests):
    """PNG images and NPY frame stacks for the requests; ``{name: (images, videos)}`` paths."""
    from PIL import Image

    rng = np.random.default_rng(7)
    out = {}
    for name, (_, images, videos) in requests.items():
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


def _reference_inputs(kind: Kind, inputs, stock):
    """transformers' inputs per request: the processor's, or — for the
    requests vLLM lays out otherwise — vLLM's prompt with the processor's pixels."""
    out = dict(inputs)
    for key in kind.vllm_layout:
        ids = torch.tensor([stock["mixed"][BATCHES["mixed"].index(key)]["prompt_token_ids"]])
        out[key] = {**inputs[key], "input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return out


def _engines(name, folder):
    """Kind ``name``'s tiny model folder (made by the worker) and its engines:
    stock vLLM, and the plugin merging nothing, in the tower (``r``), by
    thresholds under chunked prefill, compiled and on two workers."""
    kind = KINDS[name]
    media = _media(folder, kind.requests)
    requests = {k: {"prompt": p, "images": media[k][0], "videos": media[k][1]} for k, (p, _, _) in kind.requests.items()}
    model_dir = os.path.join(folder, "model")

    def engine(engine_name, dymu, batches, rejects=None, env=None, **llm):
        return {"name": f"{name}/{engine_name}", "model": model_dir, "dymu": dymu, "engine": dict(llm, dtype=kind.dtype),
                "env": env or {}, "max_tokens": NEW_TOKENS, "ignore_eos": True, "rejects": rejects or {},
                "plugin": dymu is not None, "prompt_logprobs": kind.dtype != "float32",
                "batches": {b: [requests[k] for k in BATCHES[b]] for b in batches}}

    chunked = {"enable_chunked_prefill": True, "max_num_batched_tokens": kind.budget}
    # The thresholds engine prefills in chunks: each engine start costs seconds in CI, and chunking is the
    # scheduler's, whichever stage merges.
    engines = [engine("r2", {"r": R}, ["single", "mixed"], rejects={
        n: dict(requests[key], mm_processor_kwargs=kwargs) for n, (key, kwargs, _) in kind.rejects.items()})]
    if kind.unmerged_engine:
        engines.insert(0, engine("r0", {"r": 0}, ["single", "mixed"]))
    if kind.thresholds_engine:
        engines.append(engine("thresholds", kind.thresholds_merge(), ["mixed"], **chunked))
    if kind.compiled:  # vLLM's compilation (dynamo, piecewise graphs) with the eager backend: inductor's C++
        # codegen is half a minute per engine here, and test_vllm_plugin's compiled LLaVA engine runs it (and
        # vLLM's warm-up encoding a dummy item: skipped here, seconds of the tower on the largest video)
        engines.append(engine("r2_compiled", {"r": R}, ["mixed"], enforce_eager=False,
                              compilation_config={"backend": "eager"}, skip_mm_profiling=True))
    if kind.tensor_parallel:
        engines.append(dict(engine("r2_tp2", {"r": R}, ["mixed"], env=TP2_ENV, tensor_parallel_size=2),
                            rank1_disagrees=True))  # rank 1's tower sees noisier pixels: other merges
    folder_spec = {"model": model_dir, "kind": name, "requests": requests, "dump": os.path.join(folder, "inputs.pt")}
    return folder_spec, engine("stock", None, ["single", "mixed"], enforce_eager=True), engines


@pytest.fixture(scope="module")
def vllm_runs(tmp_path_factory):
    """What vLLM generated for every kind, in one worker process (a process
    start costs more than a tiny engine): the stock engines first, then the
    plugin's. ``{kind: ({engine: output}, folder spec)}``."""
    require_vllm_env()
    folder = tmp_path_factory.mktemp("vllm")
    specs = {name: _engines(name, str(tmp_path_factory.mktemp(name))) for name in sorted(KINDS)}
    job = {"folders": [f for f, _, _ in specs.values()],
           "engines": [stock for _, stock, _ in specs.values()] + [e for _, _, es in specs.values() for e in es]}
    out = run_vllm_worker(job, str(folder), "engines")
    return {name: ({e.split("/", 1)[1]: v for e, v in out.items() if e.split("/", 1)[0] == name}, spec[0])
            for name, spec in specs.items()}


def _serve(name, vllm, folder_spec):
    """What patched transformers generated next to what vLLM did."""
    kind = KINDS[name]
    inputs = _reference_inputs(kind, torch.load(folder_spec["dump"]), vllm["stock"])
    model = kind.model.from_pretrained(folder_spec["model"], dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: every request makes all its tokens
    hf = {}
    for ref, patch in (("stock", None), ("r2", dict(r=R)), ("thresholds", kind.thresholds_merge())):
        if ref == "thresholds" and not kind.thresholds_engine:
            continue
        if patch is not None:
            apply_dymu(model, **patch)
        hf[ref] = {k: greedy_generation(model, inputs[k], NEW_TOKENS) for k in kind.requests}
        if kind.dtype != "float32":
            for k in kind.requests:
                hf[ref][k]["prompt_logprobs"] = _prompt_logprobs(model, inputs[k])
        remove_dymu(model)
    return {"hf": hf, "vllm": vllm, "inputs": inputs, "kind": kind}


def _prompt_logprobs(model, inputs):
    """Each prompt token's log-probability after the ones before it (one forward), as vLLM's prompt_logprobs."""
    with torch.no_grad():
        logprobs = model(**inputs).logits[0].double().log_softmax(-1)
    ids = inputs["input_ids"][0]
    return logprobs[:-1].gather(-1, ids[1:, None])[:, 0].tolist()


def _assert_matches(kind: Kind, got, want, what, moved_from=None):
    """``got`` (vLLM) is ``want``: equal tokens and log-probabilities within
    2e-4 for a float32 engine; for a bfloat16 one (module doc) the first new
    token equal and every prompt token's log-probability within
    BF16_LOGPROB_ATOL (on average BF16_LOGPROB_MEAN) — and, given ``moved_from`` (the unmerged reference),
    ``want`` at least 5 × that tolerance away from it somewhere."""
    if kind.dtype == "float32":
        assert_same_generation(got, want, what)
        return
    assert got["tokens"][0] == want["tokens"][0], what
    np.testing.assert_allclose(got["prompt_logprobs"], want["prompt_logprobs"], atol=BF16_LOGPROB_ATOL, err_msg=what)
    mean = np.abs(np.subtract(got["prompt_logprobs"], want["prompt_logprobs"])).mean()
    assert mean <= BF16_LOGPROB_MEAN, f"{what}: mean log-probability difference {mean}"
    if moved_from is not None:
        moved = np.abs(np.subtract(want["prompt_logprobs"], moved_from["prompt_logprobs"])).max()
        assert moved > 5 * BF16_LOGPROB_ATOL, f"{what}: merging moved the reference by {moved} only"


@pytest.fixture(scope="module", params=sorted(KINDS))
def served(request, vllm_runs):
    return request.param, _serve(request.param, *vllm_runs[request.param])


@pytest.mark.slow
def test_stock_vllm_equals_transformers_and_plugin_unmerged_equals_stock(served):
    """Stock vLLM gives transformers' tokens (images, videos, both, text);
    the plugin with nothing merged gives stock vLLM's (kinds that run it)."""
    kind, s = served
    for batch in ("single", "mixed"):
        for i, (key, stock) in enumerate(zip(BATCHES[batch], s["vllm"]["stock"][batch])):
            assert stock["prompt_token_ids"] == s["inputs"][key]["input_ids"][0].tolist(), f"{kind}: {key} prompt"
            if key not in s["kind"].engines_only:
                _assert_matches(s["kind"], stock, s["hf"]["stock"][key],
                                f"{kind}: stock vLLM vs transformers, {batch}/{key}")
            if s["kind"].unmerged_engine:
                _assert_matches(s["kind"], s["vllm"]["r0"][batch][i], stock,
                                f"{kind}: plugin r=0 vs stock vLLM, {batch}/{key}")
    if not s["kind"].unmerged_engine:
        return
    stats = s["vllm"]["r0"]["stats"]
    assert stats["tower_tokens_kept"] == stats["tower_tokens"] > 0 and stats["llm_rows"] == stats["llm_positions"]


@pytest.mark.slow
@pytest.mark.parametrize("engine,batch", [("r2", "single"), ("r2", "mixed"), ("thresholds", "mixed"),
                                          ("r2_compiled", "mixed"), ("r2_tp2", "mixed")])
def test_merged_equals_patched_transformers(served, engine, batch):
    """With merging in the tower (r) or by thresholds, every request of a
    batch mixing images, videos, both and text, prefilled whole or in
    chunks (the thresholds engine), on one worker or two, under a compiled
    engine (steps where nothing merged compiled), gives what the patched
    transformers model gives for it alone — on two workers also when rank 1's
    tower decides other merges than rank 0's (it serves rank 0's)."""
    kind, s = served
    if engine not in s["vllm"]:
        pytest.skip(f"{kind} does not run the {engine} engine (Kind.compiled / tensor_parallel / thresholds_engine)")
    ref = s["hf"]["thresholds" if engine == "thresholds" else "r2"]
    for key, got in zip(BATCHES[batch], s["vllm"][engine][batch]):
        if key not in s["kind"].engines_only:
            _assert_matches(s["kind"], got, ref[key], f"{kind}: {engine}/{batch}/{key}",
                            moved_from=s["hf"]["stock"][key] if s["kind"].requests[key][1:] != ([], []) else None)
    stats = s["vllm"][engine]["stats"]
    assert stats["tower_tokens_kept"] < stats["tower_tokens"] and stats["llm_rows"] < stats["llm_positions"]
    if batch == "mixed" and engine != "r2":  # engines that served this batch only: its items, counted once
        # (a compiled engine's warm-up encodes a dummy item: not counted)
        items = sum(len(s["kind"].requests[k][1]) + len(s["kind"].requests[k][2]) for k in BATCHES[batch])
        assert stats["items_encoded"] == items, f"{kind}: {engine}"
    if engine == "r2_tp2":  # rank 1 merged otherwise for every item and served rank 0's (the outputs above)
        (rank1,) = s["vllm"][engine]["stats_other_ranks"]
        assert stats["tp_disagreements"] == 0 and 0 < rank1["tp_disagreements"] <= stats["items_encoded"]
    if engine == "thresholds":  # chunked prefill: the batch's prompts took more than one step
        prompt = sum(s["inputs"][k]["input_ids"].shape[1] for k in BATCHES[batch])
        assert stats["max_step_positions"] <= s["kind"].budget < prompt


@pytest.mark.slow
def test_requests_the_tower_cannot_take_fail_alone(served):
    """A request whose mm_processor_kwargs make pixels the tower cannot take
    (patch, merge or crop size) fails while it is
    processed, naming the kwargs; the same engine then serves its batches
    (test_merged_equals_patched_transformers[r2-*] checks what it served)."""
    kind, s = served
    got = s["vllm"]["r2"]["rejects"]
    for name, (_, _, says) in s["kind"].rejects.items():
        assert got[name] is not None and "the image processor made pixels the vision tower cannot take" in got[name] \
            and "mm_processor_kwargs" in got[name] and says in got[name], f"{kind}/{name}: {got[name]}"
    assert len(s["vllm"]["r2"]["mixed"]) == len(BATCHES["mixed"])


@pytest.mark.slow
def test_tower_gemms_run_on_vllms_cpu_dispatch(served):
    """Every linear layer of the DyMU tower runs vLLM's CPU GEMM, as stock vLLM's tower's do
    (dymu_kernels/vllm/cpu_gemm.py); an engine without DyMU has no DyMU tower."""
    kind, s = served
    layers, on_vllm_gemm = s["vllm"]["r2"]["tower_linears"]
    assert layers > 0 and on_vllm_gemm == layers, (kind, layers, on_vllm_gemm)
    assert s["vllm"]["stock"]["tower_linears"] is None
