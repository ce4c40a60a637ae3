"""Argument checks shared by every public op.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong shape, device or value) with a message that names the argument and what
was expected, so a user sees what to fix instead of a failure deep inside a
kernel.

Shape/dtype/device checks are free and always run. *Value* checks (an index in
range, lengths within capacity) need to read tensor data; on a CPU tensor that
costs nothing, but on a GPU it would synchronise the host with the device and
break CUDA-graph capture. They therefore run on CPU tensors always and on GPU
tensors only in debug mode (``DYMU_DEBUG=1`` or :func:`set_debug`).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_debug = os.environ.get("DYMU_DEBUG", "0") not in ("", "0", "false", "False")


def set_debug(enabled: bool) -> None:
    """Turn value checks on GPU tensors on or off (they always run on CPU)."""
    global _debug
    _debug = bool(enabled)


def debug_enabled() -> bool:
    return _debug


def values_checkable(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values is free (CPU) or debug mode asks for it.

    Never while ``torch.compile`` traces: the values are not known then, and
    reading them would break the graph."""
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _debug


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor of the given rank(s) and dtype(s)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{name} must have {want} dimensions, got shape {tuple(t.shape)}"
            )
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(
            f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}"
        )
    return t


def check_shape(name: str, t: torch.Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    """Check ``t.shape`` against ``expected`` (None matches any size)."""
    ok = t.dim() == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected)
    )
    if not ok:
        pretty = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {pretty}{extra}, got {tuple(t.shape)}")


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """Check that all named tensors live on one device; return it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all inputs must be on the same device"
            )
    return first.device


def check_index_range(name: str, t: torch.Tensor, low: int, high: int, what: str = "") -> None:
    """Check ``low <= t < high`` elementwise, when values are checkable."""
    if t.numel() == 0 or not values_checkable(t):
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        extra = f" ({what})" if what else ""
        raise ValueError(
            f"{name} values must lie in [{low}, {high - 1}]{extra}, "
            f"got values in [{lo}, {hi}]"
        )


def check_no_nan(name: str, t: torch.Tensor, message: str = "must not contain NaN") -> None:
    """Raise ``ValueError(f"{name} {message}")`` if ``t`` has a NaN, when values are checkable."""
    if t.numel() == 0 or not values_checkable(t):
        return
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} {message}")
