"""Demo: DToMe keeps few tokens for simple images and many for busy ones.

A small randomly initialised ViT (no weights to download) encodes real
photographs shipped with scikit-image and two synthetic images. Per-layer
thresholds are calibrated on the photographs for an average of ``r`` merges
per block, then every image is encoded with those thresholds; the table shows
tokens kept after each block. The fixed-r ToMe baseline, which keeps the same
count for every image, is shown for comparison.

Run: ``python3 -m dymu_kernels.demo`` (CPU by default, CUDA when present).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .models import TinyViT
from .reference.calibration import calibrate_thresholds
from .reference.dtome import FixedRPolicy, ThresholdPolicy

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_images() -> Dict[str, np.ndarray]:
    """Photographs from scikit-image (shipped with it, offline) plus synthetic ones."""
    try:
        import skimage.data
    except ImportError:
        raise ImportError(
            "the demo needs scikit-image for its sample photographs: pip install scikit-image"
        ) from None
    images = {name: getattr(skimage.data, name)() for name in PHOTOS}
    images["flat blue (synthetic)"] = np.broadcast_to(np.array([40, 90, 200], dtype=np.uint8), (256, 256, 3))
    ramp = np.linspace(0, 255, 256, dtype=np.float64)
    images["gradient (synthetic)"] = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8)
    return images


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """HWC/HW uint8 or bool array -> CLIP-normalised ``[3, size, size]`` float."""
    t = torch.from_numpy(np.asarray(image, dtype=np.float32) / (1.0 if image.dtype == bool else 255.0))
    if t.dim() == 2:
        t = t[:, :, None].expand(-1, -1, 3)
    t = t[:, :, :3].permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (t - mean) / std


def run_demo(device: str = "cpu", r: int = 12, seed: int = 0, progress: bool = True) -> Dict[str, object]:
    """Calibrate, merge, and return per-image token counts (see module doc)."""
    torch.manual_seed(seed)
    model = TinyViT().to(device).eval()
    images = load_images()
    names = list(images)
    batch = torch.stack([preprocess(images[n], model.image_size) for n in names]).to(device)
    photos = batch[: len(PHOTOS)]
    with torch.no_grad():
        thresholds = calibrate_thresholds(
            model, photos.split(4), r, num_layers=model.depth, model="TinyViT(random init)", progress=progress
        )
        dymu = model(batch, ThresholdPolicy(thresholds.thresholds))
        tome = model(batch, FixedRPolicy(thresholds.r))
    return {
        "names": names,
        "thresholds": thresholds,
        "num_tokens": model.num_tokens,
        "dymu_per_layer": torch.stack(dymu.tokens_per_layer, dim=1).cpu(),  # [B, depth]
        "tome_kept": tome.lengths.cpu(),
    }


def format_table(result: Dict[str, object]) -> str:
    names: List[str] = result["names"]
    per_layer: torch.Tensor = result["dymu_per_layer"]
    depth = per_layer.shape[1]
    head = f"{'image':<24}" + "".join(f"{'blk' + str(i):>7}" for i in range(depth)) + f"{'DyMU kept':>11}{'ToMe kept':>11}"
    lines = [head, "-" * len(head)]
    for i, name in enumerate(names):
        row = "".join(f"{int(c):>7}" for c in per_layer[i])
        lines.append(f"{name:<24}{row}{int(per_layer[i, -1]):>11}{int(result['tome_kept'][i]):>11}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--r", type=int, default=12, help="average merges per block used for calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-thresholds", metavar="PATH", help="write the calibrated thresholds JSON here")
    args = p.parse_args(argv)
    res = run_demo(args.device, args.r, args.seed, progress=sys.stderr.isatty())
    thr = res["thresholds"]
    print(f"DyMU token merging on a random TinyViT ({res['num_tokens']} tokens: CLS + patches), device={args.device}")
    print(f"thresholds calibrated on {thr.num_images} photographs for r={args.r} merges/block:")
    print("  " + ", ".join(f"{t:.4f}" for t in thr.thresholds))
    print()
    print("tokens kept after each block (DyMU adapts to the image; ToMe keeps a fixed count):")
    print(format_table(res))
    if args.save_thresholds:
        thr.save(args.save_thresholds)
        print(f"\nthresholds written to {args.save_thresholds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
