"""Shared test helpers. Every test draws fresh seeded random data."""

import os

# Triton's CPU interpreter must be chosen before any @triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture
def gen():
    """A seeded generator per test: reproducible, fresh data for each check."""
    return torch.Generator().manual_seed(1234)


def randn(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
