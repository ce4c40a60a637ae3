"""How a served model asks for DyMU: the ``dymu`` entry of its config.

Set it in the checkpoint's ``config.json`` or, without touching the
checkpoint, through vLLM's ``hf_overrides``::

    LLM(model, **dymu_kernels.vllm.engine_kwargs(thresholds="t.json"))
    # = LLM(model, hf_overrides={"dymu": {"thresholds": "t.json"}}, disable_chunked_mm_input=True)
    #   (+ enforce_eager=True on vLLM's CPU platform)

Keys: ``enabled`` (default True), ``thresholds`` (a preset ``"model:level"``,
a threshold JSON file, a list of per-block floats, ``"default"``: the
family's published preset, or — Qwen2-VL / Qwen2.5-VL — a dict of stages
``{"vit": per block, "merger": per round}``), ``r`` (merge exactly r tokens per block instead;
int or one per block), ``backend`` (``"auto" | "cpp" | "triton" | "torch"``).
No ``dymu`` entry, or ``enabled: false``: the model is served exactly as
vLLM serves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

KEYS = ("enabled", "thresholds", "r", "backend")
BACKENDS = ("auto", "cpp", "triton", "torch")


@dataclass(frozen=True)
class DyMUSettings:
    """A checked ``dymu`` config entry (thresholds resolved later, per tower)."""

    thresholds: Any = "default"
    r: Any = None
    backend: str = "auto"


def settings_from_config(hf_config) -> Optional[DyMUSettings]:
    """The DyMU settings of a model config, or None when DyMU is off.

    Raises:
        ValueError naming the key for an unknown key or a bad value.
    """
    entry = getattr(hf_config, "dymu", None)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ValueError(f"config 'dymu' must be a dict with keys {KEYS}, got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(KEYS))
    if unknown:
        raise ValueError(f"config 'dymu' has unknown keys {unknown}; expected some of {KEYS}")
    enabled = entry.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError(f"config 'dymu.enabled' must be true or false, got {enabled!r}")
    if not enabled:
        return None
    backend = entry.get("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"config 'dymu.backend' must be one of {BACKENDS}, got {backend!r}")
    r = entry.get("r")
    thresholds = entry.get("thresholds")
    # As apply_dymu reads them (core.thresholds.merge_arguments): r is for the tower's blocks (the 'vit' stage),
    # so thresholds for it as well conflict; a dict of other stages (Qwen: {'merger': ...}) goes with r.
    if r is not None and thresholds is not None and (not isinstance(thresholds, dict) or
                                                     thresholds.get("vit") is not None):
        raise ValueError("config 'dymu' gives both 'thresholds' (DyMU) and 'r' (fixed-r merging) for the tower's "
                         "blocks; give one (a dict of other stages, e.g. {'merger': [...]}, goes with r)")
    if r is not None:
        ok = (isinstance(r, int) and not isinstance(r, bool) and r >= 0) or (
            isinstance(r, list) and r and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in r))
        if not ok:
            raise ValueError(f"config 'dymu.r' must be a non-negative int or a list of them (one per block), got {r!r}")
    elif thresholds is None:
        thresholds = "default"
    if thresholds is not None and not isinstance(thresholds, (str, list, dict)):
        raise ValueError(f"config 'dymu.thresholds' must be a preset 'model:level', a file path, 'default', a list "
                         f"of floats or a dict of stages, got {type(thresholds).__name__}")
    return DyMUSettings(thresholds=thresholds, r=r, backend=backend)


def engine_kwargs(thresholds: Any = None, *, r: Any = None, backend: str = "auto", enabled: bool = True,
                  hf_overrides: Optional[Dict[str, Any]] = None, **kwargs) -> Dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (or ``EngineArgs``) serving with DyMU.

    Adds the ``dymu`` config entry to ``hf_overrides`` and the one engine
    setting the plugin needs: no chunked multimodal input (each image reaches
    the language model whole, in one step). Everything else stays as vLLM sets
    it — prefix caching (the plugin's scheduler rounds a hit down to an
    image's start), async scheduling, and on a GPU torch.compile with CUDA
    graphs (merged steps run eagerly, decode steps replay graphs) — except on
    vLLM's CPU platform, where it adds ``enforce_eager=True``: compiled DyMU
    decodes ~10% faster there but the engine starts minutes later (README,
    Serving with vLLM; pass ``enforce_eager=False`` for it). ``kwargs`` pass
    through and win.
    """
    entry: Dict[str, Any] = {"enabled": enabled, "backend": backend}
    if r is not None:
        entry["r"] = r
    if thresholds is not None:
        entry["thresholds"] = thresholds
    overrides = dict(hf_overrides or {})
    overrides["dymu"] = entry
    settings_from_config(type("Config", (), {"dymu": entry})())  # fail here, not in the engine
    out: Dict[str, Any] = dict(disable_chunked_mm_input=True)
    if _cpu_platform():
        out["enforce_eager"] = True
    out.update(kwargs)
    out["hf_overrides"] = overrides
    return out


def _cpu_platform() -> bool:
    """Whether vLLM runs on its CPU platform here (False without vLLM)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return False
    return current_platform.is_cpu()
