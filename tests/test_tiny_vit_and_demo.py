"""The DToMe TinyViT end to end, and the demo: its claim (flat images keep fewer
tokens), its outputs (results.json, PNGs, thresholds, Table 1), its option errors
and ``--model`` on a saved tiny CLIP checkpoint."""

import contextlib
import dataclasses
import errno
import importlib.util
import io
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import randn

from dymu_kernels.models import TinyViT
from dymu_kernels.reference import FixedRPolicy, ThresholdPolicy


def vit(trim):
    torch.manual_seed(0)
    return TinyViT(image_size=64, patch_size=8, width=48, depth=3, heads=2, trim=trim).eval()


@pytest.mark.parametrize("trim", [True, False])
def test_batch_equals_each_image_alone(gen, trim):
    model = vit(trim)
    images = randn(4, 3, 64, 64, gen=gen)
    images[1] = 0.3  # a flat image merges much more than the others
    policy = ThresholdPolicy([0.6, 0.7, 0.8])
    with torch.no_grad():
        batch = model(images, policy)
        for b in range(4):
            alone = model(images[b : b + 1], policy)
            n = int(alone.lengths[0])
            assert int(batch.lengths[b]) == n
            assert [int(t[b]) for t in batch.tokens_per_layer] == [int(t[0]) for t in alone.tokens_per_layer]
            assert torch.equal(batch.pos_map[b], alone.pos_map[0])
            torch.testing.assert_close(batch.features[b, :n], alone.features[0, :n], atol=1e-5, rtol=1e-5)
    assert int(batch.lengths[1]) < int(batch.lengths.max())


def test_threshold_above_one_equals_no_merging(gen):
    model = vit(True)
    images = randn(2, 3, 64, 64, gen=gen)
    with torch.no_grad():
        plain = model(images)
        none = model(images, ThresholdPolicy([1.5] * 3))
    assert (none.lengths == model.num_tokens).all()
    # Only the order changes (kept A tokens first, then B): map it back.
    order = none.pos_map.long()
    torch.testing.assert_close(none.features.gather(1, order[..., None].expand_as(plain.features)), plain.features)


def test_fixed_r_keeps_the_same_count_for_every_image(gen):
    model = vit(True)
    out = model(randn(3, 3, 64, 64, gen=gen), FixedRPolicy([5, 5, 5]))
    assert out.lengths.tolist() == [model.num_tokens - 15] * 3


def test_vit_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match="images must be \\[B, 3, 64, 64\\]"):
        vit(True)(torch.randn(1, 3, 32, 32))


# --------------------------------------------------------------------------- the demo


