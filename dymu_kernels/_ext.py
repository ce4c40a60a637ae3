"""Loader for the compiled C++ extension ``dymu_kernels._C`` (built from csrc/).

The package works without it: the extension is loaded on first use, and a
backend that needs it reports why it is missing instead of failing at import.
Where the package is installed or tested, though, a missing extension is an
error (:func:`check_built`, used by scripts/setup.sh and the tests) unless
``DYMU_NO_EXT=1`` opts out of it on purpose — the same variable that makes
setup.py skip building it.
"""

from __future__ import annotations

import functools
import os
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


def opted_out() -> bool:
    """Whether ``DYMU_NO_EXT=1`` is set: the extension is skipped on purpose."""
    return os.environ.get("DYMU_NO_EXT", "0") == "1"


def check_built() -> Optional[str]:
    """None when the extension loaded, or is missing under the ``DYMU_NO_EXT=1``
    opt-out; otherwise the error to report (a build that should have produced
    it did not). What scripts/setup.sh and the test suite check."""
    reason = missing_reason()
    if reason is None or opted_out():
        return None
    return f"{reason}. Set DYMU_NO_EXT=1 to install and test without the extension on purpose"
