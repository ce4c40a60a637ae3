"""Segment mean / unmerge references, and the C++ segment mean against them."""

import os
import shutil
import subprocess
import sys
import importlib.util

import pytest
import torch

from conftest import randn

import dymu_kernels
from dymu_kernels import _ext
from dymu_kernels.reference import segment_mean as ref_segment_mean, unmerge


def loop_segment_mean(src, index, S):
    B, G, N, F = src.shape
    out = torch.zeros(B, G, S, F, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            rows = [p for p in range(N) if int(index[b, p]) == s]
            if rows:
                out[b, :, s] = src[b, :, rows].double().mean(1)
    return out


def random_index(gen, B, N, S, pad=True):
    idx = torch.randint(-1 if pad else 0, S, (B, N), generator=gen)
    return idx


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 17, 5), (3, 1, 63, 80), (2, 4, 577, 16)])
@pytest.mark.parametrize("S", [1, 7, 40])
def test_reference_matches_loop(gen, shape, S):
    src = randn(*shape, gen=gen, dtype=torch.float64)
    index = random_index(gen, shape[0], shape[2], S)
    torch.testing.assert_close(ref_segment_mean(src, index, S), loop_segment_mean(src, index, S))


def test_unmerge_then_mean_is_identity(gen):
    x = randn(2, 3, 9, 4, gen=gen)
    m = torch.randint(0, 9, (2, 30), generator=gen)
    m[:, :9] = torch.arange(9)
    m[1, 25:] = -1
    full = unmerge(x, m)
    assert (full[1, :, 25:] == 0).all()
    torch.testing.assert_close(full[0, :, 12], x[0, :, m[0, 12]])
    torch.testing.assert_close(ref_segment_mean(full, m, 9), x)


