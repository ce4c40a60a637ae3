"""Shared benchmark plumbing: timing, environment record, result files, tables.

Each benchmark builds one callable per provider for each shape, times them with
``triton.testing.do_bench`` on CUDA and ``torch.utils.benchmark`` on the CPU,
prints a table and appends rows (op, provider, shape, dtype, device, versions,
git commit) to a JSON-lines file under ``benchmarks/results/``.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Optional

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
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = "absent"
    return {
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers_version,
        "python": platform.python_version(),
        "commit": commit or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(fn: Callable[[], object], device: str, min_run_time: float = 0.5) -> Dict[str, float]:
    """Median and 20/80% quantiles of one call, in milliseconds, over at least
    3 samples (for calls of milliseconds; see :func:`sample_times` for calls
    of seconds)."""
    if device == "cuda":
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80}
    from torch.utils.benchmark import Timer

    timer = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = list(timer.blocked_autorange(min_run_time=min_run_time).times)
    while len(times) < 3:  # a call longer than min_run_time gives one block: take at least 3 samples
        times += timer.timeit(1).times
    q = torch.tensor(times, dtype=torch.float64)
    return {"ms": float(q.median()) * 1e3, "ms_p20": float(q.quantile(0.2)) * 1e3, "ms_p80": float(q.quantile(0.8)) * 1e3,
            "n_samples": len(times)}


def sync_device(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def summarize(values: List[float]) -> Dict[str, object]:
    """Median, min/max and quartiles of a list of samples (kept in the row)."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "p25": q[0], "p75": q[2],
            "n_samples": len(v), "samples": list(values)}


def sample_times(fn: Callable[[], object], device: str, samples: int = 3, warmup: int = 1,
                 tick: Optional[Callable[[], None]] = None) -> Dict[str, object]:
    """Wall-clock seconds of ``samples`` calls after ``warmup`` untimed ones, for
    calls that take seconds (a whole model forward or ``generate``), where
    ``time_ms``'s auto-ranging would take too long. The device is synchronised
    around every call; ``tick()`` runs after each call (a progress bar).
    Returns :func:`summarize` of the samples (seconds)."""
    for _ in range(warmup):
        fn()
        sync_device(device)
        if tick:
            tick()
    times = []
    for _ in range(samples):
        sync_device(device)
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
        if tick:
            tick()
    return summarize(times)


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap pages back to the OS so RSS counts live memory only (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory used by a block of code above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated()`` (peak reset at entry) minus the
    allocated bytes at entry. CPU: torch's CPU allocations are invisible to
    ``tracemalloc``, so the process's resident set is used: Linux's peak RSS
    (``VmHWM``, reset at entry through ``/proc/self/clear_refs``) minus the RSS
    at entry, after freed heap pages are returned to the OS. Where the peak
    cannot be reset, ``ru_maxrss`` deltas are used, which only show a new
    process-wide peak. ``method`` says which one was used::

        with PeakMemory("cpu") as mem:
            model(**inputs)
        mem.peak_bytes, mem.method
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes: Optional[int] = None
        self.method = ""

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            self.method = "cuda: torch.cuda.max_memory_allocated() - allocated at start"
            return self
        _malloc_trim()
        self._base = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self._hwm = self._base is not None and _proc_status_kib("VmHWM") is not None
        except OSError:
            self._hwm = False
        if self._hwm:
            self.method = "cpu: peak RSS (VmHWM, reset at start) - RSS at start"
        else:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.method = "cpu: ru_maxrss delta (process high-water mark; 0 unless a new peak is set)"
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
        elif self._hwm:
            self.peak_bytes = max(0, (_proc_status_kib("VmHWM") - self._base) * 1024)
        else:
            self.peak_bytes = max(0, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._base) * 1024)


def write_rows(name: str, rows: List[Dict[str, object]], results_dir: Optional[str] = None) -> str:
    """Append rows (each merged with the environment) to <results_dir>/<name>.jsonl
    (default ``benchmarks/results``)."""
    results_dir = results_dir or RESULTS_DIR
    os.makedirs(results_dir, exist_ok=True)
    env = environment()
    path = os.path.join(results_dir, f"{name}.jsonl")
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


def add_run_args(parser, samples: int) -> None:
    """``--samples`` (timed runs, >= 3 so rows carry a median and a spread),
    ``--results-dir`` and ``--no-save``; check them with :func:`check_run_args`."""
    parser.add_argument("--samples", type=int, default=samples, help="timed runs per measurement (>= 3)")
    parser.add_argument("--results-dir", default=RESULTS_DIR)
    parser.add_argument("--no-save", action="store_true")


def check_run_args(parser, args) -> None:
    if args.samples < 3:
        parser.error(f"--samples must be >= 3 (median and spread), got {args.samples}")
