"""Backends declared as data, and the choice between them.

Every op lists the backends that implement it, best first. Each declaration
says which devices and dtypes it handles and whether its dependencies load;
``select_backend`` turns the first mismatch of each into the error message, so
a user asking for ``backend="cpp"`` learns exactly why it cannot run.
"""

from __future__ import annotations

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

    def why_not(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if device.type not in self.devices:
            return f"inputs are on {device.type} but it runs on {'/'.join(self.devices)}"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {dtype} is not supported (supports {names})"
        return self.unavailable()


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
        why = b.why_not(device, dtype)
        if why is None:
            return b.name
        reasons.append(f"{b.name}: {why}")
    if requested != "auto" and not reasons:
        names = [b.name for b in candidates]
        raise ValueError(f"{op} has no {requested!r} backend; it has {names}")
    raise ValueError(f"{op} cannot run with backend={requested!r}: " + "; ".join(reasons))
