"""Proportional attention: a key of size s counts as s copies of itself."""

import pytest
import torch

from conftest import randn

from dymu_kernels.reference import proportional_attention, proportional_attention_bias


def test_size_s_key_equals_s_copies(gen):
    B, H, N, D = 2, 3, 7, 16
    q, k, v = (randn(B, H, N, D, gen=gen, dtype=torch.float64) for _ in range(3))
    size = torch.randint(1, 5, (B, N), generator=gen).double()
    size[1, 5:] = 0  # empty slots
    out = proportional_attention(q, k, v, size)
    for b in range(B):
        reps = size[b].long()
        k_rep = k[b].repeat_interleave(reps, dim=1)
        v_rep = v[b].repeat_interleave(reps, dim=1)
        expected = torch.softmax(q[b] @ k_rep.transpose(-1, -2) * D**-0.5, -1) @ v_rep
        torch.testing.assert_close(out[b], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bias_and_low_precision(gen, dtype):
    size = torch.tensor([[1.0, 2.0, 0.0]])
    bias = proportional_attention_bias(size, dtype)
    assert bias.shape == (1, 1, 1, 3) and bias.dtype == dtype
    assert bias[0, 0, 0, 2] == float("-inf") and float(bias[0, 0, 0, 1]) == pytest.approx(0.6931, abs=4e-3)
    q, k, v = (randn(1, 2, 3, 8, gen=gen) for _ in range(3))
    exact = proportional_attention(q.double(), k.double(), v.double(), size.double())
    out = proportional_attention(q.to(dtype), k.to(dtype), v.to(dtype), size)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), exact, atol=3e-2, rtol=3e-2)
