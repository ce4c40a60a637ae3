"""Triton launch grids stay within CUDA's limits (dim 0 < 2^31, dims 1 and 2
<= 65535) at batch x heads products beyond 65535, where a grid with B*H in
dim 1 fails to launch (decode at B = 2049, H = 32). The grids are computed
on the CPU; one interpreter run checks the kernels still index the right
(b, h, tile) from the folded dim 0."""

import pytest
import torch

from conftest import TRITON_DEVICE, randn

pytest.importorskip("triton")

import dymu_kernels  # noqa: E402
from dymu_kernels import reference as ref  # noqa: E402
from dymu_kernels.ops import dtome_triton, vtu_triton  # noqa: E402
from dymu_kernels.ops.triton_utils import GRID_LIMITS, launch_grid  # noqa: E402


def within_cuda_limits(grid):
    assert len(grid) <= 3
    return grid[0] < 2**31 and all(d <= 65535 for d in grid[1:]) and all(d >= 1 for d in grid)


@pytest.mark.parametrize("B,H,T", [(2049, 32, 1), (4096, 32, 4), (2049, 32, 300), (65536, 64, 1)])
def test_vtu_grids_within_cuda_limits_beyond_65535_heads(B, H, T):
    assert B * H > 65535
    for block_m in (16, 64, 128):
        for splits in (1, 3, 264):
            grid = vtu_triton.fwd_grid(B, H, T, block_m, splits)
            assert within_cuda_limits(grid), grid
            # every (b, h, query tile) is launched exactly once, key slices in dim 2
            assert grid[0] * grid[1] == B * H * -(-T // block_m) and grid[2] == splits
    assert within_cuda_limits(vtu_triton.combine_grid(B, H, T))
    assert within_cuda_limits(vtu_triton.segment_mean_grid(B, H, 600, 32))


@pytest.mark.parametrize("B", [70000, 2049 * 32])
def test_dtome_grids_within_cuda_limits_at_large_batch(B):
    assert within_cuda_limits(dtome_triton.metric_grid(B, 577, 64))
    assert within_cuda_limits(dtome_triton.match_grid(B, 289, 64))
    assert within_cuda_limits(dtome_triton.plan_grid(B))
    assert within_cuda_limits(dtome_triton.plan_grid(B, dtome_triton.plan_tiles(8193)[1]))  # 16k-token images
    assert within_cuda_limits(dtome_triton.merge_grid(B, 577, 1024, 16, 256))


def test_launch_grid_names_the_kernel_over_the_limit():
    assert GRID_LIMITS == (2**31 - 1, 65535, 65535)
    assert launch_grid("k", 2**31 - 1, 65535, 65535) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match=r"_my_kernel.*dim 1.*65535"):
        launch_grid("_my_kernel", 4, 65536)
    with pytest.raises(ValueError, match=r"_my_kernel.*dim 0"):
        launch_grid("_my_kernel", 2**31)


def test_folded_grid_interpreter_matches_reference(gen):
    # Several (b, h) and several query tiles per head in the folded dim 0
    # (N = 150 > BLOCK_M), prefill atomic/deterministic and split-K decode.
    B, H, H_kv, N, D, U = 3, 4, 2, 150, 32, 97
    merge_map = torch.randint(0, U, (B, N), generator=gen)
    merge_map[:, :U] = torch.arange(U)  # every unique row used
    merge_map[1, :5] = -1
    q, k, v = (randn(B, h, U, D, gen=gen, dtype=torch.float64) for h in (H, H_kv, H_kv))
    cos, sin = ref.rope_cos_sin(torch.arange(N)[None] + torch.arange(B)[:, None], D, dtype=torch.float64)
    dev = TRITON_DEVICE
    lo = [t.float().to(dev) for t in (q, k, v)]
    exact = ref.vtu_attention_expand(q, k, v, merge_map, cos, sin)
    for det in (False, True):
        out = dymu_kernels.vtu_attention(*lo, merge_map.to(dev), cos.float().to(dev), sin.float().to(dev),
                                         deterministic=det, backend="triton")
        torch.testing.assert_close(out.double().cpu(), exact, atol=2e-5, rtol=2e-5)
    T = 5
    exact_dec = ref.vtu_decode_attention_ref(q[:, :, :T], k, v, merge_map, cos, sin)
    out = dymu_kernels.vtu_decode_attention(lo[0][:, :, :T], *lo[1:], merge_map.to(dev), cos.float().to(dev),
                                            sin.float().to(dev), backend="triton")
    torch.testing.assert_close(out.double().cpu(), exact_dec, atol=2e-5, rtol=2e-5)
