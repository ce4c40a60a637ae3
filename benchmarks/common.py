"""Shared benchmark plumbing: timing, environment record, result files, tables.

Each benchmark builds one callable per provider for each shape, times them with
``triton.testing.do_bench`` on CUDA and ``torch.utils.benchmark`` on the CPU,
prints a table and appends rows (op, provider, shape, dtype, device, versions,
git commit) to a JSON-lines file under ``benchmarks/results/``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from typing import Callable, Dict, List

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def environment() -> Dict[str, str]:
    """Device, versions and git commit recorded with every row."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except OSError:
        commit = "unknown"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(fn: Callable[[], object], device: str) -> Dict[str, float]:
    """Median and 20/80% quantiles of one call, in milliseconds."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    from torch.utils.benchmark import Timer

    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=0.5)
    q = torch.tensor(m.times, dtype=torch.float64)
    return {"ms": m.median * 1e3, "ms_p20": float(q.quantile(0.2)) * 1e3, "ms_p80": float(q.quantile(0.8)) * 1e3}


def write_rows(name: str, rows: List[Dict[str, object]]) -> str:
    """Append rows (each merged with the environment) to results/<name>.jsonl."""
    os.makedirs(RESULTS_DIR, exist_ok=True)
    env = environment()
    path = os.path.join(RESULTS_DIR, f"{name}.jsonl")
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, **env}) + "\n")
    return path


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    if not rows:
        print("(no rows)")
        return
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return "" if v is None else str(v)
