"""Calibrating a real (randomly initialised) CLIP tower on photographs: the API
over a folder with the model's image processor, the threshold file, the CLI."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
Image = pytest.importorskip("PIL.Image")

from dymu_kernels.calibrate import LEVELS, calibrate_tower, image_files, load_tower, main  # noqa: E402
from dymu_kernels.core.encoder import DToMeVisionEncoder
from dymu_kernels.hf import apply_dymu  # noqa: E402
from dymu_kernels.core.thresholds import Thresholds, published_thresholds
from dymu_kernels.reference.calibration import merge_schedule  # noqa: E402

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "hubble_deep_field")
SIZE = 56  # 8 x 8 patches of 7 px


def tiny_clip(seed=0):
    torch.manual_seed(seed)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=SIZE, patch_size=7)
    return transformers.CLIPVisionModel(config).eval()


def processor():
    return transformers.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """The photographs as small PNG/JPEG files in nested folders (and a non-image file)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "more").mkdir()
    for i, name in enumerate(PHOTOS):
        array = np.asarray(getattr(skimage_data, name)())
        image = Image.fromarray(array).convert("RGB").resize((96, 80))
        image.save(root / ("more" if i % 2 else ".") / f"{name}.{'png' if i % 3 else 'jpg'}")
    (root / "notes.txt").write_text("not an image")
    return root


def merges_per_block(encoder, thresholds, pixel_values):
    """Average tokens merged per image in each block, at inference with ``thresholds``."""
    scored = DToMeVisionEncoder(encoder.vision, thresholds, num_layers=encoder.num_layers, backend="torch")
    with torch.no_grad():
        counts = torch.stack(scored(pixel_values).tokens_per_layer, 1).double()  # [n_img, blocks]
    before = torch.cat([torch.full_like(counts[:, :1], pixel_values.shape[-1] ** 2 / 49 + 1), counts[:, :-1]], 1)
    return (before - counts).mean(0)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_calibrated_tower_merges_r_per_block_on_its_images(photo_dir, schedule):
    """Thresholds calibrated on a folder (one batch of all its images) merge,
    on those images, the requested average number of tokens in every block
    (within one token)."""
    encoder = DToMeVisionEncoder(tiny_clip(), num_layers=3)
    files = image_files(photo_dir)
    assert [f.suffix for f in files].count(".txt") == 0 and len(files) == len(PHOTOS)
    result = calibrate_tower(encoder, photo_dir, 6, processor=processor(), batch_size=8, schedule=schedule,
                             model="tiny", progress=False)
    assert result.r == merge_schedule(6, 3, schedule) and result.num_images == len(PHOTOS)
    pixels = processor()(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    got = merges_per_block(encoder, result, pixels)
    assert torch.all((got - torch.tensor(result.r, dtype=got.dtype)).abs() <= 1), (got, result.r)


def test_batches_are_averaged(photo_dir):
    """Two batches of four: each block's threshold is the mean of the two
    batches' own calibrations (batch-level calibration, running mean)."""
    encoder = DToMeVisionEncoder(tiny_clip(), num_layers=3)
    files = image_files(photo_dir)
    both = calibrate_tower(encoder, files, 6, processor=processor(), batch_size=4, progress=False)
    halves = [calibrate_tower(encoder, part, 6, processor=processor(), batch_size=4, progress=False)
              for part in (files[:4], files[4:])]
    expected = [(a + b) / 2 for a, b in zip(halves[0].thresholds, halves[1].thresholds)]
    assert both.num_images == 8 and both.thresholds == pytest.approx(expected, abs=1e-12)
    assert halves[0].thresholds != halves[1].thresholds


def test_threshold_file_round_trip_into_a_patched_llava(photo_dir, tmp_path):
    encoder = DToMeVisionEncoder(tiny_clip(), num_layers=2)
    images = [Image.open(f).convert("RGB") for f in image_files(photo_dir)]  # an iterable of PIL images
    result = calibrate_tower(encoder, images, [5, 3], processor=processor(), progress=False)
    path = tmp_path / "t.json"
    result.save(path)
    assert Thresholds.load(path) == result and result.schedule == "custom"
    assert DToMeVisionEncoder(encoder.vision, path, num_layers=2).thresholds == result.thresholds


def test_cli_calibrates_a_saved_llava_end_to_end(photo_dir, tmp_path):
    """``python3 -m dymu_kernels.calibrate`` on a saved LLaVA checkpoint (its
    tower's blocks up to vision_feature_layer) and a folder of images; the
    file equals the API's result and patches the model."""
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                    vocab_size=100)
    config = transformers.LlavaConfig(vision_config=tiny_clip().config, text_config=text, image_token_id=99,
                                      vision_feature_layer=-2)
    torch.manual_seed(0)
    llava = transformers.LlavaForConditionalGeneration(config).eval()
    model_dir = tmp_path / "llava"
    llava.save_pretrained(model_dir)
    processor().save_pretrained(model_dir)
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "dymu_kernels.calibrate", "--model", str(model_dir), "--images", str(photo_dir),
           "--r", "5", "--batch-size", "8", "--out", str(out), "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "calibrated 2 blocks on 8 images" in run.stdout
    from_cli = Thresholds.load(out)
    encoder, proc = load_tower(str(model_dir))
    assert encoder.num_layers == 2  # vision_feature_layer=-2 of 3 blocks
    expected = calibrate_tower(encoder, photo_dir, 5, processor=proc, batch_size=8, model=str(model_dir), progress=False)
    assert from_cli == expected
    apply_dymu(llava, out)
    assert llava._dymu.encoder.thresholds == from_cli.thresholds


