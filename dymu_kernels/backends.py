"""Backends declared as data, and the choice between them.

Every op lists the backends that implement it, best first. Each declaration
says which devices and dtypes it handles and whether its dependencies load;
``select_backend`` turns the first mismatch of each into the error message, so
a user asking for ``backend="cpp"`` learns exactly why it cannot run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import _ext
from ._validation import FLOAT_DTYPES

BACKEND_NAMES = ("auto", "triton", "cpp", "torch")


@dataclass(frozen=True)
class Backend:
    """What one implementation of one op can run on."""

    name: str
    devices: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...] = FLOAT_DTYPES
    # Returns None when usable, else a sentence saying what is missing.
    unavailable: Callable[[], Optional[str]] = field(default=lambda: None)
    # Devices it also runs on in TRITON_INTERPRET=1 mode (slow: tests only, so
    # "auto" never picks them).
    interpreter_devices: Tuple[str, ...] = ()

    def why_not(self, device: torch.device, dtype: torch.dtype, explicit: bool = True) -> Optional[str]:
        devices = self.devices
        if explicit and interpreter_mode():
            devices = devices + self.interpreter_devices
        if device.type not in devices:
            hint = " (or under TRITON_INTERPRET=1)" if self.interpreter_devices and not interpreter_mode() else ""
            return f"inputs are on {device.type} but it runs on {'/'.join(devices)}{hint}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {dtype} is not supported (supports {names})"
        return self.unavailable()


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_missing() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install 'triton>=3.6'"
    return None


TRITON = Backend(
    "triton",
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    unavailable=_triton_missing,
    interpreter_devices=("cpu",),
)
CPP = Backend("cpp", devices=("cpu",), unavailable=_ext.missing_reason)
TORCH = Backend("torch", devices=("cpu", "cuda", "meta"))


def select_backend(op: str, requested: str, candidates: Sequence[Backend], device: torch.device, dtype: torch.dtype) -> str:
    """Name of the backend to run ``op`` with.

    ``requested="auto"`` picks the first usable candidate; a named backend is
    used if it can run, else ``ValueError`` lists why not.
    """
    if requested not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {requested!r}")
    reasons: List[str] = []
    for b in candidates:
        if requested not in ("auto", b.name):
            continue
        why = b.why_not(device, dtype, explicit=requested != "auto")
        if why is None:
            return b.name
        reasons.append(f"{b.name}: {why}")
    if requested != "auto" and not reasons:
        names = [b.name for b in candidates]
        raise ValueError(f"{op} has no {requested!r} backend; it has {names}")
    raise ValueError(f"{op} cannot run with backend={requested!r}: " + "; ".join(reasons))
