"""Is a DyMU decode step as cheap as the unpatched model's? Interleaved A/B.

A decode step costs ~1% attention and ~99% weight reads on these shapes, so a
difference of a few percent drowns in the drift of a shared machine between
the configurations of ``bench_e2e.py``. Here the same model alternates
between unpatched and patched (``apply_dymu(r=R)``) for ``--rounds`` rounds;
each round prefills the same prompt and times ``--steps`` greedy decode
steps (``model(input_ids=next token, cache=...)``) of each, back to back. The
per-round ratio patched / unpatched (median step time) cancels the drift;
the median ratio over the rounds and its range are reported.

Model and prompt as ``bench_e2e.py --size small`` (the vision tower only
prefills, so it does not matter here). Rows go to
``benchmarks/results/decode_ab_<cpu|cuda>.jsonl``.

Run: ``python3 benchmarks/bench_decode_ab.py`` (CPU, about 3 minutes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import build_model, llava_config, make_inputs  # noqa: E402
from common import environment, summarize, sync_device, write_rows  # noqa: E402


def decode_step_ms(model, inputs, steps: int, device: str) -> float:
    """Median time of ``steps`` greedy decode steps after one prefill."""
    with torch.inference_mode():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, mask = out.past_key_values, inputs["attention_mask"]
        token = out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            mask = torch.cat([mask, mask[:, :1]], 1)
            sync_device(device)
            t0 = time.perf_counter()
            out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True,
                        cache_position=torch.tensor([mask.shape[1] - 1], device=device))
            sync_device(device)
            times.append(time.perf_counter() - t0)
            token = out.logits[:, -1:].argmax(-1)
    return statistics.median(times) * 1e3


def main(argv=None) -> int:
    from dymu_kernels.hf import apply_dymu, remove_dymu

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--lm-layers", type=int, default=8)
    p.add_argument("--r", type=int, default=21, help="merges per vision block of the patched model")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.rounds < 3 or args.steps < 3:
        p.error("--rounds and --steps must be >= 3 (a median and a spread need 3 samples)")
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build_model(llava_config("small", args.lm_layers), args.device, dtype, seed=0)
    inputs = make_inputs(model, 1, args.device, dtype, seed=0)
    ratios, stock_ms, dymu_ms = [], [], []
    for i in range(args.rounds):
        s = decode_step_ms(model, inputs, args.steps, args.device)
        apply_dymu(model, r=args.r)
        d = decode_step_ms(model, inputs, args.steps, args.device)
        remove_dymu(model)
        stock_ms.append(s)
        dymu_ms.append(d)
        ratios.append(d / s)
        print(f"round {i}: unpatched {s:.2f} ms/step, DyMU r={args.r} {d:.2f} ms/step, ratio {d / s:.3f}", flush=True)
    common = {"op": "decode_step_ab", "lm_layers": args.lm_layers, "r": args.r, "steps": args.steps,
              "dtype": str(dtype).replace("torch.", ""), **environment()}
    rows = [{**common, "metric": "unpatched_ms", **summarize(stock_ms)},
            {**common, "metric": "dymu_ms", **summarize(dymu_ms)},
            {**common, "metric": "ratio_dymu_over_unpatched", **summarize(ratios)}]
    r = rows[-1]
    print(f"DyMU decode step / unpatched: median {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f}) "
          f"over {args.rounds} interleaved rounds")
    print("rows appended to", write_rows(f"decode_ab_{args.device}", rows, args.results_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
