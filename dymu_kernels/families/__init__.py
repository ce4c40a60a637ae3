"""Model families: one declarative spec (:class:`~.spec.Family`) per file.

A family file defines ``FAMILY``: its modalities and how each is encoded and
laid out, its vision tower and DToMe encoder builder, the arguments only its
vision side reads and its position provider. ``apply_dymu`` (:mod:`..hf`)
and the vLLM plugin (:mod:`..vllm`) both look families up here by
``config.model_type``. Adding a family: write ``<model_type>.py`` with its
``FAMILY`` and list it in ``_MODULES``.
"""

from __future__ import annotations

import importlib
from typing import Dict

from .spec import DyMUStats, Family, ItemCounts, Modality, Patch, model_names

_MODULES = ("llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl")


def families() -> Dict[str, Family]:
    """The supported model families by ``config.model_type``."""
    found = {}
    for name in _MODULES:
        family = importlib.import_module(f"{__name__}.{name}").FAMILY
        found[family.model_type] = family
    return found


def family_for(model) -> Family:
    """The family of a model (by ``model.config.model_type``); TypeError
    naming the supported classes for any other."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    known = families()
    if model_type not in known:
        supported = ", ".join(f"{f.class_name} (model_type {t!r})" for t, f in known.items())
        raise TypeError(
            f"apply_dymu supports transformers {supported}; got {type(model).__name__} (model_type={model_type!r})"
        )
    return known[model_type]


__all__ = ["DyMUStats", "Family", "ItemCounts", "Modality", "Patch", "families", "family_for", "model_names"]
