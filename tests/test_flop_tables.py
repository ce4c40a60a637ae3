"""benchmarks/flop_tables.py: counts on the meta device equal counts of real runs."""

import importlib.util
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _load("flop_tables")
bench = _load("bench_e2e")


@pytest.mark.parametrize("r", [None, 8])
def test_meta_counts_equal_a_real_patched_run(r):
    """The table's per-component FLOPs (meta device, fixed-r schedule) equal
    FlopCounterMode on a real forward of the same small random LLaVA, stock and
    patched with fixed r (its vision tower trims, so block i runs 257 - r·i tokens)."""
    from dymu_kernels.hf import apply_dymu

    size, layers = "quick", 2
    meta = tables.meta_llava(size, layers)
    expected = tables.stock_flops(meta) if r is None else tables.dymu_flops(meta, r)
    model = bench.build_model(bench.llava_config(size, layers), "cpu", torch.float32, 0)
    inputs = bench.make_inputs(model, 1, "cpu", torch.float32, 0)
    if r is not None:
        apply_dymu(model, r=r, backend="torch")
    cfg = model.config
    vision = bench.count_flops(lambda: model.model.get_image_features(
        pixel_values=inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy))
    total = bench.count_flops(lambda: model.model(**inputs, use_cache=False))
    assert vision == expected["vision"]
    assert total == expected["vision"] + expected["lm"]


def test_table_rows_and_markdown():
    rows = tables.table("quick", 2)
    assert [r["config"] for r in rows] == ["stock", "DyMU low (r=21)", "DyMU mid (r=16)", "DyMU high (r=8)"]
    assert rows[0]["total_ratio"] == 1.0
    ratios = [r["total_ratio"] for r in rows[1:]]
    assert ratios == sorted(ratios) and ratios[-1] < 1  # fewer tokens kept, fewer FLOPs
    assert [r["image_tokens"] for r in rows] == [256, 256 - 5 * 21, 256 - 5 * 16, 256 - 5 * 8]
    assert "| DyMU low (r=21) | 151 |" in tables.markdown(rows)


@pytest.mark.parametrize("r", [0, 1])
@pytest.mark.parametrize("size", ["quick", "quick3"], ids=["qwen2_5_vl", "qwen3_vl"])
def test_qwen_meta_counts_equal_a_real_patched_run(r, size):
    """The Qwen tables' tower and language-model FLOPs (meta device, fixed r
    units per block) equal FlopCounterMode on real forwards of the same tiny
    random model, stock (r = 0) and patched with fixed r: Qwen2.5-VL (windows,
    14-px patches) and Qwen3-VL (no windows, 16-px patches, deepstack tap
    mergers on the units left at their blocks)."""
    from dymu_kernels.hf import apply_dymu

    meta = tables.meta_qwen(size)
    expected = tables.qwen_flops(meta, r)
    torch.manual_seed(0)
    model = type(meta)._from_config(meta.config, attn_implementation="sdpa").eval()
    visual = model.model.visual
    grid = torch.tensor([tables.QWEN3_GRID if size == "quick3" else tables.QWEN_GRID])
    pixels = torch.randn(int(grid.prod()), 3 * 2 * visual.patch_size ** 2)
    if r:
        apply_dymu(model, r=r, backend="torch")
    with torch.no_grad():
        vision = tables._flops(lambda: model.model.get_image_features(pixels, grid))
        feats = model.model.get_image_features(pixels, grid)
    assert vision == expected["vision"]
    units = int(grid.prod()) // 4
    assert [n.shape[0] for n in feats.pooler_output] == [units]
    if size == "quick3":
        assert len(feats.deepstack_features) == 2
    if r:
        kept = units - r * len(visual.blocks)
        assert int(feats.merged_counts[0]) == kept == expected["image_tokens"]
