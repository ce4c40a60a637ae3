"""Segment mean by index, dispatched to the C++ extension on the CPU.

Same contract as :func:`dymu_kernels.reference.segment_mean`; the C++ kernel
accumulates in fp32 (fp64 for fp64) in position order, so it is deterministic.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..backends import CPP, TORCH, select_backend
from ..reference import segment as ref

BACKENDS = (CPP, TORCH)


@torch.library.custom_op("dymu_kernels::segment_mean_cpp", mutates_args=())
def _segment_mean_cpp(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """The C++ kernel on ``src [B, G, N, F]`` (contiguous) as an op
    torch.compile traces (no graph break): ``[B, G, num_segments, F]``."""
    return _ext.extension().segment_mean(src, index, num_segments)


@_segment_mean_cpp.register_fake
def _(src, index, num_segments):
    return src.new_empty(src.shape[0], src.shape[1], num_segments, src.shape[3])


def _setup_context(ctx, inputs, output):
    _, index, num_segments = inputs
    ctx.save_for_backward(index)
    ctx.num_segments = num_segments


def _backward(ctx, grad):
    """Each row gets its segment's gradient over the segment's row count
    (skipped rows get zero): the mean's adjoint, in plain torch ops."""
    (index,) = ctx.saved_tensors
    B, G, S, F = grad.shape
    idx = torch.where(index >= 0, index.long(), S)
    counts = torch.zeros(B, S + 1, dtype=grad.dtype, device=grad.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=grad.dtype))
    per_segment = torch.cat([grad / counts[:, None, :S, None].clamp_min(1), grad.new_zeros(B, G, 1, F)], 2)
    return per_segment.gather(2, idx[:, None, :, None].expand(B, G, idx.shape[1], F)), None, None


# Training through a patched model (the Qwen tower's per-unit means) differentiates this op.
_segment_mean_cpp.register_autograd(_backward, setup_context=_setup_context)


def segment_mean(src: torch.Tensor, index: torch.Tensor, num_segments: int, *, backend: str = "auto") -> torch.Tensor:
    """Average rows of ``src [B, *G, N, F]`` by ``index [B, N]`` into ``[B, *G, S, F]``.

    ``index`` values lie in ``[-1, S)``; ``-1`` rows are skipped; empty
    segments are zero. ``backend``: ``"auto"`` (C++ on CPU when built, else
    torch), ``"cpp"`` or ``"torch"``. Raises like the reference, and
    ``ValueError`` listing the reasons when the requested backend cannot run.
    """
    if not isinstance(src, torch.Tensor):
        raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
    name = select_backend("segment_mean", backend, BACKENDS, src.device, src.dtype)
    if name == "torch":
        return ref.segment_mean(src, index, num_segments)
    # Validate with the reference's checks, then hand the kernel a flat layout.
    ref.check_segment_args(src, index, num_segments)
    B, N, F = src.shape[0], src.shape[-2], src.shape[-1]
    flat = src.reshape(B, -1, N, F).contiguous()
    out = _segment_mean_cpp(flat, index.contiguous(), num_segments)
    return out.reshape(*src.shape[:-2], num_segments, F)
