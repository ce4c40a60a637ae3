"""Threshold calibration, schedules and the versioned threshold file."""

import json

import pytest
import torch

from conftest import randn

from dymu_kernels import Thresholds, calibrate_thresholds, merge_schedule, published_thresholds
from dymu_kernels.models import TinyViT
from dymu_kernels.reference import ThresholdCalibrator, ThresholdPolicy, batch_top_k_mask


@pytest.mark.parametrize("kind", ["constant", "linear", "reverse_linear"])
@pytest.mark.parametrize("r,layers", [(21, 24), (16, 23), (8, 24), (5, 7), (0, 3), (1, 1)])
def test_schedules_sum_to_total(kind, r, layers):
    sched = merge_schedule(r, layers, kind)
    assert len(sched) == layers and sum(sched) == r * layers and min(sched) >= 0
    if kind == "linear":
        assert sched == sorted(sched, reverse=True)
    if kind == "reverse_linear":
        assert sched == sorted(sched)
    if kind == "constant":
        assert sched == [r] * layers
    if kind != "constant" and r * layers >= 2 * layers:
        assert sched[0] != sched[-1]  # it really is a slope


def test_schedule_errors():
    with pytest.raises(ValueError, match="schedule must be one of"):
        merge_schedule(4, 3, "cosine")
    with pytest.raises(ValueError, match="r must be a non-negative int"):
        merge_schedule(-1, 3)
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        merge_schedule(1, 0)


def test_batch_top_k_edges_exceed_threshold(gen):
    node_max = randn(6, 50, gen=gen).sigmoid()
    node_max[:, 0] = float("-inf")  # CLS
    node_max[2, 30:] = float("-inf")  # padding of a short image
    for k in (0, 1, 17, 100, 6 * 49 - 21):  # 6*49-20 edges can merge
        mask, thr = batch_top_k_mask(node_max, k)
        assert int(mask.sum()) == k
        assert int((node_max > thr).sum()) == k  # exactly k edges exceed the found threshold
        finite = node_max[torch.isfinite(node_max)]
        assert thr == float(finite.sort(descending=True).values[k])  # best edge left unmerged
    mask, thr = batch_top_k_mask(node_max, 10_000)  # more than can merge: all merge, threshold 0
    assert int(mask.sum()) == int(torch.isfinite(node_max).sum()) and thr == 0.0
    mask, thr = batch_top_k_mask(-node_max.abs(), 3)  # negative scores: clamped at 0
    assert thr == 0.0


def test_batch_level_merges_unevenly_across_images(gen):
    node_max = torch.cat([randn(1, 40, gen=gen).sigmoid() * 0.5, randn(1, 40, gen=gen).sigmoid() * 0.5 + 0.5])
    mask, _ = batch_top_k_mask(node_max, 20)
    assert mask[1].sum() == 20 and mask[0].sum() == 0  # the "simpler" image takes all merges


def small_vit():
    torch.manual_seed(0)
    return TinyViT(image_size=64, patch_size=8, width=48, depth=4, heads=2).eval()


def test_calibrated_thresholds_reproduce_batch_merges(gen):
    """On the calibration batch itself, thresholding at the found values merges exactly
    r_i * B tokens in every layer (the batch-level definition)."""
    model = small_vit()
    images = randn(6, 3, 64, 64, gen=gen)
    r = merge_schedule(6, 4, "linear")
    thr = calibrate_thresholds(model, [images], r, progress=False)
    assert thr.num_images == 6 and thr.r == r and thr.schedule == "custom"

    class Recorder(ThresholdPolicy):
        merged = []

        def select(self, layer, node_max):
            mask = super().select(layer, node_max)
            self.merged.append(int(mask.sum()))
            return mask

    rec = Recorder(thr.thresholds)
    with torch.no_grad():
        model(images, rec)
    assert rec.merged == [ri * 6 for ri in r]


def test_running_mean_over_batches(gen):
    model = small_vit()
    batches = [randn(3, 3, 64, 64, gen=gen) for _ in range(3)]
    together = calibrate_thresholds(model, batches, 5, num_layers=4, progress=False)
    singles = [calibrate_thresholds(model, [b], 5, num_layers=4, progress=False).thresholds for b in batches]
    expected = [sum(col) / 3 for col in zip(*singles)]
    assert together.num_images == 9 and together.schedule == "constant"
    for got, want in zip(together.thresholds, expected):
        assert got == pytest.approx(want, abs=1e-12)


def test_calibrator_requires_every_layer():
    cal = ThresholdCalibrator([1, 1])
    cal.select(0, torch.rand(2, 5))
    with pytest.raises(RuntimeError, match="no calibration batch reached layers \\[1\\]"):
        cal.thresholds


def test_threshold_file_round_trip(tmp_path):
    t = Thresholds(thresholds=[0.9, 0.8125, 0.5], r=[3, 2, 1], schedule="linear", model="m", num_images=12)
    path = tmp_path / "thr.json"
    t.save(path)
    assert json.loads(path.read_text())["format"] == "dymu_kernels.thresholds"
    assert Thresholds.load(path) == t


BAD_FILES = [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"format": "other"}', "'format' must be"),
    ('{"format": "dymu_kernels.thresholds", "version": 2, "thresholds": [0.5], "r": [1]}', "unsupported version 2"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "r": [1]}', "missing fields \\['thresholds'\\]"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5], "r": [1], "extra": 1}', "unknown fields \\['extra'\\]"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5, NaN], "r": [1, 1]}', "thresholds\\[1\\] must be a finite number"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5, "x"], "r": [1, 1]}', "thresholds\\[1\\] must be a finite number"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [], "r": []}', "'thresholds' must be a non-empty list"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5, 0.4], "r": [1]}', "'r' must be a list with one int per layer \\(2\\)"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5], "r": [-1]}', "r\\[0\\] must be a non-negative int"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5], "r": [1], "schedule": "cos"}', "'schedule' must be one of"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5], "r": [1], "num_images": -3}', "'num_images' must be a non-negative int"),
    ('{"format": "dymu_kernels.thresholds", "version": 1, "thresholds": [0.5], "r": [1], "model": 5}', "'model' must be a string"),
]


@pytest.mark.parametrize("text,match", BAD_FILES)
def test_malformed_threshold_files(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        Thresholds.load(path)


def test_published_thresholds():
    t = published_thresholds()
    assert len(t.thresholds) == 24 and t.r == [21] * 24 and t.thresholds[0] == 0.99609375
    with pytest.raises(ValueError, match="no published thresholds"):
        published_thresholds(level="high")
