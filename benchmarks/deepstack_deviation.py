"""What merging costs Qwen3-VL's deepstack, measured: DyMU's group-mean taps
against per-unit taps and against dropping the taps.

    python3 benchmarks/deepstack_deviation.py            # tiny random Qwen3-VL, r = 1 / 2 / 4 / 6
    python3 benchmarks/deepstack_deviation.py --no-save

A tiny random ``Qwen3VLForConditionalGeneration`` (the tests' config: 4 tower
blocks with taps after blocks 0 and 2, a 2-layer text model) and one prompt
with a 12 × 16-patch image (48 units). For each ``r`` (units merged per tower
block) the relative L2 error of the text model's last hidden state at the
real positions, against the unpatched model, of

- **DyMU**: merging in the tower, VTU in the text model, each tap one row per
  final group (the mean over its units) — what ``apply_dymu`` runs;
- **per-unit taps**: the same merged tower, but the text model run unpatched
  at full length on the virtually unmerged features with every unit's own tap
  row (its unique unit's at the tap block) — the finest taps merging allows;
- **taps dropped**: DyMU with the text model's deepstack addition off.

Rows: ``benchmarks/results/deepstack_deviation.jsonl`` (device, versions,
commit).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import print_table, write_rows  # noqa: E402


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def per_unit_taps_run(model, kwargs, r: int) -> torch.Tensor:
    """The unpatched text model on the merged tower's virtually unmerged
    features, with every unit's own tap row (see module doc)."""
    from dymu_kernels.families.qwen_vit import QwenUnitDToMe

    inner = model.model
    stage = QwenUnitDToMe(inner.visual, r=r, backend="torch", trim=False)
    out = stage(kwargs["pixel_values"], kwargs["image_grid_thw"])
    index = out.state.pos_map[0].long().clamp_min(0)[:, None].expand(-1, out.state.x.shape[-1])
    features = out.state.x[0].gather(0, index)
    taps = [t[0] for t in out.taps]
    ids = kwargs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    mask = ids == model.config.image_token_id
    embeds = embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))
    positions = inner.compute_3d_position_ids(input_ids=ids, inputs_embeds=embeds,
                                              image_grid_thw=kwargs["image_grid_thw"],
                                              mm_token_type_ids=kwargs["mm_token_type_ids"])
    return inner.language_model(inputs_embeds=embeds, position_ids=positions, visual_pos_masks=mask,
                                deepstack_visual_embeds=taps).last_hidden_state


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--r", type=int, nargs="+", default=[1, 2, 4, 6])
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    from test_qwen3_vl import sample, tiny_qwen3
    from test_qwen_vl import batch

    from dymu_kernels.hf import apply_dymu, remove_dymu

    model = tiny_qwen3()
    kwargs = batch([sample(torch.Generator().manual_seed(0), [("image", (1, 12, 16))])])
    lm = model.model.language_model
    rows = []
    with torch.no_grad():
        stock = model.model(**kwargs).last_hidden_state
        for r in args.r:
            apply_dymu(model, r=r, backend="torch", trim=False)
            dymu = model.model(**kwargs).last_hidden_state
            kept = model._dymu.counts["image"].kept.tolist()[0]
            original = lm._deepstack_process
            lm._deepstack_process = lambda hidden, *a: hidden
            try:
                dropped = model.model(**kwargs).last_hidden_state
            finally:
                lm._deepstack_process = original
            remove_dymu(model)
            per_unit = per_unit_taps_run(model, kwargs, r)
            rows.append({"op": "deepstack_deviation", "model": "tiny random Qwen3-VL (tests)", "r": r,
                         "units": 48, "units_kept": kept,
                         "rel_err_dymu_group_mean_taps": relative_error(dymu, stock),
                         "rel_err_per_unit_taps": relative_error(per_unit, stock),
                         "rel_err_taps_dropped": relative_error(dropped, stock)})
    print_table(rows, ["r", "units_kept", "rel_err_dymu_group_mean_taps", "rel_err_per_unit_taps",
                       "rel_err_taps_dropped"])
    if not args.no_save:
        print("rows appended to", write_rows("deepstack_deviation", rows, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
