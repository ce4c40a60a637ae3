"""The paper's Table 1, counted with fvcore as the paper did."""

import pytest

pytest.importorskip("fvcore")

from dymu_kernels import flops  # noqa: E402


def test_table1_reproduces_the_papers_mflops():
    rows = {r["setting"]: r for r in flops.table1()}
    got = {name: round(r["fvcore_mflops"], 1) for name, r in rows.items()}
    assert got == {"original": 2717.9, "VTU low": 1423.8, "VTU mid": 1670.5, "VTU high": 2630.6}
    # The fused kernel does the original attention's work (half of it causally).
    assert all(r["fused_mflops"] == rows["original"]["fvcore_mflops"] for r in rows.values())
    assert all(r["fused_causal_mflops"] * 2 == r["fused_mflops"] for r in rows.values())
    markdown = flops.table1_markdown(list(rows.values()))
    assert "| VTU low | 576 | 89 | 1423.8 | 0.52 |" in markdown


@pytest.mark.parametrize("n,n_un,heads,head_dim", [(37, 5, 3, 16), (50, 50, 1, 8), (64, 1, 2, 32)])
def test_counts_follow_the_closed_forms(n, n_un, heads, head_dim):
    """Per head: original 2·N²·D MACs; decomposed VTU 2·N_un²·D + N²·D; fused
    (its registered formula) the original's, halved when causal."""
    assert flops.original_attention_macs(n, heads, head_dim) == heads * 2 * n * n * head_dim
    assert flops.decomposed_vtu_macs(n, n_un, heads, head_dim) == heads * (2 * n_un**2 * head_dim + n * n * head_dim)
    assert flops.fused_attention_macs(n, n_un, heads, head_dim, causal=False) == heads * 2 * n * n * head_dim
    assert flops.fused_attention_macs(n, n_un, heads, head_dim, causal=True) == heads * n * n * head_dim


def test_bad_counts_raise():
    with pytest.raises(ValueError, match="n_un must be in \\[1, n=8\\], got 9"):
        flops.decomposed_vtu_macs(8, 9, 1, 8)


def test_table1_providers_compute_the_same_attention():
    """benchmarks/table1.py times like with like: every VTU provider returns the
    reference's output, and SDPA at N on the expanded tensors re-merges to it."""
    import importlib.util
    import os
    import sys

    import torch

    from dymu_kernels import reference as ref

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    spec = importlib.util.spec_from_file_location("table1", os.path.join(root, "benchmarks", "table1.py"))
    table1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table1)
    data = table1.inputs(n=40, n_un=9, heads=8, head_dim=16, device="cpu", dtype=torch.float32, seed=3)
    q, k, v, merge_map, cos, sin = data
    expected = ref.vtu_attention_expand(q, k, v, merge_map, cos, sin)
    outs = {name: fn() for name, fn in table1.providers(*data, "cpu").items()}
    assert set(outs) == set(table1.PROVIDERS)
    outs["sdpa at N (expanded)"] = ref.segment_mean(outs["sdpa at N (expanded)"], merge_map, 9)
    for name, out in outs.items():
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=name)
    assert int(merge_map.max()) == 8 and merge_map.shape == (1, 40)
