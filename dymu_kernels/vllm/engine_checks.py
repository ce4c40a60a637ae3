"""Engine settings the plugin cannot serve under, refused at load time.

vLLM's GPU defaults are served: async scheduling, prefix caching (except for
hybrid models, Qwen3.5: see :func:`configure_engine`),
torch.compile and CUDA graphs (full graphs for decode steps, piecewise ones
for the rest; only ``cudagraph_mode=FULL`` is refused). Every input kind the
plugin cannot merge is refused here, once, for the whole engine — never per
request inside an engine step, where an error would take the server down:
precomputed image embeddings (``--enable-mm-embeds``, and the disaggregated
roles that accept them: encoder-cache transfer, KV consumers), and prompts
given as embeddings (``--enable-prompt-embeds``).
"""

from __future__ import annotations

import logging
from typing import List

from .settings import settings_from_config

logger = logging.getLogger(__name__)

# The scheduler the plugin serves with (see :mod:`.scheduler`); vLLM imports it by this name.
SCHEDULER = "dymu_kernels.vllm.scheduler.DyMUScheduler"
# CUDA-graph modes that replay one full graph for steps with prefill (vLLM's CUDAGraphMode names whose
# ``mixed_mode()`` is FULL). A step with merged images has a request of two or more tokens (an image's
# placeholders), so vLLM never counts it a uniform decode step: under FULL_AND_PIECEWISE and FULL_DECODE_ONLY it
# gets a piecewise graph or none, and a piecewise graph is part of the compiled forward that merged steps skip
# (model._uncompiled). Only FULL would replay the stock forward on it.
FULL_MIXED_GRAPHS = ("FULL",)

def unsupported_settings(vllm_config) -> List[str]:
    """What must change in ``vllm_config`` for DyMU to serve exactly (empty: fine)."""
    out = []
    model = vllm_config.model_config
    graphs = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if not model.enforce_eager and graphs is not None and str(getattr(graphs, "name", graphs)) in FULL_MIXED_GRAPHS:
        out.append("compilation_config={'cudagraph_mode': 'FULL_AND_PIECEWISE'} (vLLM's default) or "
                   "'FULL_DECODE_ONLY', not 'FULL': a full CUDA graph of a step with prefill replays the stock "
                   "language model, and a step with merged images must run it on its unique rows; "
                   "FULL_AND_PIECEWISE replays full graphs for decode steps only and piecewise ones, which "
                   "merged steps skip, for the others")
    sched = vllm_config.scheduler_config
    if sched.enable_chunked_prefill and not sched.disable_chunked_mm_input:
        out.append("disable_chunked_mm_input=True (--disable-chunked-mm-input): chunked prefill may otherwise split "
                   "an image across steps (text around it is still chunked)")
    if getattr(vllm_config, "lora_config", None) is not None:
        out.append("no LoRA adapters: their per-token mapping follows positions, the language model runs unique rows")
    if vllm_config.speculative_config is not None:
        out.append("no speculative decoding: draft models are not served with DyMU")
    mm = getattr(model, "multimodal_config", None)
    if mm is not None and getattr(mm, "enable_mm_embeds", False):
        out.append("enable_mm_embeds=False (no --enable-mm-embeds): DyMU merges inside the vision tower, so it "
                   "cannot merge precomputed image embeddings (image_embeds inputs); send images")
    if mm is not None and (getattr(mm, "video_pruning_rate", None) or 0) > 0:
        out.append("no video_pruning_rate (--video-pruning-rate): vLLM's own video token pruning (EVS) drops "
                   "placeholders after the tower, which DyMU's merge maps and M-RoPE positions do not follow")
    if getattr(model, "enable_prompt_embeds", False):
        out.append("enable_prompt_embeds=False (no --enable-prompt-embeds): a request given as embeddings has no "
                   "token ids, from which DyMU finds the images' positions and groups")
    ec = getattr(vllm_config, "ec_transfer_config", None)
    if ec is not None and getattr(ec, "is_ec_consumer", False):
        out.append("no encoder-cache transfer consumer (ec_transfer_config): its image embeddings come from "
                   "another instance, unmerged (vLLM also turns on enable_mm_embeds for it)")
    kv = getattr(vllm_config, "kv_transfer_config", None)
    if kv is not None and getattr(kv, "is_kv_consumer", False):
        out.append("no KV-cache transfer consumer (kv_transfer_config): a loaded prefix can end inside an image, "
                   "whose rows depend on all of its positions at once (the plugin's scheduler rounds local "
                   "prefix-cache hits to an image's start, not loads; vLLM also turns on enable_mm_embeds for it)")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        out.append("pipeline_parallel_size=1: the unique rows cannot cross pipeline stages")
    if getattr(sched, "scheduler_cls", None) not in (None, SCHEDULER):
        out.append(f"no custom scheduler_cls (--scheduler-cls): DyMU serves with {SCHEDULER}, which never "
                   "ends a step inside an image")
    return out


def check_engine(vllm_config) -> None:
    """Raise ValueError listing every setting to change, when the served
    model's config asks for DyMU (see :mod:`dymu_kernels.vllm.settings`)."""
    if settings_from_config(vllm_config.model_config.hf_config) is None:
        return
    reasons = unsupported_settings(vllm_config)
    if reasons:
        raise ValueError("DyMU (dymu_kernels.vllm) cannot serve with these engine settings; pass:\n  - "
                         + "\n  - ".join(reasons)
                         + "\n(dymu_kernels.vllm.engine_kwargs() returns LLM arguments with all of them)")


def configure_engine(vllm_config) -> None:
    """The plugin's config hook: :func:`check_engine`, then, when DyMU is on,
    vLLM's scheduler replaced by the plugin's (:mod:`.scheduler`) and, for a
    hybrid model (recurrent layers, Qwen3.5's Gated DeltaNet), prefix caching
    off with a warning: vLLM caches recurrent states only in its ``align``
    mode, which needs steps that end at block boundaries inside images."""
    check_engine(vllm_config)
    if settings_from_config(vllm_config.model_config.hf_config) is None:
        return
    vllm_config.scheduler_config.scheduler_cls = SCHEDULER
    cache = vllm_config.cache_config
    if getattr(vllm_config.model_config, "is_hybrid", False) and cache.enable_prefix_caching:
        # Run before vLLM's own hook for the class, which would turn on mamba_cache_mode "align" for it.
        cache.enable_prefix_caching = False
        logger.warning("DyMU: prefix caching is off for %s: vLLM caches a hybrid model's recurrent states "
                       "(mamba_cache_mode 'align') only where steps end at block boundaries, also inside an image, "
                       "and a merged image must reach the language model whole, in one step",
                       vllm_config.model_config.architecture)
