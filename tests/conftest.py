"""Shared test helpers. Every test draws fresh seeded random data."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter, which must be
# chosen before any @triton.jit decorator runs (kernel modules import lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The vLLM environment of the plugin's tests (scripts/setup_vllm.sh makes it).
VLLM_PYTHON = os.environ.get("DYMU_VLLM_PYTHON", os.path.join(ROOT, "build", "vllm-env", "bin", "python"))

# Where Triton kernels are tested: the GPU when there is one.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen():
    """A seeded generator per test: reproducible, fresh data for each check."""
    return torch.Generator().manual_seed(1234)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
