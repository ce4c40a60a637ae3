"""Engine settings the plugin cannot serve under, refused at load time."""

from __future__ import annotations

from typing import List

from .settings import settings_from_config

# Architectures the plugin registers but does not serve with DyMU yet, and why.
UNVERIFIED = {
    "LlavaOnevisionForConditionalGeneration": (
        "DyMU does not serve LLaVA-OneVision in vLLM yet (not verified); patch the transformers model with "
        "dymu_kernels.integrations.apply_dymu, or serve without the 'dymu' entry"),
}


def unsupported_settings(vllm_config) -> List[str]:
    """What must change in ``vllm_config`` for DyMU to serve exactly (empty: fine)."""
    out = []
    model = vllm_config.model_config
    if not model.enforce_eager:
        out.append("enforce_eager=True (--enforce-eager): the number of unique tokens changes every step, which "
                   "compiled and graph-captured forwards cannot follow")
    if vllm_config.cache_config.enable_prefix_caching:
        out.append("enable_prefix_caching=False (--no-enable-prefix-caching): a cached prefix can end inside an "
                   "image, and a merged image's rows depend on all of its positions at once")
    sched = vllm_config.scheduler_config
    if sched.enable_chunked_prefill and not sched.disable_chunked_mm_input:
        out.append("disable_chunked_mm_input=True (--disable-chunked-mm-input): chunked prefill may otherwise split "
                   "an image across steps (text around it is still chunked)")
    if getattr(vllm_config, "lora_config", None) is not None:
        out.append("no LoRA adapters: their per-token mapping follows positions, the language model runs unique rows")
    if vllm_config.speculative_config is not None:
        out.append("no speculative decoding: draft models are not served with DyMU")
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        out.append("pipeline_parallel_size=1: the unique rows cannot cross pipeline stages")
    return out


def check_engine(vllm_config) -> None:
    """Raise ValueError listing every setting to change, when the served
    model's config asks for DyMU (see :mod:`dymu_kernels.vllm.settings`)."""
    if settings_from_config(vllm_config.model_config.hf_config) is None:
        return
    refusal = UNVERIFIED.get(getattr(vllm_config.model_config, "architecture", None))
    if refusal:
        raise ValueError(refusal)
    reasons = unsupported_settings(vllm_config)
    if reasons:
        raise ValueError("DyMU (dymu_kernels.vllm) cannot serve with these engine settings; pass:\n  - "
                         + "\n  - ".join(reasons)
                         + "\n(dymu_kernels.vllm.engine_kwargs() returns LLM arguments with all of them)")
