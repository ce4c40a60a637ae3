"""Requests checked while vLLM processes them, not in the engine step.

A client's per-request ``mm_processor_kwargs`` reach the image processor and
can make pixels the vision tower cannot take (another crop size, patch size,
merge size, AnyRes grid). vLLM's model classes find out in
``embed_multimodal``, inside the engine step, where an error stops the
engine for every request. The processors of the plugin's classes check the
pixels right after the image processor made them (:class:`CheckedPixels`),
so such a request fails alone, as a 4xx — as does one whose options make
pixels that are not finite (``image_std`` of 0): they would make the tower's
output, and every answer to that request, NaN.
"""

from __future__ import annotations

from vllm.multimodal import MULTIMODAL_REGISTRY

from .settings import settings_from_config


class CheckedPixels:
    """Mixin before a vLLM multimodal processor: ``check_pixels`` runs on what
    its image processor made for each request; a ValueError there is the
    request's error, naming ``mm_processor_kwargs``."""

    def check_pixels(self, out, config, hf_kwargs) -> None:
        """Raise ValueError when ``out`` (the processed request) does not fit
        the model of ``config``; ``hf_kwargs``: the request's processor kwargs."""
        raise NotImplementedError

    def _postprocess_hf_mm_data(self, hf_data, hf_kwargs, processed):
        out = super()._postprocess_hf_mm_data(hf_data, hf_kwargs, processed)
        try:
            self.check_pixels(out, self.info.get_hf_config(), hf_kwargs)
            check_finite(out)
        except ValueError as e:
            raise ValueError(f"the image processor made pixels the vision tower cannot take (check the "
                             f"request's mm_processor_kwargs): {e}") from None
        return out


def check_finite(out) -> None:
    """Raise ValueError naming the first floating-point input of ``out`` (a
    processed request: tensors, or lists of them) holding NaN or inf."""
    import torch

    for key, value in out.items():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{key} holds NaN or inf")


def register_checked_processor(model_cls, processor_cls):
    """A class decorator registering vLLM's processor factory of ``model_cls``
    — with ``processor_cls`` (a :class:`CheckedPixels` form of vLLM's
    processor, its last base) in its place when the model's config asks for DyMU."""
    stock = model_cls._processor_factory
    base = processor_cls.__bases__[-1]

    def build(info, dummy_inputs):
        processor = stock.processor(info, dummy_inputs)
        # LLaVA's factory picks among several processors by config (Pixtral, Mistral): replace vLLM's own only.
        if type(processor) is base and settings_from_config(info.ctx.model_config.hf_config):
            return processor_cls(info, dummy_inputs)
        return processor

    return MULTIMODAL_REGISTRY.register_processor(build, info=stock.info, dummy_inputs=stock.dummy_inputs)
