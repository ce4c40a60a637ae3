"""Lets PyPI's torchvision 0.28 import beside the CPU-only torch 2.13 of vLLM's CPU build.

scripts/setup_vllm.sh copies this file into the vLLM environment (as
``_dymu_torchvision_cpu_ops.py``, with a ``.pth`` line importing it) only when
``import torchvision`` fails there. Why it can fail: on x86_64 PyPI's
torchvision wheel is built against the CUDA torch, so its C++ ops library
(``torchvision/_C.so``, linked to ``libtorch_cuda.so``) does not load beside
``torch 2.13.0+cpu``; torchvision then runs without its C++ ops (its detection
ops raise "Couldn't load custom C++ ops" when called), except that its
``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms`` unconditionally, and that registration raises
"operator torchvision::nms does not exist" at import.

This module defines those two schemas (as torchvision's C++ library does)
just before torchvision is first imported, so that registration succeeds and
the import completes. Nothing gets an implementation: ``torchvision.ops.nms``
still raises torchvision's own "C++ ops not loaded" error. What vLLM's and
transformers' image and video processors use (``torchvision.transforms.v2``,
functional resizing on tensors) needs no C++ op.

It imports nothing at interpreter start but ``importlib``: torch is imported
only when torchvision is.
"""

import importlib.abc
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES = []  # a torch.library.Library unregisters its definitions when collected


class _DefineBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Finds nothing; on the first lookup of ``torchvision`` defines the schemas, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _SCHEMAS:
            lib.define(schema)
        _LIBRARIES.append(lib)
        return None  # the regular finders import torchvision


sys.meta_path.insert(0, _DefineBeforeTorchvision())
