"""Model families: one declarative spec (:class:`~.spec.Family`) per file.

A family file defines ``FAMILY``: its modalities and how each is encoded
(returning the neutral :class:`~.spec.Encoded`: no transformers or vLLM
types), its DToMe stages (:class:`~dymu_kernels.core.thresholds.Stage`: what
``thresholds`` / ``r`` are checked against) and tower builder
(:class:`~.spec.DToMeTower`), the arguments only its vision side reads and
its position provider (:class:`~dymu_kernels.core.positions.PositionProvider`).
Families import the core only; ``apply_dymu`` (:mod:`..hf`: transformers'
output types, the encoding methods with the stock parameters) and the vLLM
plugin (:mod:`..vllm`: tagged rows) both look families up here by
``config.model_type``. Adding a family: write ``<model_type>.py`` with its
``FAMILY`` (found by :func:`families`).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

from .spec import DToMeTower, DyMUStats, Encoded, Family, ItemCounts, Modality, Patch, SequenceMixer, model_names

def families() -> Dict[str, Family]:
    """The supported model families by ``config.model_type``: every module of
    this package that defines ``FAMILY``."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if family is not None:
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


__all__ = ["DToMeTower", "DyMUStats", "Encoded", "Family", "ItemCounts", "Modality", "Patch", "SequenceMixer", "families",
           "family_for", "model_names"]
