"""Segment mean and unmerge: moving between unique tokens and full positions.

A *merge map* ``m`` of shape ``[B, N]`` says which unique token stands at each
of the N full positions (``-1`` marks padding)::

    positions p :   0  1  2  3  4  5
    m[b, p]     :   0  1  1  2  1  -1        (N = 6, N_un = 3)

``unmerge`` copies unique rows out to positions (``x_full[p] = x_un[m(p)]``)
and ``segment_mean`` averages positions back into unique rows
(``x_un[u] = mean_{p: m(p)=u} x_full[p]``). They are each other's inverse on
constant groups: ``segment_mean(unmerge(x, m), m, N_un) == x`` for every unique
token that appears in ``m``.
"""

from __future__ import annotations

import torch

from .._validation import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_same_device, check_tensor


def _check_map(src: torch.Tensor, index: torch.Tensor, num_segments: int, index_name: str) -> None:
    check_tensor(index_name, index, ndim=2, dtypes=INDEX_DTYPES)
    if index.shape[0] != src.shape[0]:
        raise ValueError(
            f"{index_name} has batch size {index.shape[0]} but the input has {src.shape[0]}"
        )
    check_same_device(src=src, **{index_name: index})
    check_index_range(index_name, index, -1, num_segments, "-1 marks padding")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16/fp32 accumulate in fp32; fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def check_segment_args(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> None:
    """Validate :func:`segment_mean` arguments (shared by every backend)."""
    check_tensor("src", src, ndim=range(3, 8), dtypes=FLOAT_DTYPES)
    if isinstance(num_segments, bool) or not isinstance(num_segments, int) or num_segments < 0:
        raise ValueError(f"num_segments must be a non-negative int, got {num_segments!r}")
    _check_map(src, index, num_segments, "index")
    if index.shape[1] != src.shape[-2]:
        raise ValueError(
            f"index has {index.shape[1]} positions but src has {src.shape[-2]} rows (dim -2)"
        )


def segment_mean(src: torch.Tensor, index: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Average the rows of ``src`` that share a segment index.

    Args:
        src: ``[B, *G, N, F]`` float tensor (``G`` any number of middle dims,
            e.g. heads); rows are along dim ``-2``.
        index: ``[B, N]`` int32/int64, segment of each row, ``-1`` = skip.
            The same index is used for every middle dim.
        num_segments: ``S``, number of output segments; values must be < S.

    Returns:
        ``[B, *G, S, F]`` in ``src.dtype``; accumulated in fp32 (fp64 for fp64
        input). A segment no row maps to is all zeros.

    Raises:
        TypeError/ValueError on wrong dtypes, ranks, batch sizes, devices or
        (on CPU, or in debug mode on GPU) indices outside ``[-1, S)``.
    """
    check_segment_args(src, index, num_segments)
    B, N, F = src.shape[0], src.shape[-2], src.shape[-1]
    mid = src.shape[1:-2]
    acc = accumulation_dtype(src.dtype)
    flat = src.reshape(B, -1, N, F).to(acc)
    G = flat.shape[1]
    # Padding goes to an extra dump segment S that is dropped at the end.
    idx = torch.where(index >= 0, index.long(), num_segments)
    sums = torch.zeros(B, G, num_segments + 1, F, dtype=acc, device=src.device)
    sums.scatter_add_(2, idx[:, None, :, None].expand(B, G, N, F), flat)
    counts = torch.zeros(B, num_segments + 1, dtype=acc, device=src.device)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=acc))
    mean = sums[:, :, :num_segments] / counts[:, None, :num_segments, None].clamp_min(1)
    return mean.to(src.dtype).reshape(B, *mid, num_segments, F)


def unmerge(x_un: torch.Tensor, merge_map: torch.Tensor) -> torch.Tensor:
    """Copy unique rows out to full positions.

    Args:
        x_un: ``[B, *G, N_un, F]``.
        merge_map: ``[B, N]`` int32/int64 in ``[-1, N_un)``; ``-1`` = padding.

    Returns:
        ``[B, *G, N, F]`` with ``out[..., p, :] = x_un[..., m(p), :]`` and zeros
        at padding positions.
    """
    check_tensor("x_un", x_un, ndim=range(3, 8))
    n_un = x_un.shape[-2]
    _check_map(x_un, merge_map, n_un, "merge_map")
    B, N, F = x_un.shape[0], merge_map.shape[1], x_un.shape[-1]
    mid = x_un.shape[1:-2]
    flat = x_un.reshape(B, -1, n_un, F)
    idx = merge_map.long().clamp_min(0)[:, None, :, None].expand(B, flat.shape[1], N, F)
    out = flat.gather(2, idx)
    out = out.masked_fill((merge_map < 0)[:, None, :, None], 0)
    return out.reshape(B, *mid, N, F)
