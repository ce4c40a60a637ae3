"""VTU attention as a real torch op: ``torch.ops.dymu_kernels.vtu_attention``.

The op dispatches to one of three backends:

- ``triton``: the fused kernel (:mod:`.vtu_triton`) on CUDA tensors;
- ``cpp``: the fused CPU kernel of the C++ extension (``csrc/vtu_attention.cpp``:
  gather + RoPE + online softmax over key blocks + re-merge);
- ``torch``: stock PyTorch ops (:mod:`.vtu_torch`: expand + SDPA + segment
  mean), for machines with neither.

The reference (:func:`~dymu_kernels.reference.vtu_attention_expand`) is the
spec they are tested against. The op is registered with ``torch.library`` so that

- ``torch.compile`` traces it (fake implementation: a contiguous output
  shaped like q, as every backend returns);
- ``torch.utils.flop_counter.FlopCounterMode`` counts it (formula below) and
  fvcore counts it with :data:`FVCORE_HANDLES`;
- autograd works: the backward recomputes through the reference.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils.flop_counter import register_flop_formula

from .. import _ext
from ..backends import TORCH, TRITON, Backend, select_backend
from ..reference import vtu as ref
from . import vtu_torch

# The C++ kernel computes in fp32, so fp64 inputs go to the torch backend.
CPP_VTU = Backend(
    "cpp", devices=("cpu",), dtypes=(torch.float16, torch.bfloat16, torch.float32), unavailable=_ext.missing_reason
)
BACKENDS = (TRITON, CPP_VTU, TORCH)


def _kernel_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int):
    """q, k and tables in the one layout every backend computes: the whole head
    rotates (dim j paired with j + D/2) under tables of width D (HF format) or
    D/2 (one entry per frequency).

    Partial rotary (``R = rotary_dim < D``) is mapped onto it rather than
    implemented in each kernel: q and k get the same permutation of their head
    dims (a dot product is invariant under it), which moves the rotary pair
    (j, j + R/2) to (j, j + D/2) and pairs the pass-through dims with each other
    under an identity rotation (cos 1, sin 0). v and the output keep their layout.
    """
    D = q.shape[-1]
    if rotary_dim == D:
        return q, k, cos, sin
    h, p = rotary_dim // 2, (D - rotary_dim) // 2
    dims = torch.arange(D, device=q.device)
    perm = torch.cat([dims[:h], dims[rotary_dim : rotary_dim + p], dims[h:rotary_dim], dims[rotary_dim + p :]])
    ones, zeros = cos.new_ones(*cos.shape[:-1], p), sin.new_zeros(*sin.shape[:-1], p)
    if cos.shape[-1] == h:  # one entry per frequency: a half table of width D/2
        cos, sin = torch.cat([cos, ones], -1), torch.cat([sin, zeros], -1)
    else:  # HF format (halves may differ): width D
        cos = torch.cat([cos[..., :h], ones, cos[..., h:], ones], -1)
        sin = torch.cat([sin[..., :h], zeros, sin[..., h:], zeros], -1)
    return q[..., perm], k[..., perm], cos, sin


def _cpp_tables(cos: torch.Tensor, sin: torch.Tensor, batch: int, n: int):
    """The C++ kernels read fp32 ``[B, N, W]`` tables."""
    w = cos.shape[-1]
    return tuple(t.to(torch.float32).expand(batch, n, w).contiguous() for t in (cos, sin))


def attention_flops(batch: int, heads: int, n: int, d: int, causal: bool = True) -> int:
    """FLOPs of attention over N full positions: QKᵀ and AV, 2 per MAC; causal halves.

    This is what the fused kernel computes (the original model's attention);
    VTU's savings are in the projections and MLP, which run on N_un tokens.
    """
    f = 4 * batch * heads * n * n * d
    return f // 2 if causal else f


@torch.library.custom_op("dymu_kernels::vtu_attention", mutates_args=())
def _vtu_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, merge_map: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, scale: float, causal: bool, deterministic: bool, backend: str,
) -> torch.Tensor:
    if q.numel() == 0 or merge_map.numel() == 0:  # empty batch / no positions: every unique slot is unused (0)
        return q.new_zeros(q.shape)
    if backend == "triton":
        from .vtu_triton import vtu_attention_fwd

        B, N, W = merge_map.shape[0], merge_map.shape[1], cos.shape[-1]
        return vtu_attention_fwd(q, k, v, merge_map, cos.expand(B, N, W), sin.expand(B, N, W), scale, causal, deterministic)
    if backend == "cpp":
        cos32, sin32 = _cpp_tables(cos, sin, *merge_map.shape)
        return _ext.extension().vtu_attention(q, k, v, merge_map, cos32, sin32, scale, causal)
    return vtu_torch.vtu_attention_sdpa(q, k, v, merge_map, cos, sin, scale, causal)


@_vtu_attention_op.register_fake
def _(q, k, v, merge_map, cos, sin, scale, causal, deterministic, backend):
    return q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, merge_map, cos, sin, scale, causal, _, _ = inputs
    ctx.save_for_backward(q, k, v, merge_map, cos, sin)
    ctx.scale, ctx.causal = scale, causal


def _backward(ctx, grad):
    q, k, v, merge_map, cos, sin = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        # The op's tables are in the kernels' layout: the whole head rotates.
        out = ref.vtu_attention_expand(*leaves, merge_map, cos, sin, causal=ctx.causal, scale=ctx.scale,
                                       rotary_dim=q.shape[-1])
        gq, gk, gv = torch.autograd.grad(out, leaves, grad)
    return gq, gk, gv, None, None, None, None, None, None, None


_vtu_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("dymu_kernels::vtu_decode_attention", mutates_args=())
def _vtu_decode_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, merge_map: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, scale: float, backend: str,
) -> torch.Tensor:
    if q.numel() == 0:  # empty batch or no new tokens
        return q.new_zeros(q.shape)
    if backend == "triton":
        from .vtu_triton import vtu_decode_fwd

        B, N, W = merge_map.shape[0], merge_map.shape[1], cos.shape[-1]
        return vtu_decode_fwd(q, k, v, merge_map, cos.expand(B, N, W), sin.expand(B, N, W), scale)
    if backend == "cpp":
        cos32, sin32 = _cpp_tables(cos, sin, *merge_map.shape)
        return _ext.extension().vtu_decode_attention(q, k, v, merge_map, cos32, sin32, scale)
    return vtu_torch.vtu_decode_sdpa(q, k, v, merge_map, cos, sin, scale)


@_vtu_decode_op.register_fake
def _(q, k, v, merge_map, cos, sin, scale, backend):
    return q.new_empty(q.shape)


@register_flop_formula(torch.ops.dymu_kernels.vtu_attention)
def _vtu_flops(q_shape, k_shape, v_shape, map_shape, *args, out_shape=None, **kwargs) -> int:
    causal = args[3] if len(args) > 3 else True
    return attention_flops(q_shape[0], q_shape[1], map_shape[1], q_shape[3], causal)


@register_flop_formula(torch.ops.dymu_kernels.vtu_decode_attention)
def _vtu_decode_flops(q_shape, k_shape, v_shape, map_shape, *args, out_shape=None, **kwargs) -> int:
    # T queries against N keys each (QKᵀ and AV); causality among the T new tokens is ignored.
    return 4 * q_shape[0] * q_shape[1] * q_shape[2] * map_shape[1] * q_shape[3]


def _jit_shape(value):
    return value.type().sizes()


def vtu_attention_flop_jit(inputs, outputs) -> int:
    """fvcore handle: MACs of ``dymu_kernels::vtu_attention`` (fvcore counts MACs)."""
    q, merge_map = _jit_shape(inputs[0]), _jit_shape(inputs[3])
    causal = bool(inputs[7].toIValue()) if len(inputs) > 7 else True
    return attention_flops(q[0], q[1], merge_map[1], q[3], causal) // 2


FVCORE_HANDLES = {"dymu_kernels::vtu_attention": vtu_attention_flop_jit}


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    """The backend to run; ``"auto"`` passes over Triton for head dims its
    kernels do not take (D < 32: tensor-core tiles need k >= 16 per half)."""
    name = select_backend("vtu_attention", backend, BACKENDS, q.device, q.dtype)
    if name == "triton" and q.shape[-1] < 32:
        if backend != "auto":
            raise ValueError(f"the triton backend needs head dim D >= 32, got {q.shape[-1]}")
        return "torch"
    return name


def vtu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    merge_map: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
    deterministic: bool = False,
    backend: str = "auto",
    rotary_dim: Optional[int] = None,
) -> torch.Tensor:
    """Attention over the virtual full sequence, computed from unique tokens (VTU).

    The merge map says which unique token stands at each full position::

        positions p   :  0    1    2    3    4    5    6        N = 7
        merge_map[b]  :  0    1    2    2    1    3    4        N_un = 5
                         txt  img  img  img  img  txt  txt      (-1 = padding)

    Query position p uses ``q[m(p)]`` rotated by RoPE at p, key position s uses
    ``k[m(s)]`` rotated at s; attention is causal on the position index; each
    unique token's output is the mean of its positions' outputs. This equals
    expanding the sequence, running ordinary RoPE attention and averaging per
    group — nothing is approximated (docs/design.md §1.3).

    Args:
        q: ``[B, H, N_un, D]`` queries of the unique tokens, *before* RoPE.
        k, v: ``[B, H_kv, N_un, D]``; ``H_kv`` divides ``H`` (GQA).
        merge_map: ``[B, N]`` int32/int64 in ``[-1, N_un)``; samples may have
            different N (pad with -1) and N_un (pad the unique dim).
        cos, sin: ``[N, W]`` or ``[B, N, W]`` RoPE tables of the full
            positions. Without ``rotary_dim``: HF format, ``W = D`` (as
            ``LlamaRotaryEmbedding`` returns them). With ``rotary_dim = R``:
            HF format ``W = R``, or one entry per frequency ``W = R/2`` (a
            half table: the same rotation from half the table reads). A table
            narrower than D without ``rotary_dim`` is ambiguous and raises.
        causal: causal mask on the full position index.
        scale: softmax scale, default ``D ** -0.5``.
        deterministic: bit-identical results run to run (Triton: re-merge in
            a second pass instead of fp32 atomics; the C++ and torch backends
            always are).
        backend: ``"auto"`` (Triton on CUDA, C++ on the CPU when the
            extension is built, else torch), ``"triton"``, ``"cpp"`` or
            ``"torch"``.
        rotary_dim: RoPE rotates the first R head dims, as FlashAttention's
            ``rotary_dim`` and transformers' partial-rotary models
            (``partial_rotary_factor < 1``): dim j pairs with ``j + R/2``; dims
            ``R..D-1`` pass through unrotated. Even, ``2 <= R <= D``; default D.

    Returns:
        ``[B, H, N_un, D]`` in q's dtype (fp16, bf16, fp32); unique slots that
        no position maps to are 0.

    Non-finite values (NaN, ±inf) are handled alike by every backend, prefill
    and decode (SDPA is no guide: depending on the kernel it picks, NaN keys
    masked by a boolean mask leak, masked NaN values leak as ``0 * NaN``, and
    its CPU flash kernel drops NaN scores):

    - query position p *attends* key position s when both are tokens
      (``merge_map >= 0``) and, when causal, ``s <= p``. Values at positions p
      does not attend (future keys, padding, unused unique slots) never
      influence ``o_p``, NaN/inf included;
    - a NaN or ±inf score of an attended pair (from q, k, cos or sin) makes
      every component of ``o_p`` NaN;
    - values combine in IEEE arithmetic over the attended keys: a NaN in an
      attended v makes that component of ``o_p`` NaN, ±inf makes it ±inf (NaN
      where opposite infinities meet or a weight rounds to 0);
    - a unique token's output is the mean of its positions' outputs: NaN at
      any of them makes it NaN.

    Raises:
        TypeError/ValueError naming the argument for wrong ranks, shapes,
        dtypes, devices, H_kv not dividing H, odd D, cos/sin of the wrong
        length or width (narrower than D without ``rotary_dim``), a bad
        ``rotary_dim``, and (on CPU, or on GPU with ``DYMU_DEBUG=1``)
        merge_map values out of range; ValueError listing why a requested
        backend cannot run (e.g. Triton needs D >= 32).
    """
    cos, sin, scale, rotary_dim = ref.check_vtu_inputs(q, k, v, merge_map, cos, sin, scale, full_tables=False,
                                                       rotary_dim=rotary_dim)
    name = _pick_backend(backend, q)
    q, k, cos, sin = _kernel_rope(q, k, cos, sin, rotary_dim)
    return _vtu_attention_op(q, k, v, merge_map, cos, sin, scale, bool(causal), bool(deterministic), name)


def vtu_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    merge_map: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    scale: Optional[float] = None,
    backend: str = "auto",
    rotary_dim: Optional[int] = None,
) -> torch.Tensor:
    """Decode step of VTU attention over a KV cache stored once per unique token.

    Args:
        q: ``[B, H, T, D]`` pre-RoPE queries of T new tokens, which stand at the
            last T positions of ``merge_map``.
        k, v: ``[B, H_kv, N_un, D]`` pre-RoPE key/value cache, one row per
            unique token (the new tokens' rows already appended).
        merge_map: ``[B, N]`` full position -> cache row (-1 = padding). New
            tokens may be padding too (batched continuation: left padding of a
            shorter prompt, a sample that has finished).
        cos, sin: ``[N, W]`` or ``[B, N, W]`` for all N positions; widths and
            ``rotary_dim`` as in :func:`vtu_attention`.
        scale, backend, rotary_dim: as in :func:`vtu_attention`.

    Returns:
        ``[B, H, T, D]``, contiguous: new token t, at position ``p = N-T+t``,
        attends every non-padding position ``s <= p``. A padding new token
        attends them too (its own position has no key); a token with no such
        position outputs 0, never NaN. NaN/inf as :func:`vtu_attention`
        states, with "attends" as defined here: a NaN/inf in the cache at a
        padding position or after p never reaches token t.

    Raises:
        ValueError/TypeError as :func:`vtu_attention`, and when q has more new
        tokens than merge_map has positions.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a [B, H, T, D] tensor, got {getattr(q, 'shape', type(q).__name__)}")
    if q.shape[2] > merge_map.shape[-1]:
        raise ValueError(f"q has {q.shape[2]} new tokens but merge_map has only {merge_map.shape[-1]} positions")
    widened = q.new_empty(q.shape[0], q.shape[1], k.shape[2], q.shape[3]) if k.dim() == 4 else q
    cos, sin, scale, rotary_dim = ref.check_vtu_inputs(widened, k, v, merge_map, cos, sin, scale, full_tables=False,
                                                       rotary_dim=rotary_dim)
    name = _pick_backend(backend, q)
    q, k, cos, sin = _kernel_rope(q, k, cos, sin, rotary_dim)
    return _vtu_decode_op(q, k, v, merge_map, cos, sin, scale, name)

