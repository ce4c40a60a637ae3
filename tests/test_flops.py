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