needs_ext = pytest.mark.skipif(_ext.extension() is None, reason="C++ extension not built")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 17, 5), (3, 63, 80), (2, 577, 128)])
def test_cpp_matches_reference(gen, dtype, index_dtype, shape):
    B, N, F = shape
    S = max(1, N // 3)
    src = randn(B, 4, N, F, gen=gen, dtype=dtype)  # [B, H, N, F]
    index = random_index(gen, B, N, S).to(index_dtype)
    index[0, : min(N, 3)] = -1  # padding rows
    out = dymu_kernels.segment_mean(src, index, S, backend="cpp")
    expected = ref_segment_mean(src, index, S)
    assert out.dtype == dtype and out.shape == expected.shape
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    # Deterministic: the same bits on every run.
    assert torch.equal(out, dymu_kernels.segment_mean(src, index, S, backend="cpp"))


@needs_ext
def test_cpp_non_contiguous_and_auto_dispatch(gen):
    src = randn(2, 40, 3, 8, gen=gen).permute(0, 2, 1, 3)  # [B, G, N, F] view
    index = random_index(gen, 2, 40, 11)
    assert not src.is_contiguous()
    expected = ref_segment_mean(src, index, 11)
    torch.testing.assert_close(dymu_kernels.segment_mean(src, index, 11), expected)
    torch.testing.assert_close(dymu_kernels.segment_mean(src[:, 0], index, 11, backend="cpp"), expected[:, 0])


@needs_ext
def test_cpp_op_and_fake_under_torch_compile(gen):
    """The C++ path is a torch.library op whose fake matches the real output
    (opcheck), so torch.compile traces segment_mean in one graph."""
    from dymu_kernels.ops.segment import _segment_mean_cpp

    src = randn(2, 3, 17, 8, gen=gen)
    index = random_index(gen, 2, 17, 6)
    torch.library.opcheck(_segment_mean_cpp, (src, index, 6))
    compiled = torch.compile(lambda s, i: dymu_kernels.segment_mean(s, i, 6, backend="cpp"), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(src, index), ref_segment_mean(src, index, 6))


@needs_ext
def test_cpp_checks_its_own_inputs():
    C = _ext.extension()
    with pytest.raises(RuntimeError, match="index values must lie in"):
        C.segment_mean(torch.zeros(1, 1, 3, 2), torch.tensor([[0, 5, 1]]), 2)
    with pytest.raises(RuntimeError, match="index must be int32 or int64"):
        C.segment_mean(torch.zeros(1, 1, 3, 2), torch.zeros(1, 3), 2)


def test_package_works_without_extension(monkeypatch, gen):
    monkeypatch.setattr(_ext, "_load", lambda: (None, "the C++ extension dymu_kernels._C is not built (test)"))
    src = randn(2, 3, 10, 4, gen=gen)
    index = random_index(gen, 2, 10, 4)
    torch.testing.assert_close(dymu_kernels.segment_mean(src, index, 4), ref_segment_mean(src, index, 4))
    with pytest.raises(ValueError, match="cpp: the C\\+\\+ extension dymu_kernels._C is not built"):
        dymu_kernels.segment_mean(src, index, 4, backend="cpp")


def test_backend_errors(gen):
    src = randn(1, 1, 4, 2, gen=gen)
    index = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="backend must be one of"):
        dymu_kernels.segment_mean(src, index, 1, backend="cuda")
    with pytest.raises(ValueError, match="segment_mean has no 'triton' backend"):
        dymu_kernels.segment_mean(src, index, 1, backend="triton")
    meta = torch.empty(1, 1, 4, 2, device="meta")
    with pytest.raises(ValueError, match="cpp: inputs are on meta but it runs on cpu"):
        dymu_kernels.segment_mean(meta, index.to("meta"), 1, backend="cpp")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_standalone_build(tmp_path, gen):
    """CMakeLists.txt builds the same extension; the module it builds matches
    the reference. As one translation unit (CMake's unity build, as setup.py
    builds it): torch's headers parsed once, half the compile time in CI; and
    unoptimised (what is tested is the CMake project: its sources, include
    paths, definitions and libraries, not the compiler's optimiser, which
    setup.py's build runs): -O0 compiles in about half the time of -O3."""
    pybind11 = pytest.importorskip("pybind11")

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prefix = f"{torch.utils.cmake_prefix_path};{pybind11.get_cmake_dir()}"
    gen_args = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run(
        ["cmake", "-S", root, "-B", str(tmp_path), *gen_args, f"-DCMAKE_PREFIX_PATH={prefix}",
         f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_UNITY_BUILD=ON", "-DCMAKE_BUILD_TYPE=Debug",
         "-DCMAKE_CXX_FLAGS_DEBUG=-O0"],
        capture_output=True, text=True,
    )
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path), "-j", "2"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    [so] = [p for p in os.listdir(tmp_path) if p.startswith("_C") and p.endswith(".so")]
    spec = importlib.util.spec_from_file_location("_C", os.path.join(tmp_path, so))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = randn(2, 3, 50, 8, gen=gen)
    index = random_index(gen, 2, 50, 9)
    torch.testing.assert_close(mod.segment_mean(src, index, 9), ref_segment_mean(src, index, 9))


@needs_ext
@pytest.mark.parametrize("shape", [(2, 17, 5), (3, 2, 63, 8)])
def test_cpp_backward_equals_reference(gen, shape):
    """Training differentiates the C++ op (the Qwen tower's per-unit means):
    its gradient is the reference's, padding rows get zero, and gradcheck
    passes on fp64."""
    from dymu_kernels.ops import segment_mean

    S = 7
    index = random_index(gen, shape[0], shape[-2], S)
    src = randn(*shape, gen=gen, dtype=torch.float64).requires_grad_()
    upstream = randn(*shape[:-2], S, shape[-1], gen=gen, dtype=torch.float64)
    (got,) = torch.autograd.grad((segment_mean(src, index, S, backend="cpp") * upstream).sum(), src)
    (want,) = torch.autograd.grad((ref_segment_mean(src, index, S) * upstream).sum(), src)
    torch.testing.assert_close(got, want)
    assert (got.movedim(-2, 1)[index < 0] == 0).all()
    assert torch.autograd.gradcheck(lambda x: segment_mean(x, index, S, backend="cpp"), (src,))
