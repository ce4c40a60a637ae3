"""Calibrate DToMe thresholds for a real vision tower on your images.

API: :func:`calibrate_tower` runs a :class:`~dymu_kernels.core.encoder.DToMeVisionEncoder`
over images (a folder, or any iterable of PIL images / arrays / paths),
preprocessed by the model's own image processor in batches, and returns the
versioned :class:`~dymu_kernels.core.thresholds.Thresholds`.

CLI::

    python3 -m dymu_kernels.calibrate --model llava-hf/llava-1.5-7b-hf --images DIR --level low --out low.json
    python3 -m dymu_kernels.calibrate --model ID_OR_PATH --images DIR --r 12 --schedule linear --out t.json

``--model`` is a LLaVA or LLaVA-OneVision checkpoint (its CLIP / SigLIP tower is
calibrated for the blocks the model reads, ``vision_feature_layer``; every
AnyRes crop counts as one calibration image, as every crop merges), a
Qwen2-VL, Qwen2.5-VL or Qwen3-VL(-MoE) checkpoint (its tower's blocks, merging
2×2 units per image; ``r`` counts units) or a CLIP / SigLIP checkpoint (all
blocks, or ``--num-layers``). ``--level low|mid|high`` are the paper's settings
for CLIP ViT-L/14-336, r = 21 / 16 / 8 merges per block on average (about
89 / 195 / 394 of 576 image tokens kept). Pass the file to
``apply_dymu(model, "low.json")``.

Calibration is batch-level (docs/design.md §1.2): within a batch the most similar
``r * batch_size`` edges of each block are merged, so larger batches spread
the merges over images more faithfully; thresholds are averaged over batches.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import torch

from .core.thresholds import Thresholds, calibrate_thresholds
from .reference.calibration import SCHEDULES

LEVELS = {"low": 21, "mid": 16, "high": 8}  # merges per block, CLIP ViT-L/14-336 (docs/design.md §1.2)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Union[str, os.PathLike]) -> List[Path]:
    """Image files under ``folder`` (recursively, sorted); ValueError if none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"images: {os.fspath(folder)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"images: no image files ({', '.join(IMAGE_SUFFIXES)}) under {os.fspath(folder)!r}")
    return files


def _open(item):
    """A path becomes an RGB PIL image; images and arrays pass through."""
    if isinstance(item, (str, os.PathLike)):
        from PIL import Image

        with Image.open(item) as im:
            return im.convert("RGB")
    return item


def _tower_batch(processor, images):
    """``[n, 3, H, W]`` tower inputs of ``images``. AnyRes processors
    (LLaVA-OneVision) give ``[images, crops, 3, H, W]`` padded with all-zero
    crops: every real crop is calibrated (as the model merges every crop), the
    padding is dropped. Qwen2-VL-type processors give patch rows and grids:
    ``(pixel_values [L, 1176], image_grid_thw [n, 3])``."""
    out = processor(images=images, return_tensors="pt")
    if "image_grid_thw" in out:
        return out["pixel_values"], out["image_grid_thw"]
    pixels = out["pixel_values"]
    if pixels.dim() == 5:
        pixels = pixels.flatten(0, 1)
        pixels = pixels[pixels.flatten(1).abs().amax(1) > 0]
    return pixels


def pixel_batches(images: Iterable, processor, batch_size: int) -> Iterator:
    """Tower batches of up to ``batch_size`` images (all their crops), made by ``processor``."""
    batch = []
    for item in images:
        batch.append(_open(item))
        if len(batch) == batch_size:
            yield _tower_batch(processor, batch)
            batch = []
    if batch:
        yield _tower_batch(processor, batch)


