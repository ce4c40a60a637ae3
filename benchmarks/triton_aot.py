"""Compile every Triton kernel for a GPU architecture without a GPU.

Runs each op's real launch code (``dymu_kernels.ops.*_triton``) on CPU tensors
while Triton's active driver reports an NVIDIA target (sm_90 = H100/H200,
sm_80 = A100): every ``kernel[grid](...)`` is compiled exactly as it would be
on that GPU — same constexprs, specialisation, ``num_warps`` and
``num_stages`` — down to a cubin with the ``ptxas`` shipped in the Triton
wheel, and is not launched. Each cubin is then read back with ``cuobjdump``:

- registers per thread, stack and local-memory bytes (spills), shared memory;
- the math instructions in the SASS: ``HGMMA`` (Hopper warpgroup tensor-core
  MMA), ``HMMA`` (tensor-core MMA), ``FFMA`` (fp32 CUDA cores).

This catches what the CPU interpreter cannot: kernels that do not compile for
the chip, need more shared memory than it has, spill registers, or miss the
tensor cores. One row per distinct compiled kernel goes to
``benchmarks/results/triton_aot_sm<arch>.jsonl``; the exit status is 1 if a
kernel fails to compile or exceeds the chip's shared memory.

    python3 benchmarks/triton_aot.py                 # sm_90, all cases
    python3 benchmarks/triton_aot.py --arch 80 90 --quick --json -

It drives Triton's JIT through documented extension points (a custom
``DriverBase`` set with ``driver.set_active``) plus ``JITFunction.run``'s
``warmup`` flag, which Triton 3.6 uses for ahead-of-time warmup; it must run
in a process without ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterator, List, Tuple

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_aot.py compiles real kernels: run it without TRITON_INTERPRET=1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime import driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import print_table, write_rows  # noqa: E402
from dymu_kernels.ops import dtome_triton, vtu_triton  # noqa: E402
from dymu_kernels.reference.dtome import init_merge_state  # noqa: E402
from dymu_kernels.reference.vtu import rope_cos_sin  # noqa: E402

# Shared memory one block may use (opt-in maximum), bytes.
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
SASS_OPS = ("HGMMA", "HMMA", "FFMA", "LDL", "STL")


class CompileOnlyDriver(DriverBase):
    """A Triton driver that targets an NVIDIA architecture but owns no device."""

    def __init__(self, arch: int):
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)

    @classmethod
    def is_active(cls):
        return True

    def map_python_to_cpp_type(self, ty):  # only used when building launchers
        raise NotImplementedError

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("compile-only driver cannot time kernels")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


class CompileRecorder:
    """Within the context, kernel launches compile for ``arch`` and are recorded, not run."""

    def __init__(self, arch: int):
        self.arch = arch
        self.compiled: List[Tuple[str, object]] = []
        self.touched: List[JITFunction] = []

    def __enter__(self):
        recorder, original = self, JITFunction.run
        self._original = original

        def run(jit_fn, *args, grid, warmup, **kwargs):
            if jit_fn not in recorder.touched:
                # Binders and kernels are cached per device index, which does
                # not tell targets apart: start clean for this architecture.
                jit_fn.device_caches.clear()
                recorder.touched.append(jit_fn)
            kernel = original(jit_fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.compiled.append((jit_fn.fn.__name__, kernel))
            return kernel

        JITFunction.run = run
        # The default driver is created lazily and fails without a GPU: keep
        # whatever was active (possibly nothing) and put it back on exit.
        self._previous = getattr(driver, "_active", None)
        driver.set_active(CompileOnlyDriver(self.arch))
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._original
        driver._active = self._previous
        for jit_fn in self.touched:
            jit_fn.device_caches.clear()


def _nvidia_tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def cubin_report(cubin: bytes) -> Dict[str, int]:
    """Registers, stack/local bytes and SASS op counts of one cubin (cuobjdump)."""
    tool = _nvidia_tool("cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    report = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    counts = collections.Counter(re.findall(r"\b(" + "|".join(SASS_OPS) + r")\b", sass))
    report.update({op.lower(): counts.get(op, 0) for op in SASS_OPS})
    return report


def variant(kernel) -> str:
    """The kernel's own constexprs (UPPER_CASE parameters), e.g. ``CAUSAL=1 BLOCK_M=128``."""
    src = getattr(kernel, "src", None)
    if src is None or not hasattr(src, "constants"):
        return ""
    names = src.fn.arg_names
    parts = []
    for path, value in src.constants.items():
        name = names[path[0]] if isinstance(path, tuple) and len(path) == 1 else str(path)
        if name.isupper():
            parts.append(f"{name}={int(value) if isinstance(value, bool) else value}")
    return " ".join(parts)


