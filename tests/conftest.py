"""Shared test helpers. Every test draws fresh seeded random data."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in its CPU interpreter, which must be
# chosen before any @triton.jit decorator runs (kernel modules import lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where Triton kernels are tested: the GPU when there is one.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def gen():
    """A seeded generator per test: reproducible, fresh data for each check."""
    return torch.Generator().manual_seed(1234)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
