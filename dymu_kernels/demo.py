"""Demo: DToMe keeps few tokens for simple images and many for busy ones.

A vision tower encodes eight photographs shipped with scikit-image and two
synthetic images (a flat colour, a smooth gradient). By default the tower is
a small randomly initialised ViT (no weights to download); ``--model`` runs a
Hugging Face CLIP or LLaVA checkpoint instead. Per-block thresholds come from
``--thresholds FILE``, the paper's published ones (CLIP ViT-L/14-336 towers),
or a calibration on the photographs for an average of ``r`` merges per block.

For every image the demo prints the tokens DyMU keeps after the last block
next to an image-complexity score (JPEG bytes per pixel) and the fixed-r ToMe
count, summarises the photographs, draws which patches became one token, plots
complexity against tokens kept, and prints the paper's Table 1 (FLOPs of VTU
attention). Everything it writes goes into one folder (``--out``).

Run: ``python3 -m dymu_kernels.demo`` (CPU by default, CUDA when present).
"""

from __future__ import annotations

import argparse
import colorsys
import functools
import io
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .models import TinyViT
from .core.thresholds import Thresholds, calibrate_thresholds, published_thresholds
from .reference.dtome import FixedRPolicy, ThresholdPolicy

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "coins")
FLAT = "flat blue (synthetic)"
GRADIENT = "gradient (synthetic)"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_R = 12  # merges per block when calibrating (TinyViT: 197 tokens, 6 blocks)
DEFAULT_OUT = "dymu_demo"
JPEG_QUALITY = 75
CALIBRATION_BATCH = 4
PRESET_MODEL = "openai/clip-vit-large-patch14-336"

RESULTS_JSON = "results.json"
THRESHOLDS_JSON = "thresholds.json"
GROUPS_PNG = "merge_groups.png"
SCATTER_PNG = "tokens_vs_complexity.png"
TABLE1_MD = "table1.md"

COMPLEXITY_WHY = (
    f"complexity = JPEG size (Pillow, quality {JPEG_QUALITY}) of each image as the model sees it (after its "
    "resize/crop), in bytes per pixel beyond a flat image's. JPEG spends bytes on edges and texture and almost none "
    "on flat areas, so this is a cheap, reproducible, model-free measure of how much detail an image has."
)