def _run_main(argv):
    """``demo.main(argv)`` with its stdout captured: ``(exit code, printed text)``."""
    from dymu_kernels import demo

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = demo.main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One default CPU run of the demo CLI into a folder it has to create: (out dir, printed text)."""
    pytest.importorskip("skimage")
    out = tmp_path_factory.mktemp("demo") / "new" / "out"
    rc, printed = _run_main(["--device", "cpu", "--out", str(out)])
    assert rc == 0
    return out, printed


def _results(out):
    with open(out / "results.json") as f:
        return json.load(f)


def test_demo_results_match_the_models_forward(demo_run):
    from dymu_kernels import demo
    from dymu_kernels.core.thresholds import Thresholds

    out, _ = demo_run
    res = _results(out)
    images = demo.load_images()
    assert [r["name"] for r in res["images"]] == list(images)
    env = res["environment"]  # what produced the numbers
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu") and env["dymu_kernels"] == "0.1.0"
    thr = Thresholds.load(out / "thresholds.json")
    assert thr.num_images == len(demo.PHOTOS) and thr.r == [demo.DEFAULT_R] * 6
    # The default tower, rebuilt independently: seed 0, then TinyViT().
    torch.manual_seed(0)
    model = TinyViT().eval()
    batch = torch.stack([demo.preprocess(im, model.image_size) for im in images.values()])
    with torch.no_grad():
        dymu = model(batch, ThresholdPolicy(thr.thresholds))
        tome = model(batch, FixedRPolicy(thr.r))
    assert [r["tokens_kept"] for r in res["images"]] == dymu.lengths.tolist()
    assert [r["tokens_per_block"] for r in res["images"]] == torch.stack(dymu.tokens_per_layer, 1).tolist()
    assert [r["tome_tokens_kept"] for r in res["images"]] == tome.lengths.tolist()
    for b, row in enumerate(res["images"]):  # tokens standing for >= 2 patches, from the final pos_map
        counts = torch.bincount(dymu.pos_map[b].long())
        assert row["merged_tokens"] == int((counts > 1).sum()) and row["merged_tokens"] <= row["tokens_kept"]


def test_demo_flat_image_keeps_fewer_tokens_than_every_photograph(demo_run):
    from dymu_kernels import demo

    out, printed = demo_run
    res = _results(out)
    kept = {r["name"]: r["tokens_kept"] for r in res["images"]}
    photos = [kept[n] for n in demo.PHOTOS]
    assert kept[demo.FLAT] < min(photos)
    assert max(photos) - min(photos) > 10  # counts depend on the image
    assert len({r["tome_tokens_kept"] for r in res["images"]}) == 1  # the ToMe baseline does not adapt
    complexity = {r["name"]: r["complexity_jpeg_bytes_per_pixel"] for r in res["images"]}
    assert complexity[demo.FLAT] < 0.01 < complexity[demo.GRADIENT] < min(complexity[n] for n in demo.PHOTOS)
    summary = res["photographs"]
    assert summary["mean"] == pytest.approx(np.mean(photos))
    assert (summary["min"], summary["max"]) == (min(photos), max(photos))
    assert kept[summary["min_image"]] == min(photos) and kept[summary["max_image"]] == max(photos)
    # The report: one row per image, average and range sentences with these numbers, where the outputs went.
    for name in kept:
        assert name in printed
    assert f"average {np.mean(photos):.1f} of 197 tokens" in printed
    assert f"range {min(photos)}–{max(photos)}" in printed
    assert "JPEG" in printed and str(out) in printed


def test_demo_writes_valid_pngs(demo_run):
    PIL = pytest.importorskip("PIL.Image")
    pytest.importorskip("matplotlib")
    out, printed = demo_run
    for name, min_size in (("merge_groups.png", (1200, 600)), ("tokens_vs_complexity.png", (600, 400))):
        with PIL.open(out / name) as im:
            assert im.format == "PNG"
            assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 10  # not a blank canvas
        packed = (pixels.astype(np.int64) * [65536, 256, 1]).sum(-1)
        assert len(np.unique(packed)) > 50  # photographs or plotted colours, not one fill
        assert name in printed


def test_group_overlay_tints_each_merged_group_and_outlines_tokens():
    from dymu_kernels import demo

    labels = np.array([[1, 1], [2, 3]])  # patches 0 and 1 are one token; 2 and 3 stand alone
    view = np.full((8, 8, 3), 100, dtype=np.uint8)
    img = demo.group_overlay(view, labels, patch=4)
    assert img.shape == (8, 8, 3)
    merged = img[1:3, 1:7].reshape(-1, 3)
    assert (merged == merged[0]).all() and not (merged[0] == 100).all()  # one tint over the whole group
    assert (img[5:7, 1:3] == 100).all() and (img[5:7, 5:7] == 100).all()  # singletons untinted
    assert (img[4, :] == 255).all() and (img[5:, 4] == 255).all()  # white lines between tokens
    assert not (img[:4, 4] == 255).all()  # none inside the merged group
    assert demo.group_overlay(view, labels, patch=4, scale=3).shape == (24, 24, 3)


def test_demo_table1(demo_run):
    pytest.importorskip("fvcore")
    out, printed = demo_run
    table = (out / "table1.md").read_text()
    assert "2717.9" in table and "1423.8" in table
    assert "2717.9" in printed and "0.52×" in printed
    assert _results(out)["table1"][1]["n_un"] == 89


def test_demo_table1_without_fvcore_says_how_to_install(tmp_path, monkeypatch):
    from dymu_kernels import demo

    monkeypatch.setitem(sys.modules, "fvcore", None)
    monkeypatch.setitem(sys.modules, "fvcore.nn", None)
    monkeypatch.setattr(demo, "_table1_rows", demo._table1_rows.__wrapped__)  # bypass the per-process cache
    lines, rows = demo.table1_section(str(tmp_path))
    assert rows is None and "pip install fvcore" in lines[0]
    assert not (tmp_path / "table1.md").exists()


def test_demo_without_matplotlib_skips_figures(tmp_path, monkeypatch, capsys):
    from dymu_kernels import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.save_figures(None, None, str(tmp_path)) == []
    assert "pip install matplotlib" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def _bad_option_cases(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--r", "-1"], "--r must be >= 0"),
        (["--out", str(a_file)], "--out"),
        (["--out", str(a_file / "sub")], "cannot be created or written"),
        (["--thresholds", str(tmp_path / "missing.json")], "--thresholds"),
        (["--thresholds", str(a_file)], "not valid JSON"),
        (["--r", "3", "--thresholds", str(a_file)], "not allowed with argument --r"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available"))
    return cases


def test_demo_rejects_bad_options_before_running(tmp_path, monkeypatch, capsys):
    from dymu_kernels import demo

    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo ran before checking its options")

    monkeypatch.setattr(demo, "run_demo", must_not_run)
    for argv, message in _bad_option_cases(tmp_path):
        with pytest.raises(SystemExit) as exc:
            demo.main(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "out")]))
        assert exc.value.code == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and message in err, (argv, err)
    assert (tmp_path / "a_file").read_text() == "x"  # an existing file is never replaced by the output folder


def test_demo_out_exists_as_file_message(tmp_path, capsys):
    from dymu_kernels import demo

    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(tmp_path / "f")])
    assert exc.value.code == 2
    assert f"--out {str(tmp_path / 'f')!r} exists and is not a directory" in capsys.readouterr().err


def test_demo_rejects_an_unwritable_out_dir(tmp_path, monkeypatch, capsys):
    """An existing folder the user cannot write to (read-only: what the OS
    answers a non-root user creating a file there, simulated so that the test
    also runs as root, which may write anywhere) is refused before the demo runs."""
    from dymu_kernels import demo

    locked = tmp_path / "locked"
    locked.mkdir()
    real = demo.tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.samefile(dir, locked):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))
        return real(*args, dir=dir, **kwargs)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo ran with an --out it cannot write to")

    monkeypatch.setattr(demo.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(demo, "run_demo", must_not_run)
    with pytest.raises(SystemExit) as exc:
        demo.main(["--out", str(locked)])
    assert exc.value.code == 2
    assert f"--out {str(locked)!r} cannot be created or written: {os.strerror(errno.EACCES)}" in capsys.readouterr().err
    assert list(locked.iterdir()) == []


def test_demo_threshold_file_with_too_few_blocks(tmp_path, capsys):
    pytest.importorskip("skimage")
    from dymu_kernels import demo
    from dymu_kernels.core.thresholds import Thresholds

    Thresholds([0.9, 0.9], [1, 1]).save(tmp_path / "two.json")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--thresholds", str(tmp_path / "two.json"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "--thresholds: thresholds has 2 entries but 6 encoder blocks run" in capsys.readouterr().err


def test_demo_uses_published_thresholds_only_for_a_clip_l336_tower_without_r():
    pytest.importorskip("skimage")
    from dymu_kernels import demo, published_thresholds

    tower = demo.tiny_vit_tower("cpu", 0)
    photos = tower.pixels(list(demo.load_images().values())[:4])
    thr, source = demo.choose_thresholds(dataclasses.replace(tower, preset_shaped=True), photos, None, None, "m", False)
    assert thr.thresholds == published_thresholds().thresholds and "published" in source
    thr, source = demo.choose_thresholds(dataclasses.replace(tower, preset_shaped=True), photos, 3, None, "m", False)
    assert thr.r == [3] * 6 and thr.num_images == 4 and "calibrated" in source
    thr, _ = demo.choose_thresholds(tower, photos, None, None, "m", False)
    assert thr.r == [demo.DEFAULT_R] * 6


def test_demo_on_a_saved_tiny_clip_checkpoint(tmp_path):
    pytest.importorskip("skimage")
    transformers = pytest.importorskip("transformers")
    from dymu_kernels import demo
    from dymu_kernels.core.encoder import DToMeVisionEncoder
    from dymu_kernels.core.thresholds import Thresholds

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny-clip"
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=56, patch_size=7,
    )).save_pretrained(ckpt)
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    processor.save_pretrained(ckpt)
    out = tmp_path / "out"
    rc, printed = _run_main(["--model", str(ckpt), "--r", "4", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    assert "calibrated on the 8 photographs for r = 4" in printed and "3 of 3 blocks" in printed
    res = _results(out)
    thr = Thresholds.load(out / "thresholds.json")
    assert thr.r == [4, 4, 4] and res["num_tokens"] == 65
    # Recompute through the package's CLIP encoder with the saved thresholds.
    from PIL import Image

    images = [Image.fromarray(im) for im in demo.load_images().values()]
    enc = DToMeVisionEncoder(transformers.CLIPVisionModel.from_pretrained(ckpt).eval(), thr, num_layers=3)
    with torch.no_grad():
        lengths = enc(processor(images=images, return_tensors="pt")["pixel_values"]).lengths
    assert [r["tokens_kept"] for r in res["images"]] == lengths.tolist()
    assert {r["tome_tokens_kept"] for r in res["images"]} == {65 - 3 * 4}
    if importlib.util.find_spec("matplotlib") is not None:
        for name in ("merge_groups.png", "tokens_vs_complexity.png"):
            assert (out / name).stat().st_size > 10_000


def test_demo_refuses_a_checkpoint_it_does_not_run(tmp_path, capsys):
    """``--model`` with a Qwen checkpoint (its config is enough to tell): a
    clear error naming the type and what to run instead, before the output
    folder is made (it crashed with an AttributeError, leaving an empty folder)."""
    transformers = pytest.importorskip("transformers")
    from dymu_kernels import demo

    config = transformers.Qwen2_5_VLConfig(vision_config=dict(depth=1, hidden_size=32, num_heads=2,
                                                              out_hidden_size=64),
                                           text_config=dict(hidden_size=64, num_hidden_layers=1,
                                                            num_attention_heads=2, num_key_value_heads=1))
    config.save_pretrained(tmp_path / "qwen")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        demo.main(["--model", str(tmp_path / "qwen"), "--out", str(out)])
    assert exc.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "is a 'qwen2_5_vl' checkpoint; the demo runs CLIP towers" in err
    assert "python3 -m dymu_kernels.calibrate --model" in err