def calibrate_tower(
    encoder,
    images: Union[str, os.PathLike, Iterable],
    r: Union[int, Sequence[int]],
    *,
    processor,
    batch_size: int = 16,
    schedule: str = "constant",
    model: str = "",
    device: Union[None, str, torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    progress: bool = True,
) -> Thresholds:
    """Per-block thresholds for ``encoder`` that merge ``r`` tokens per image
    and block on average over ``images``.

    Args:
        encoder: a DToMe tower whose ``forward(pixel_values, policy)`` lets the
            calibration policy choose the merges, e.g.
            ``DToMeVisionEncoder(clip_vision_model, num_layers=23)``; its
            ``num_layers`` blocks are calibrated.
        images: a folder (searched recursively for image files) or an
            iterable of PIL images, arrays or paths.
        r: merges per image and block on average (with ``schedule``), or one
            value per block.
        processor: the model's image processor (``AutoImageProcessor``).
        batch_size: images per calibration batch (>= 1).
        device, dtype: where and in which dtype the tower runs (default: as
            the encoder's parameters are).
        progress: tqdm bar over batches.

    Returns:
        :class:`Thresholds` (save with ``.save(path)``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    total = None
    if isinstance(images, (str, os.PathLike)):
        images = image_files(images)
    if hasattr(images, "__len__"):
        if len(images) == 0:
            raise ValueError("images is empty: calibration needs at least one image")
        total = math.ceil(len(images) / batch_size)
    param = next(encoder.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    dtype = dtype or (param.dtype if param is not None else torch.float32)

    def moved(batch):  # pixels in the tower's dtype; grids (Qwen) stay integers
        if isinstance(batch, tuple):
            return batch[0].to(device=device, dtype=dtype), batch[1].to(device)
        return batch.to(device=device, dtype=dtype)

    def run(batch, policy):
        return encoder(*batch, policy=policy) if isinstance(batch, tuple) else encoder(batch, policy)

    batches = (moved(b) for b in pixel_batches(images, processor, batch_size))
    return calibrate_thresholds(run, batches, r, num_layers=encoder.num_layers,
                                schedule=schedule, model=model, progress=progress, total=total)


def load_tower(model_id: str, num_layers: Optional[int] = None, dtype: Optional[torch.dtype] = None):
    """``(encoder, processor)`` for a checkpoint (hub id or path) of a
    supported family (:mod:`dymu_kernels.families`: LLaVA, LLaVA-OneVision,
    the Qwen-VL families) or of a CLIP / SigLIP tower."""
    import transformers

    from .core.encoder import DToMeVisionEncoder
    from .families import families

    config = transformers.AutoConfig.from_pretrained(model_id)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    towers = {"clip": transformers.CLIPVisionModel, "clip_vision_model": transformers.CLIPVisionModel,
              "siglip": transformers.SiglipVisionModel, "siglip_vision_model": transformers.SiglipVisionModel}
    family = families().get(config.model_type)
    if family is not None:
        vlm = getattr(transformers, family.class_name).from_pretrained(model_id, **kwargs)
        tower = getattr(vlm.model, family.tower_attr).eval()
        if family.tower_attr == "visual":  # the Qwen-VL towers: DToMe on 2x2 units in every block
            from .families.qwen_vit import QwenUnitDToMe

            return QwenUnitDToMe(tower), transformers.AutoImageProcessor.from_pretrained(model_id)
        from .families.towers import _vision_blocks

        num_layers = num_layers or _vision_blocks(vlm.model.config, tower)
    elif config.model_type in towers:
        tower = towers[config.model_type].from_pretrained(model_id, **kwargs)
    else:
        supported = ", ".join(sorted(set(families()) | set(towers)))
        raise ValueError(f"--model {model_id!r} is a {config.model_type!r} checkpoint; expected one of: {supported}")
    processor = transformers.AutoImageProcessor.from_pretrained(model_id)
    return DToMeVisionEncoder(tower.eval(), num_layers=num_layers), processor


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m dymu_kernels.calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="LLaVA, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE), CLIP or SigLIP checkpoint: hub "
                             "id or path")
    parser.add_argument("--images", required=True, help="folder of calibration images (searched recursively)")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--level", choices=sorted(LEVELS), help="paper setting: low/mid/high = r 21/16/8")
    target.add_argument("--r", type=int, help="merges per image and block on average")
    parser.add_argument("--schedule", choices=SCHEDULES, default="constant", help="how r is spread over blocks")
    parser.add_argument("--num-layers", type=int, default=None, help="blocks to calibrate (default: what the model reads)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--out", required=True, help="threshold JSON to write")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.r is not None and args.r < 0:
        parser.error(f"--r must be >= 0, got {args.r}")
    r = LEVELS[args.level] if args.level else args.r
    dtype = getattr(torch, args.dtype)
    try:
        files = image_files(args.images)
    except ValueError as e:
        parser.error(str(e))
    encoder, processor = load_tower(args.model, args.num_layers, dtype)
    encoder.to(args.device)
    try:
        thresholds = calibrate_tower(encoder, files, r, processor=processor, batch_size=args.batch_size,
                                     schedule=args.schedule, model=args.model, device=args.device, dtype=dtype,
                                     progress=not args.no_progress)
    except ValueError as e:  # more merges than the tower's tokens allow
        parser.error(f"{'--level' if args.level else '--r'}: {e}")
    thresholds.save(args.out)
    print(f"calibrated {len(thresholds.thresholds)} blocks on {thresholds.num_images} images "
          f"(r = {r}, {args.schedule}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
