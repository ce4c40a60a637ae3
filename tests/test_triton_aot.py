"""Every Triton kernel compiles for real NVIDIA targets, without a GPU.

The CPU interpreter runs kernels as NumPy: it accepts kernels that the GPU
compiler rejects (a layout bug in one of ours was caught this way), that
need more shared memory than the chip has, or that spill registers.
``benchmarks/triton_aot.py`` compiles each op's real launches for sm_80 and
sm_90 with the ``ptxas`` inside the Triton wheel and reads the cubins back;
this test asserts on what it finds.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ALL_KERNELS = {
    "_metric_kernel", "_match_kernel", "_plan_count_kernel", "_plan_kernel", "_merge_kernel",
    "_vtu_fwd_kernel", "_segment_mean_kernel", "_decode_combine_kernel",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    for tool in ("ptxas", "cuobjdump"):
        if not os.path.exists(os.path.join(NVIDIA_BIN, tool)):
            pytest.skip(f"this triton wheel ships no {tool} (needed to compile for NVIDIA targets)")
    tmp = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "cache")  # compile for real, not from an old cache
    path = tmp / "report.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/triton_aot.py", "--arch", "80", "90", "--quick", "--no-save", "--json", str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )
    if not path.exists():
        raise AssertionError(f"triton_aot.py wrote no report (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    data = json.loads(path.read_text())
    data["returncode"], data["stderr"] = proc.returncode, proc.stderr
    return data


def test_every_kernel_compiles_for_sm80_and_sm90(report):
    assert report["failures"] == [], "\n".join(report["failures"])
    assert report["returncode"] == 0, report["stderr"][-4000:]
    for arch in ("sm_80", "sm_90"):
        compiled = {r["kernel"] for r in report["rows"] if r["arch"] == arch}
        assert compiled == ALL_KERNELS, f"{arch}: missing {ALL_KERNELS - compiled}"


def test_kernels_fit_shared_memory_and_registers(report):
    limits = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    for r in report["rows"]:
        where = f"{r['arch']} {r['case']} {r['kernel']} {r['variant']}"
        assert r["shared"] <= limits[r["arch"]], f"{where}: {r['shared']} B of shared memory"
        # A few words of stack in an epilogue are tolerable; a spilling main
        # loop (hundreds of bytes, LDL/STL everywhere) is a performance bug.
        assert r["stack"] <= 16 and r["ldl"] + r["stl"] <= 8, f"{where}: spills ({r['stack']} B stack)"
        assert r["reg"] <= 255


def test_attention_uses_the_tensor_cores(report):
    fwd = [r for r in report["rows"] if r["kernel"] == "_vtu_fwd_kernel" and "IEEE=0" in r["variant"]]
    assert fwd, "no fp16/bf16 VTU kernels compiled"
    for r in fwd:
        where = f"{r['arch']} {r['case']} {r['variant']}"
        if r["arch"] == "sm_90" and "DECODE=0" in r["variant"]:
            assert r["hgmma"] > 0, f"{where}: no warpgroup MMA (HGMMA) on Hopper"
        else:  # Ampere, and the 16-row decode tile on Hopper (wgmma needs 64 rows)
            assert r["hmma"] > 0, f"{where}: no tensor-core MMA (HMMA)"
