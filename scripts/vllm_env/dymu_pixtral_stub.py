"""Environment stub for vLLM's CPU wheel installed without torchvision.

vLLM's LLaVA module imports vLLM's Pixtral module, which imports one helper
from ``transformers.models.pixtral.image_processing_pixtral``; that module
imports torchvision at import time. The CPU wheel installed ``--no-deps``
beside a local torch has no torchvision (PyPI's does not load beside that
torch), so ``scripts/setup_vllm.sh`` puts this file and a ``.pth`` line in
the vLLM environment: when torchvision is absent, the Pixtral image-processing
module resolves to a stub whose helper raises. LLaVA-1.5 never calls it
(Pixtral checkpoints do); nothing changes where torchvision is installed.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys

_NAME = "transformers.models.pixtral.image_processing_pixtral"


def _num_image_tokens(*args, **kwargs):
    raise RuntimeError("Pixtral image processing needs torchvision, which this environment lacks")


class _Loader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module):
        module._num_image_tokens = _num_image_tokens


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _NAME:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader())


if importlib.util.find_spec("torchvision") is None:
    sys.meta_path.insert(0, _Finder())
