"""Loader for the compiled C++ extension ``dymu_kernels._C`` (built from csrc/).

The package works without it: the extension is loaded on first use, and a
backend that needs it reports why it is missing instead of failing at import.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the source tree "
    "(needs a C++17 compiler, ninja and pybind11; torch must already be installed)"
)


@functools.lru_cache(maxsize=None)
def _load():
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, f"the C++ extension dymu_kernels._C is not built ({e}); {BUILD_HINT}"
    return _C, None


def extension() -> Optional[ModuleType]:
    """The compiled extension module, or None when it is not built."""
    return _load()[0]


def missing_reason() -> Optional[str]:
    """Why the extension cannot be used, or None when it loaded."""
    return _load()[1]