# --------------------------------------------------------------------------- images and complexity


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Any HW / HWC uint8 or bool array -> contiguous ``[H, W, 3]`` uint8 (gray is replicated, alpha dropped)."""
    a = np.asarray(image)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    a = a.astype(np.uint8, copy=False)
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[:, :, :3])


def load_images() -> Dict[str, np.ndarray]:
    """The demo images, name -> RGB uint8 ``[H, W, 3]``: the photographs of
    :data:`PHOTOS` (shipped with scikit-image, offline), then :data:`FLAT` and
    :data:`GRADIENT`. ImportError (with the pip command) without scikit-image."""
    try:
        import skimage.data
    except ImportError:
        raise ImportError(
            "the demo needs scikit-image for its sample photographs: pip install scikit-image"
        ) from None
    images = {name: to_rgb(getattr(skimage.data, name)()) for name in PHOTOS}
    images[FLAT] = to_rgb(np.broadcast_to(np.array([40, 90, 200], dtype=np.uint8), (256, 256, 3)))
    ramp = np.linspace(0, 255, 256, dtype=np.float64)
    images[GRADIENT] = to_rgb(np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1).astype(np.uint8))
    return images


def preprocess(image: np.ndarray, size: int) -> torch.Tensor:
    """HWC/HW uint8 or bool array -> CLIP-normalised ``[3, size, size]`` float (TinyViT's input)."""
    t = torch.from_numpy(to_rgb(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mean = torch.tensor(CLIP_MEAN)[:, None, None]
    std = torch.tensor(CLIP_STD)[:, None, None]
    return (t - mean) / std


def unnormalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised ``[B, 3, H, W]`` model input -> ``[B, H, W, 3]`` uint8: the images as the model sees them."""
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    x = (pixels.detach().float().cpu() * s + m).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _jpeg_size(rgb: np.ndarray, quality: int) -> int:
    """Bytes of ``rgb`` (``[H, W, 3]`` uint8) encoded as JPEG by Pillow at ``quality``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(to_rgb(rgb)).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue())


def jpeg_bytes_per_pixel(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> float:
    """Image complexity: JPEG bytes of ``rgb`` (``[H, W, 3]`` uint8, Pillow, ``quality``) beyond
    those of a flat grey image of the same size (headers, empty blocks), per pixel; 0 for any flat image."""
    flat = np.full_like(to_rgb(rgb), 128)
    return (_jpeg_size(rgb, quality) - _jpeg_size(flat, quality)) / (rgb.shape[0] * rgb.shape[1])


# --------------------------------------------------------------------------- vision towers


@dataclass
class Tower:
    """What the demo needs of a vision tower.

    ``pixels(images)`` turns RGB uint8 arrays into a normalised batch on the
    tower's device; ``forward(pixels, policy)`` runs it with a merge policy
    (calibration); ``dymu(pixels, thresholds)`` and ``tome(pixels, r)`` run
    it with per-block thresholds / fixed r. Outputs have ``lengths``,
    ``pos_map [B, N0]`` (slot 0 = CLS) and ``tokens_per_layer``.
    """

    description: str
    num_layers: int
    num_tokens: int  # N0 = CLS + patches
    patch_size: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    pixels: Callable[[List[np.ndarray]], torch.Tensor]
    forward: Callable[[torch.Tensor, object], object]
    dymu: Callable[[torch.Tensor, List[float]], object]
    tome: Callable[[torch.Tensor, List[int]], object]
    preset_shaped: bool = False  # a CLIP ViT-L/14-336 tower running 23 or 24 of its 24 blocks
    total_layers: Optional[int] = None  # the tower's blocks, where it runs fewer (a LLaVA checkpoint's CLIP)


def tiny_vit_tower(device: str, seed: int) -> Tower:
    """The default tower: a :class:`TinyViT` randomly initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    model = TinyViT().to(device).eval()
    n_patches = model.num_tokens - 1
    return Tower(
        description=(f"a randomly initialised TinyViT (seed {seed}; {model.image_size} px images, "
                     f"{model.patch_size} px patches: {model.num_tokens} tokens = CLS + {n_patches} patches; "
                     f"{model.depth} blocks)"),
        num_layers=model.depth,
        num_tokens=model.num_tokens,
        patch_size=model.patch_size,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        pixels=lambda images: torch.stack([preprocess(im, model.image_size) for im in images]).to(device),
        forward=lambda x, policy: model(x, policy),
        dymu=lambda x, thr: model(x, ThresholdPolicy(thr)),
        tome=lambda x, r: model(x, FixedRPolicy(r)),
    )


def hf_tower(model_id: str, device: str) -> Tower:
    """A Hugging Face CLIP or LLaVA checkpoint's CLIP tower and image processor,
    loaded with :func:`dymu_kernels.calibrate.load_tower` (LLaVA: the blocks it reads)."""
    from PIL import Image

    from .calibrate import load_tower
    from .core.encoder import DToMeVisionEncoder

    encoder, processor = load_tower(model_id)
    encoder.to(device)
    vision, n = encoder.vision, encoder.num_layers
    cfg = vision.config
    total = len(vision.encoder.layers)
    grid = cfg.image_size // cfg.patch_size
    mean = tuple(getattr(processor, "image_mean", None) or CLIP_MEAN)
    std = tuple(getattr(processor, "image_std", None) or CLIP_STD)
    if getattr(processor, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def pixels(images):
        batch = processor(images=[Image.fromarray(to_rgb(im)) for im in images], return_tensors="pt")["pixel_values"]
        return batch.to(device=device, dtype=next(encoder.parameters()).dtype)

    return Tower(
        description=(f"{model_id}: CLIP tower, {cfg.image_size} px images, {cfg.patch_size} px patches "
                     f"({grid * grid + 1} tokens = CLS + {grid * grid} patches), {n} of {total} blocks run"),
        num_layers=n,
        num_tokens=grid * grid + 1,
        patch_size=cfg.patch_size,
        mean=mean,
        std=std,
        pixels=pixels,
        forward=lambda x, policy: encoder(x, policy),
        dymu=lambda x, thr: DToMeVisionEncoder(vision, thr, num_layers=n)(x),
        tome=lambda x, r: DToMeVisionEncoder(vision, r=r, num_layers=n)(x),
        preset_shaped=(cfg.image_size == 336 and cfg.patch_size == 14 and cfg.hidden_size == 1024
                       and total == 24 and n in (23, 24)),
        total_layers=total,
    )


def check_thresholds(thresholds: Thresholds, tower: Tower) -> List[float]:
    """The thresholds of the blocks ``tower`` runs: one per block, or one per
    block of the whole tower; ValueError for another count or a value out of range."""
    from .core.thresholds import Stage, stage_thresholds  # plain torch; does not import transformers

    return stage_thresholds(thresholds, Stage("vit", "encoder block", tower.num_layers, whole=tower.total_layers))


def choose_thresholds(tower: Tower, photo_pixels: torch.Tensor, r: Optional[int], thresholds: Optional[str],
                      model: str, progress: bool) -> Tuple[Thresholds, str]:
    """``(thresholds, sentence saying where they came from)``, in this order of preference:
    the file ``thresholds``; the paper's published ones for a CLIP ViT-L/14-336-shaped
    tower when ``r`` is None; else calibrated on ``photo_pixels`` for ``r`` (default
    :data:`DEFAULT_R`) merges per block, in batches of :data:`CALIBRATION_BATCH`."""
    if thresholds is not None:
        return Thresholds.load(thresholds), f"read from {thresholds}"
    if tower.preset_shaped and r is None:
        return (published_thresholds(PRESET_MODEL, "low"),
                f"the paper's published {PRESET_MODEL} 'low' thresholds (r = 21 merges per block); "
                "pass --r N to calibrate on the demo photographs instead")
    r = DEFAULT_R if r is None else r
    with torch.no_grad():
        thr = calibrate_thresholds(tower.forward, photo_pixels.split(CALIBRATION_BATCH), r,
                                   num_layers=tower.num_layers, model=model, progress=progress)
    return thr, f"calibrated on the {thr.num_images} photographs for r = {r} merges per block on average"


# --------------------------------------------------------------------------- the run


def run_demo(device: str = "cpu", r: Optional[int] = None, seed: int = 0, progress: bool = True,
             model: Optional[str] = None, thresholds: Optional[str] = None) -> Dict[str, object]:
    """Encode the demo images with DyMU and with fixed-r ToMe; nothing is printed or written.

    Args:
        device: where the tower runs.
        r: merges per block for calibration (None: :data:`DEFAULT_R`, or the
            published thresholds for a CLIP ViT-L/14-336 tower).
        seed: TinyViT's random initialisation (ignored with ``model``).
        model: a Hugging Face CLIP / LLaVA id or path; None for the TinyViT.
        thresholds: a threshold JSON file to use instead of calibrating.

    Returns a dict: ``names``, ``kinds`` ("photograph" / "synthetic"),
    ``description``, ``thresholds`` (:class:`Thresholds`),
    ``thresholds_source``, ``num_tokens``, ``patch_size``, ``tome_r``,
    ``dymu_per_layer`` (``[B, blocks]`` tokens after each block), ``kept``
    (``[B]``, after the last block), ``tome_kept`` (``[B]``), ``pos_map``
    (``[B, N0]``, final slot of each original token, CLS first), ``views``
    (``[B, H, W, 3]`` uint8, the images as the model sees them) and
    ``complexity`` (``[B]`` JPEG bytes per pixel of ``views``).
    """
    images = load_images()
    names = list(images)
    tower = hf_tower(model, device) if model else tiny_vit_tower(device, seed)
    pixels = tower.pixels([images[n] for n in names])
    thr, source = choose_thresholds(tower, pixels[: len(PHOTOS)], r, thresholds,
                                    model or "TinyViT(random init)", progress)
    per_block = check_thresholds(thr, tower)
    tome_r = thr.r[: tower.num_layers]
    with torch.no_grad():
        dymu = tower.dymu(pixels, per_block)
        tome = tower.tome(pixels, tome_r)
    views = unnormalise(pixels, tower.mean, tower.std)
    return {
        "names": names,
        "kinds": ["photograph" if n in PHOTOS else "synthetic" for n in names],
        "description": tower.description,
        "thresholds": thr,
        "thresholds_source": source,
        "num_tokens": tower.num_tokens,
        "patch_size": tower.patch_size,
        "tome_r": tome_r,
        "dymu_per_layer": torch.stack(dymu.tokens_per_layer, dim=1).cpu(),
        "kept": dymu.lengths.cpu(),
        "tome_kept": tome.lengths.cpu(),
        "pos_map": dymu.pos_map.cpu(),
        "views": views,
        "complexity": np.array([jpeg_bytes_per_pixel(v) for v in views]),
    }


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (ties get their average rank); nan if either side is constant."""

    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        out = np.empty(len(v))
        out[np.argsort(v, kind="mergesort")] = np.arange(len(v))
        for value in np.unique(v):
            out[v == value] = out[v == value].mean()
        return out

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def result_rows(res: Dict[str, object]) -> List[Dict[str, object]]:
    """One JSON-ready dict per image (order of ``res["names"]``): name, kind,
    complexity, tokens kept (DyMU, after the last block), per block, ToMe, and
    the number of tokens that stand for more than one patch."""
    rows = []
    for i, name in enumerate(res["names"]):
        slots, counts = np.unique(res["pos_map"][i].numpy(), return_counts=True)
        rows.append({
            "name": name,
            "kind": res["kinds"][i],
            "complexity_jpeg_bytes_per_pixel": round(float(res["complexity"][i]), 5),
            "tokens_kept": int(res["kept"][i]),
            "tokens_per_block": [int(c) for c in res["dymu_per_layer"][i]],
            "tome_tokens_kept": int(res["tome_kept"][i]),
            "merged_tokens": int((counts[slots >= 0] > 1).sum()),
        })
    return rows


def photo_summary(rows: List[Dict[str, object]]) -> Dict[str, object]:
    """Average, min and max tokens kept over the photographs, which ones, and the rank
    correlation of complexity and tokens kept (photographs only and all images)."""
    photos = [r for r in rows if r["kind"] == "photograph"]
    kept = [r["tokens_kept"] for r in photos]
    lo = min(photos, key=lambda r: r["tokens_kept"])
    hi = max(photos, key=lambda r: r["tokens_kept"])

    def rho(rs):  # None when undefined (constant counts), so results.json stays valid JSON
        v = spearman([r["complexity_jpeg_bytes_per_pixel"] for r in rs], [r["tokens_kept"] for r in rs])
        return None if math.isnan(v) else round(v, 4)

    return {"mean": float(np.mean(kept)), "min": lo["tokens_kept"], "max": hi["tokens_kept"],
            "min_image": lo["name"], "max_image": hi["name"], "spearman_photographs": rho(photos),
            "spearman_all": rho(rows)}


# --------------------------------------------------------------------------- figures


def group_labels(pos_map_row: torch.Tensor, grid: int) -> np.ndarray:
    """``[grid, grid]`` token slot of every patch (``pos_map`` without its CLS entry)."""
    return pos_map_row[1:].numpy().reshape(grid, grid)


def group_colours(labels: np.ndarray) -> Dict[int, np.ndarray]:
    """A colour (RGB floats in [0, 1]) per slot that holds more than one patch,
    hues spread by the golden ratio in raster order of each group's first patch."""
    slots, first, counts = np.unique(labels.ravel(), return_index=True, return_counts=True)
    merged = [s for _, s in sorted(zip(first[counts > 1], slots[counts > 1]))]
    return {int(s): np.array(colorsys.hsv_to_rgb((k * 0.6180339887) % 1.0, 0.85, 1.0)) for k, s in enumerate(merged)}


def group_overlay(view: np.ndarray, labels: np.ndarray, patch: int, scale: int = 1, alpha: float = 0.5) -> np.ndarray:
    """The image ``view`` (``[H, W, 3]`` uint8) with every merged group tinted in its
    own colour and white lines between different tokens; patches kept on their own are
    left untinted. Returns ``[g·patch·scale, g·patch·scale, 3]`` uint8 for a ``g × g`` grid."""
    g = labels.shape[0]
    img = view[: g * patch, : g * patch].astype(np.float64) / 255.0
    pix = np.kron(labels, np.ones((patch, patch), dtype=labels.dtype))
    for slot, colour in group_colours(labels).items():
        mask = pix == slot
        img[mask] = (1 - alpha) * img[mask] + alpha * colour
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    pix = np.repeat(np.repeat(pix, scale, axis=0), scale, axis=1)
    edge = np.zeros(pix.shape, dtype=bool)
    edge[:, 1:] |= pix[:, 1:] != pix[:, :-1]
    edge[1:, :] |= pix[1:, :] != pix[:-1, :]
    img[edge] = 1.0
    return (img * 255).round().astype(np.uint8)


def _figure(width: float, height: float):
    """A matplotlib Figure (constrained layout) on the Agg canvas: no pyplot, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_groups_figure(res: Dict[str, object], rows: List[Dict[str, object]], path: str, cols: int = 5) -> None:
    """One PNG grid: each image as the model sees it with its merged groups drawn over it."""
    n = len(rows)
    grid = int(round(math.sqrt(res["num_tokens"] - 1)))
    side = grid * res["patch_size"]
    scale = max(1, int(round(448 / side)))
    rows_n = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 3.7 * rows_n + 0.5)
    for i, row in enumerate(rows):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        labels = group_labels(res["pos_map"][i], grid)
        ax.imshow(group_overlay(res["views"][i], labels, res["patch_size"], scale), interpolation="nearest")
        ax.set_title(f"{row['name']}\n{row['tokens_kept']} of {res['num_tokens']} tokens kept", fontsize=10)
        ax.set_axis_off()
    fig.suptitle("DyMU after the last block: each tinted region is ONE token (patches merged together); "
                 "untinted squares are patches kept on their own", fontsize=11)
    fig.savefig(path)


def save_scatter_figure(res: Dict[str, object], rows: List[Dict[str, object]], path: str) -> None:
    """Complexity (x) against tokens kept (y) with image names, the fixed-r ToMe count
    and the no-merging count as horizontal lines."""
    fig = _figure(8, 5.5)
    ax = fig.add_subplot(1, 1, 1)
    for kind, marker, colour, label in (("photograph", "o", "tab:blue", "photographs (DyMU)"),
                                        ("synthetic", "s", "tab:orange", "synthetic images (DyMU)")):
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter([r["complexity_jpeg_bytes_per_pixel"] for r in sel], [r["tokens_kept"] for r in sel],
                   marker=marker, color=colour, s=45, label=label, zorder=3)
    for r in rows:
        ax.annotate(r["name"].replace(" (synthetic)", ""), (r["complexity_jpeg_bytes_per_pixel"], r["tokens_kept"]),
                    xytext=(5, 4), textcoords="offset points", fontsize=8)
    tome = rows[0]["tome_tokens_kept"]
    ax.axhline(tome, color="tab:red", linestyle="--", label=f"fixed-r ToMe: {tome} tokens for every image")
    ax.axhline(res["num_tokens"], color="gray", linestyle=":", label=f"no merging: {res['num_tokens']} tokens")
    ax.set_xlabel(f"image complexity: JPEG bytes per pixel (quality {JPEG_QUALITY}, image as the model sees it)")
    ax.set_ylabel("tokens kept after the last block (DyMU)")
    ax.set_ylim(0, res["num_tokens"] * 1.08)
    ax.set_title(f"Tokens kept vs image complexity (Spearman ρ = {_fmt(photo_summary(rows)['spearman_all'])} "
                 f"over all {len(rows)} images)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.savefig(path)


def save_figures(res: Dict[str, object], rows: List[Dict[str, object]], out: str) -> List[str]:
    """Write both PNGs into ``out``; returns the file names written, or prints a
    note and returns [] when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("figures skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    save_groups_figure(res, rows, os.path.join(out, GROUPS_PNG))
    save_scatter_figure(res, rows, os.path.join(out, SCATTER_PNG))
    return [GROUPS_PNG, SCATTER_PNG]


# --------------------------------------------------------------------------- Table 1


@functools.lru_cache(maxsize=1)
def _table1_rows() -> Tuple[Dict[str, object], ...]:
    """:func:`dymu_kernels.flops.table1` (deterministic; counted once per process)."""
    from .flops import table1

    return tuple(table1())


def table1_section(out: str) -> Tuple[List[str], Optional[List[Dict[str, object]]]]:
    """``(lines to print, rows)`` for the paper's Table 1 and writes ``table1.md`` into ``out``;
    without fvcore the lines say how to install it and rows is None."""
    from .flops import table1_markdown

    try:
        rows = list(_table1_rows())
    except ImportError:
        return (["Table 1 (FLOPs of VTU attention) is counted with fvcore, which is not installed: "
                 "pip install fvcore (or pip install -e '.[flops]')"], None)
    by = {r["setting"]: r for r in rows}
    orig, low = by["original"], by["VTU low"]
    summary = (f"Counted as the paper counts (fvcore, one LLaVA-1.5-7B attention layer over {orig['n']} image "
               f"positions), VTU attention at the low setting ({low['n_un']} unique tokens) takes "
               f"{low['fvcore_mflops']:.1f} instead of {orig['fvcore_mflops']:.1f} MFLOPs "
               f"({low['ratio_to_original']:.2f}×), and "
               + " / ".join(f"{r['ratio_to_original']:.2f}×" for r in rows if r["setting"] in ("VTU mid", "VTU high"))
               + " at mid / high.")
    table = table1_markdown(rows)
    with open(os.path.join(out, TABLE1_MD), "w") as f:
        f.write("# DyMU paper, Table 1: attention FLOPs (dymu_kernels.flops.table1)\n\n")
        f.write(table + "\n\n" + summary + "\n")
    return ["Paper's Table 1 (dymu_kernels.flops.table1):", table, summary], rows


# --------------------------------------------------------------------------- report


def format_table(res: Dict[str, object], rows: List[Dict[str, object]], max_blocks: int = 12) -> str:
    """The per-image table, sorted by complexity (per-block counts when at most ``max_blocks`` blocks)."""
    depth = len(rows[0]["tokens_per_block"])
    blocks = depth <= max_blocks
    r_txt = f"r={res['tome_r'][0]}" if len(set(res["tome_r"])) == 1 else "fixed r"
    head = (f"{'image':<24}{'complexity':>11}{'DyMU kept':>11}{'ToMe kept':>11}"
            + ("   tokens after each block" if blocks else ""))
    sub = f"{'':<24}{'(JPEG B/px)':>11}{'(of ' + str(res['num_tokens']) + ')':>11}{'(' + r_txt + ')':>11}"
    lines = [head, sub, "-" * max(len(head), len(sub))]
    for r in sorted(rows, key=lambda r: r["complexity_jpeg_bytes_per_pixel"]):
        per = "   " + " ".join(f"{c:>4}" for c in r["tokens_per_block"]) if blocks else ""
        lines.append(f"{r['name']:<24}{r['complexity_jpeg_bytes_per_pixel']:>11.3f}{r['tokens_kept']:>11}"
                     f"{r['tome_tokens_kept']:>11}{per}")
    return "\n".join(lines)


def _fmt(rho: Optional[float]) -> str:
    """A correlation with 2 decimals, or "n/a" when undefined."""
    return "n/a" if rho is None else f"{rho:.2f}"


def summary_lines(res: Dict[str, object], s: Dict[str, object], tome: int) -> List[str]:
    """Average, range and trend over the photographs, each in one plain sentence."""
    n, total = sum(k == "photograph" for k in res["kinds"]), res["num_tokens"]
    return [
        f"Over the {n} photographs:",
        f"  average {s['mean']:.1f} of {total} tokens: a photograph like these costs the language model about "
        f"{s['mean']:.0f} image tokens ({100 * s['mean'] / total:.0f}% of the unmerged {total}), where fixed-r ToMe "
        f"gives every image {tome}.",
        f"  range {s['min']}–{s['max']} ({s['min_image']} … {s['max_image']}): the cost depends on the picture; here "
        f"one photograph needs {s['max'] / max(s['min'], 1):.1f}× the image tokens of another, so time and KV-cache "
        "memory per image vary as much, and a batch has to be sized for the top of the range.",
        f"  trend: Spearman rank correlation of complexity and tokens kept {_fmt(s['spearman_photographs'])} over the "
        f"photographs, {_fmt(s['spearman_all'])} with the synthetic images (1 = tokens rise with complexity).",
    ]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The demo's options."""
    p = argparse.ArgumentParser(prog="python3 -m dymu_kernels.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"folder for every output (default: {DEFAULT_OUT}/ in the current directory)")
    p.add_argument("--model", metavar="ID_OR_PATH",
                   help="a Hugging Face CLIP or LLaVA checkpoint (hub id or local path) instead of the random TinyViT")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--r", type=int, default=None,
                     help=f"calibrate thresholds on the photographs for R merges per block on average (default "
                          f"{DEFAULT_R}; a CLIP ViT-L/14-336 tower uses the published thresholds unless --r is given)")
    src.add_argument("--thresholds", metavar="FILE", help="threshold JSON to use instead of calibrating")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the tower runs (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0, help="the TinyViT's random initialisation")
    p.add_argument("--save-thresholds", metavar="PATH", help="also write the thresholds JSON to PATH")
    return p


def check_out_dir(parser: argparse.ArgumentParser, out: str) -> None:
    """Create ``out`` if needed and prove it is writable, or exit through ``parser.error``."""
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out!r} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        parser.error(f"--out {out!r} cannot be created or written: {e.strerror or e}")


# Checkpoints whose tower the demo runs (a CLIP tower, through calibrate.load_tower).
DEMO_MODEL_TYPES = ("clip", "clip_vision_model", "llava")


def check_model(parser: argparse.ArgumentParser, model: str) -> None:
    """``--model`` names a checkpoint the demo runs (its config is read: no
    weights), or exit through ``parser.error`` before any output is written."""
    import transformers

    try:
        model_type = transformers.AutoConfig.from_pretrained(model).model_type
    except (OSError, ValueError) as e:
        parser.error(f"--model {model!r} could not be loaded: {e}")
    if model_type not in DEMO_MODEL_TYPES:
        parser.error(f"--model {model!r} is a {model_type!r} checkpoint; the demo runs CLIP towers (a CLIP or "
                     f"LLaVA-1.5 checkpoint). For other models calibrate with python3 -m dymu_kernels.calibrate "
                     f"--model {model} --images DIR --r N --out t.json and patch with apply_dymu (README)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs no model, before anything runs (``parser.error``: exit code 2)."""
    if args.r is not None and args.r < 0:
        parser.error(f"--r must be >= 0 (merges per block), got {args.r}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device!r} is not a device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    if args.thresholds is not None:
        if not os.path.isfile(args.thresholds):
            parser.error(f"--thresholds {args.thresholds!r}: no such file")
        try:
            Thresholds.load(args.thresholds)
        except ValueError as e:
            parser.error(f"--thresholds: {e}")
    if args.save_thresholds is not None:
        parent = os.path.dirname(os.path.abspath(args.save_thresholds))
        if os.path.isdir(args.save_thresholds) or not os.path.isdir(parent):
            parser.error(f"--save-thresholds {args.save_thresholds!r}: not a file path in an existing directory")
    if args.model is not None:
        import importlib.util

        if importlib.util.find_spec("transformers") is None:
            parser.error("--model needs Hugging Face transformers: pip install 'transformers>=5.24,<6'")
        check_model(parser, args.model)
    check_out_dir(parser, args.out)


def environment(device: str) -> Dict[str, str]:
    """What produced a run: device, versions, and the package's git commit when
    it runs from a checkout ("+dirty" with local changes), so numbers quoted
    from ``results.json`` can be traced."""
    import platform
    import subprocess

    from . import __version__

    env = {"device": f"{device}: {platform.machine()} x{torch.get_num_threads()} threads" if device == "cpu"
           else f"{device}: {torch.cuda.get_device_name()}",
           "torch": torch.__version__, "dymu_kernels": __version__, "python": platform.python_version()}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True, timeout=10)  # noqa: E731
        commit = git("rev-parse", "--short", "HEAD").stdout.strip()
        if commit:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            env["commit"] = commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return env


def write_results(out: str, res: Dict[str, object], rows: List[Dict[str, object]], summary: Dict[str, object],
                  table1_rows: Optional[List[Dict[str, object]]], args: argparse.Namespace) -> None:
    """``results.json`` (settings, per-image rows, summary, Table 1) and ``thresholds.json`` in ``out``."""
    res["thresholds"].save(os.path.join(out, THRESHOLDS_JSON))
    data = {
        "model": args.model or "TinyViT (random init)",
        "description": res["description"],
        "device": args.device,
        "thresholds_file": THRESHOLDS_JSON,
        "thresholds_source": res["thresholds_source"],
        "tome_r_per_block": res["tome_r"],
        "num_tokens": res["num_tokens"],
        "complexity": COMPLEXITY_WHY,
        "images": rows,
        "photographs": summary,
        "table1": table1_rows,
        "environment": environment(args.device),
    }
    with open(os.path.join(out, RESULTS_JSON), "w") as f:
        json.dump(data, f, indent=1, allow_nan=False)
        f.write("\n")


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point: check the options, run, print the report, write every output into ``--out``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    out = args.out
    print(f"DyMU demo; every output goes to {os.path.abspath(out)}/")
    try:
        res = run_demo(args.device, args.r, args.seed, progress=sys.stderr.isatty(), model=args.model,
                       thresholds=args.thresholds)
    except ValueError as e:  # a threshold file that does not fit the tower, a checkpoint that is not CLIP/LLaVA
        if args.thresholds is None and args.model is None:
            raise
        parser.error(f"{'--thresholds' if args.thresholds else '--model'}: {e}")
    except OSError as e:
        if args.model is None:
            raise
        parser.error(f"--model {args.model!r} could not be loaded: {e}")
    rows = result_rows(res)
    summary = photo_summary(rows)
    tome = rows[0]["tome_tokens_kept"]
    thr = res["thresholds"]
    print(f"tower: {res['description']}, device {args.device}")
    print(f"thresholds: {res['thresholds_source']}:")
    print("  " + ", ".join(f"{t:.4f}" for t in thr.thresholds[: len(res['tome_r'])]))
    print(COMPLEXITY_WHY)
    print()
    print("Tokens kept after the last block, sorted by complexity "
          "(DyMU adapts to the image; ToMe keeps a fixed count):")
    print(format_table(res, rows))
    print()
    print("\n".join(summary_lines(res, summary, tome)))
    if args.model is None:
        print("  (The TinyViT has random weights, so its keys only roughly follow image detail; run --model with a "
              "trained CLIP or LLaVA checkpoint for the real relation.)")
    print()
    written = save_figures(res, rows, out)
    if written:
        print(f"figures: {GROUPS_PNG} (which patches became one token), {SCATTER_PNG} (complexity vs tokens kept)")
    print()
    lines, table1_rows = table1_section(out)
    print("\n".join(lines))
    write_results(out, res, rows, summary, table1_rows, args)
    if args.save_thresholds:
        thr.save(args.save_thresholds)
    files = [RESULTS_JSON, THRESHOLDS_JSON] + written + ([TABLE1_MD] if table1_rows else [])
    print()
    print(f"wrote to {os.path.abspath(out)}/: " + ", ".join(files)
          + (f"; thresholds also to {args.save_thresholds}" if args.save_thresholds else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