def test_cli_and_api_errors(tmp_path, photo_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        main(["--model", "m", "--images", str(empty), "--r", "3", "--out", str(tmp_path / "x.json")])
    assert "no image files" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m", "--images", str(photo_dir), "--r", "3", "--level", "low", "--out", "x.json"])
    assert "not allowed with argument" in capsys.readouterr().err
    encoder = DToMeVisionEncoder(tiny_clip(), num_layers=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        calibrate_tower(encoder, photo_dir, 3, processor=processor(), batch_size=0)
    with pytest.raises(ValueError, match="images is empty"):
        calibrate_tower(encoder, [], 3, processor=processor())
    assert LEVELS == {"low": 21, "mid": 16, "high": 8}
    with pytest.raises(ValueError, match="calibrate them on your images: python3 -m dymu_kernels.calibrate .* --level mid"):
        published_thresholds(level="mid")


def test_onevision_checkpoint_calibrates_every_crop(photo_dir, tmp_path):
    """A saved LLaVA-OneVision checkpoint: its SigLIP tower is loaded, the
    AnyRes processor's crops (padding crops dropped) are the calibration
    batch, and the thresholds merge r per block on those crops."""
    from test_anyres_maps import PINPOINTS, tiny_onevision

    model = tiny_onevision()
    model_dir = tmp_path / "onevision"
    model.save_pretrained(model_dir)
    proc = transformers.LlavaOnevisionImageProcessor(size={"height": 42, "width": 42}, image_grid_pinpoints=PINPOINTS)
    proc.save_pretrained(model_dir)
    encoder, loaded = load_tower(str(model_dir))
    assert encoder.num_layers == 2 and not encoder.cls_token
    files = image_files(photo_dir)
    result = calibrate_tower(encoder, files, 5, processor=loaded, batch_size=len(files), progress=False)
    pixels = loaded(images=[Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
    crops = pixels.flatten(0, 1)
    crops = crops[crops.flatten(1).abs().amax(1) > 0]
    assert result.num_images == crops.shape[0] > len(files)  # several crops per photograph
    scored = DToMeVisionEncoder(encoder.vision, result, num_layers=2, backend="torch")
    with torch.no_grad():
        counts = torch.stack(scored(crops).tokens_per_layer, 1).double()
    before = torch.cat([torch.full_like(counts[:, :1], 36), counts[:, :-1]], 1)
    assert torch.all(((before - counts).mean(0) - 5).abs() <= 1)


def test_cli_calibrates_a_saved_qwen2_5_vl(photo_dir, tmp_path, capsys):
    """The CLI on a saved Qwen2.5-VL checkpoint: the tower's blocks on 2x2
    units, pixels and grids from the model's own image processor; the file
    equals the API's result, patches the model, and its thresholds merge
    about r units per image and block on the calibration images."""
    from test_qwen_vl import tiny_qwen
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model = tiny_qwen("qwen2_5_vl")
    model_dir = tmp_path / "qwen"
    model.save_pretrained(model_dir)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112).save_pretrained(model_dir)
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "dymu_kernels.calibrate", "--model", str(model_dir), "--images", str(photo_dir),
           "--batch-size", "4", "--out", str(out), "--no-progress"]
    # More merges than these small images have units for: refused, saying what is feasible, nothing written
    # (it used to write thresholds of 0.0 that merge less than asked). The CLI's main in this process (the
    # run below starts it as `python -m`: each start imports torch and transformers again).
    with pytest.raises(SystemExit) as exit_info:
        main(cmd[3:] + ["--r", "3"])
    assert exit_info.value.code == 2 and not out.exists()
    assert re.search(r"--r: r asks for 3 merges per image in block \d of 4, but only [\d.]+ tokens per image can "
                     r"merge there.*no constant r above about [\d.]+ lasts through 4 blocks", capsys.readouterr().err)
    run = subprocess.run(cmd + ["--r", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "calibrated 4 blocks on 8 images" in run.stdout
    from_cli = Thresholds.load(out)
    encoder, proc = load_tower(str(model_dir))
    expected = calibrate_tower(encoder, photo_dir, 1, processor=proc, batch_size=4, model=str(model_dir),
                               progress=False)
    assert from_cli == expected
    apply_dymu(model, out)
    assert model._dymu.encoder.vit.thresholds == from_cli.thresholds
    from dymu_kernels.families.qwen_vit import QwenUnitDToMe

    enc = proc(images=[Image.open(p).convert("RGB") for p in image_files(photo_dir)], return_tensors="pt")
    with torch.no_grad():
        state, _, per_block, sets, _ = QwenUnitDToMe(model.model.visual, from_cli)(enc["pixel_values"],
                                                                                enc["image_grid_thw"])
    sizes = sets.units
    merged = [sum(sizes) - int(n.sum()) for n in per_block]  # units merged after each block, all images
    expected_merged = [1 * len(sizes) * (i + 1) for i in range(4)]
    for got, want in zip(merged, expected_merged):
        assert abs(got - want) <= 0.5 * want, (merged, expected_merged)