# ----------------------------------------------------------------------------
# Cases: each launches one op's kernels at the shapes and dtypes users run.
# ----------------------------------------------------------------------------

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtome_cases(quick: bool) -> Iterator[Tuple[str, Callable[[], object]]]:
    """DToMe merge of one block: CLIP-L shape (C=1024, 16 heads of 64) plus a
    wide metric (one head of 1024) and a long sequence."""
    # Quick (CI): the larger BLOCK of the two LLaVA-class shapes (its limits bind first), and a
    # 16k-token image (Qwen-VL's largest: the plan runs in tiles) in fp32.
    shapes = [(1025, 768, 12), (16385, 64, 1)] if quick else [(577, 1024, 16), (1025, 768, 12), (50, 64, 1),
                                                              (4097, 1024, 1), (16385, 64, 1)]
    for n, c, heads in shapes:
        for name, dtype in DTYPES.items():
            if quick and (name == "fp16" or (n > 4097 and name != "fp32")):
                continue

            def case(n=n, c=c, heads=heads, dtype=dtype):
                x = torch.randn(2, n, c, dtype=dtype)
                keys = torch.randn(2, heads, n, c // heads, dtype=dtype)
                state = init_merge_state(x)
                for cls in (True, False):
                    dtome_triton.match(keys, state.lengths, 0.9, cls_token=cls)
                dtome_triton.match(keys, state.lengths, torch.tensor(0.9))
                # Kernels are compiled, not run: their outputs are garbage, so
                # the merge gets valid flags and targets of its own.
                n_a = (n + 1) // 2
                idx = torch.randint(0, n // 2, (2, n_a))
                scores = torch.rand(2, n_a)
                for cls in (True, False):  # unmerged A tokens by position / by score
                    dtome_triton.merge_tokens(state, idx, torch.rand(2, n_a) < 0.5, scores, cls_token=cls)

            yield f"dtome N={n} C={c} heads={heads} {name}", case


def vtu_cases(quick: bool, arch: int = 90) -> Iterator[Tuple[str, Callable[[], object]]]:
    """VTU prefill (atomic and deterministic re-merge, causal and not) and
    decode, for every supported head dim and dtype."""
    head_dims = (64, 128) if quick else (64, 80, 96, 128)
    for d in head_dims:
        for name, dtype in DTYPES.items():
            # Quick (CI): bf16 at both head dims (tensor cores), fp32 at the largest (register pressure) on
            # Hopper; Ampere's tile configs at bf16 (its fp32 kernels, like every case, in the full run).
            if quick and (name == "fp16" or (name == "fp32" and (d != max(head_dims) or arch < 90))):
                continue

            # Quick: every variant (causal or not, deterministic re-merge, half tables, decode) at bf16 D=128
            # on Hopper, the tensor-core tile users run most; the other cases the causal prefill (their tile
            # configs' tensor cores and registers) and decode, plus the deterministic epilogue in fp32 (the
            # most registers). A ptxas run of a D=128 variant takes seconds: CI's quick set is the guard, the
            # full run (committed reports) covers every variant on both architectures.
            every = not quick or (name == "bf16" and d == max(head_dims) and arch >= 90)
            # The deterministic epilogue (with the segment-mean kernel): in fp32 (the most registers), and on
            # Ampere's quick set at bf16 D=128 (its one case of that kernel there).
            det = name == "fp32" or (quick and arch < 90 and d == max(head_dims))
            variants = ((True, False), (True, True), (False, False)) if every else \
                ((True, False),) + (((True, True),) if det else ())

            def case(d=d, dtype=dtype, variants=variants, every=every):
                B, H, H_kv, N, n_un = 2, 4, 2, 300, 120
                q = torch.randn(B, H, n_un, d, dtype=dtype)
                k = torch.randn(B, H_kv, n_un, d, dtype=dtype)
                v = torch.randn(B, H_kv, n_un, d, dtype=dtype)
                merge_map = torch.randint(0, n_un, (B, N), dtype=torch.int64)
                pos = torch.arange(N)[None].expand(B, N)
                cos, sin = rope_cos_sin(pos, d, dtype=dtype)
                for causal, det in variants:
                    vtu_triton.vtu_attention_fwd(q, k, v, merge_map, cos, sin, d**-0.5, causal, det)
                if every:
                    half = d // 2  # half tables: one cos/sin entry per frequency
                    vtu_triton.vtu_attention_fwd(q, k, v, merge_map, cos[..., :half], sin[..., :half], d**-0.5, True,
                                                 False)
                vtu_triton.vtu_decode_fwd(q[:, :, :1], k, v, merge_map, cos, sin, d**-0.5)

            yield f"vtu D={d} {name}", case


def compile_all(arch: int, quick: bool) -> Tuple[List[Dict[str, object]], List[str]]:
    rows: List[Dict[str, object]] = []
    failures: List[str] = []
    seen = set()
    for label, case in [*dtome_cases(quick), *vtu_cases(quick, arch)]:
        t0 = time.perf_counter()
        with CompileRecorder(arch) as rec:
            try:
                case()
            except Exception as e:  # report every failing case, not only the first
                failures.append(f"sm_{arch} {label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
        seconds = time.perf_counter() - t0
        for kernel_name, kernel in rec.compiled:
            if kernel.hash in seen:
                continue
            seen.add(kernel.hash)
            md = kernel.metadata
            row: Dict[str, object] = {
                "op": "triton_aot",
                "arch": f"sm_{arch}",
                "case": label,
                "kernel": kernel_name,
                "num_warps": md.num_warps,
                "num_stages": md.num_stages,
                "shared": md.shared,
                "compile_s": round(seconds, 2),
                "variant": variant(kernel),
                **cubin_report(kernel.asm["cubin"]),
            }
            if md.shared > SHARED_LIMIT.get(arch, 48 * 1024):
                failures.append(f"sm_{arch} {label}: {kernel_name} needs {md.shared} B of shared memory")
            rows.append(row)
    return rows, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and dtypes (CI)")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list ('-' for stdout)")
    ap.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    args = ap.parse_args(argv)

    all_rows, all_failures = [], []
    for arch in args.arch:
        rows, failures = compile_all(arch, args.quick)
        all_rows += rows
        all_failures += failures
        if not args.no_save and rows:
            path = write_rows(f"triton_aot_sm{arch}", rows)
            print(f"wrote {len(rows)} rows to {path}", file=sys.stderr)
    table_out = sys.stderr if args.json == "-" else sys.stdout
    stdout, sys.stdout = sys.stdout, table_out
    try:
        print_table(all_rows, ["arch", "case", "kernel", "variant", "num_warps", "num_stages", "shared", "reg", "stack",
                               "hgmma", "hmma", "ffma", "ldl", "stl"])
    finally:
        sys.stdout = stdout
    if args.json:
        text = json.dumps({"rows": all_rows, "failures": all_failures})
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    for line in all_failures:
        print("FAILED", line, file=sys.stderr)
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
