"""Build dymu_kernels, compiling csrc/ into dymu_kernels._C when torch is present.

torch is deliberately *not* a build requirement: pip would otherwise fetch a
fresh (multi-GB) torch into an isolated build environment, and the extension
must be compiled against the torch the user already has. Install with
``pip install --no-build-isolation .`` to build the extension; without torch in
the build environment the package installs as pure Python and the C++ backend
reports itself missing at use time.

CUDA sources (csrc/cuda/*.cu) are compiled only when the installed torch is a
CUDA build and CUDA_HOME points at a toolkit; set DYMU_NO_EXT=1 to skip the
extension entirely.
"""

import glob
import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pure-Python install; see the module docstring
    torch = None

if torch is not None and os.environ.get("DYMU_NO_EXT", "0") != "1":
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "*.cpp")))
    cuda_sources = sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
    cxx = ["-O3", "-std=c++17"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined into our code; OpenMP makes it parallel.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "dymu_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("DYMU_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension(
            "dymu_kernels._C",
            sources,
            include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    ext_modules = [ext]
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
