"""DyMU in vLLM: an out-of-tree plugin (``pip install dymu_kernels[vllm]``).

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point
in every process it starts. It puts the classes of :mod:`.llava` and
:mod:`.qwen` in place of vLLM's own for every family ``apply_dymu`` patches
(:data:`ARCHITECTURES`: LLaVA-1.5, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, and
Qwen3-VL and Qwen3.5 dense and MoE) — vLLM's own classes, unchanged unless the
model's config has a ``dymu`` entry — and a config hook (run before vLLM's own
hook for the class, where it has one) that refuses, at load time, engine
settings DyMU cannot serve exactly (:mod:`.engine_checks`) and puts in vLLM's
scheduler the plugin's, which never splits an image across steps
(:mod:`.scheduler`). Serve with::

    from vllm import LLM
    from dymu_kernels.vllm import engine_kwargs
    llm = LLM("llava-hf/llava-1.5-7b-hf", **engine_kwargs(thresholds="default"))

What it saves (vLLM fixes the placeholder count before the vision tower
runs): the vision tower runs DToMe; in the language model the norms,
projections and MLP run on unique tokens only; attention and the KV cache
(and a hybrid model's recurrent mixing and states) stay at full length.
:func:`serving_stats` reads what was saved (see :class:`~.model.ServingStats`).
"""

from __future__ import annotations

from .settings import DyMUSettings, engine_kwargs, settings_from_config

ARCHITECTURES = {
    "LlavaForConditionalGeneration": "dymu_kernels.vllm.llava:DyMULlavaForConditionalGeneration",
    "LlavaOnevisionForConditionalGeneration": "dymu_kernels.vllm.llava:DyMULlavaOnevisionForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "dymu_kernels.vllm.qwen:DyMUQwen2_5_VLForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "dymu_kernels.vllm.qwen:DyMUQwen2VLForConditionalGeneration",
    "Qwen3VLForConditionalGeneration": "dymu_kernels.vllm.qwen:DyMUQwen3VLForConditionalGeneration",
    "Qwen3VLMoeForConditionalGeneration": "dymu_kernels.vllm.qwen:DyMUQwen3VLMoeForConditionalGeneration",
    "Qwen3_5ForConditionalGeneration": "dymu_kernels.vllm.qwen:DyMUQwen3_5ForConditionalGeneration",
    "Qwen3_5MoeForConditionalGeneration": "dymu_kernels.vllm.qwen:DyMUQwen3_5MoeForConditionalGeneration",
}

__all__ = ["ARCHITECTURES", "DyMUSettings", "engine_kwargs", "register", "serving_stats", "settings_from_config"]


def model_stats(model):
    """The DyMU statistics of one worker's model (None where DyMU is off)."""
    stats = getattr(model, "dymu_stats", None)
    return stats.as_dict() if stats is not None and getattr(model, "dymu", None) is not None else None


def serving_stats(llm):
    """``[ServingStats.as_dict()]``, one per worker, of a ``vllm.LLM`` serving with DyMU.

    vLLM ships the function to its workers; with its multiprocessing engine
    (the default) it asks for ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` to do so.
    """
    return llm.apply_model(model_stats)


def _config_hook(base=None):
    """The plugin's config hook, then vLLM's own hook ``base`` for the class (None: none)."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    from . import engine_checks

    class DyMUEngineCheck(base or VerifyAndUpdateConfig):
        _dymu = True

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            engine_checks.configure_engine(vllm_config)
            if base is not None:
                base.verify_and_update_config(vllm_config)

    return DyMUEngineCheck


def register() -> None:
    """vLLM's plugin entry point: idempotent (vLLM may call it more than once per process)."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    for arch, path in ARCHITECTURES.items():
        if getattr(MODELS_CONFIG_MAP.get(arch), "_dymu", False):
            continue
        MODELS_CONFIG_MAP[arch] = _config_hook(MODELS_CONFIG_MAP.get(arch))  # vLLM's own hook chained
        ModelRegistry.register_model(arch, path)
