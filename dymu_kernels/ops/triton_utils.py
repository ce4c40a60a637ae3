"""Small Triton helpers shared by the kernels."""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ..backends import interpreter_mode


@triton.jit
def round_bf16_rne(x):
    """Round fp32 to the nearest bf16 value (ties to even), returned as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast(x, DTYPE: tl.constexpr, FIX_RNE: tl.constexpr):
    """``x.to(DTYPE)`` with round-to-nearest-even. FIX_RNE is set under the CPU
    interpreter, whose fp32 -> bf16 conversion truncates (GPUs round to nearest)."""
    if FIX_RNE:
        x = round_bf16_rne(x.to(tl.float32))
    return x.to(DTYPE)


def fix_rne(dtype: torch.dtype) -> bool:
    """Whether kernels must round bf16 by hand (CPU interpreter only)."""
    return interpreter_mode() and dtype == torch.bfloat16


def target_arch(device: torch.device) -> int:
    """Compute capability (e.g. 90) kernels are compiled for on ``device``:
    the device's own on CUDA, else the active Triton driver's target
    (compile-only checks), else 90 (the CPU interpreter ignores it)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    if not interpreter_mode():
        try:
            target = triton.runtime.driver.active.get_current_target()
            if isinstance(target.arch, int):
                return target.arch
        except Exception:  # no GPU driver at all: nothing is compiled anyway
            pass
    return 90


def pow2(n: int, lo: int = 16) -> int:
    """Next power of two >= n, at least ``lo`` (tl.dot needs dims >= 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


# CUDA's launch limits: grid dim x up to 2^31 - 1 blocks, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def launch_grid(kernel: str, *dims: int) -> Tuple[int, ...]:
    """A launch grid checked against CUDA's limits (:data:`GRID_LIMITS`).

    Kernels put their large products (batch x heads x blocks) in dim 0, whose
    limit is 2^31 - 1; dims 1 and 2 hold small counts (key splits, channel
    blocks). A grid beyond the limits raises ValueError naming the kernel,
    instead of failing at launch on the GPU.
    """
    for axis, (size, limit) in enumerate(zip(dims, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"{kernel}: launch grid {tuple(dims)} has {size} programs in dim {axis}, over CUDA's "
                             f"limit of {limit}")
    return tuple(int(d) for d in dims)
