"""The DyMU tower's linear layers on vLLM's CPU GEMM.

vLLM runs its own linear layers on the CPU through
``dispatch_cpu_unquantized_gemm`` (oneDNN on prepacked weights where the CPU
has it; measured on a 2-core AVX-512 AMD EPYC: a 1024 × 1280 × 3420 fp32 GEMM
in 22 ms, against 47 ms for ``torch.nn.functional.linear``, whose MKL takes
the AVX2 path there). The DyMU tower is transformers' tower module, whose
``nn.Linear`` layers would otherwise run ``F.linear``: so stock vLLM's tower
would compute its GEMMs up to twice as fast as DyMU's. After the checkpoint's
weights are loaded, :func:`use_vllm_cpu_gemm` hands every ``nn.Linear`` of
the tower to vLLM's own dispatch — the same call vLLM's layers make — and
its forward to the function that dispatch chose.
"""

from __future__ import annotations

import torch


def _packed_forward(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return layer.cpu_linear(x, layer.weight, layer.bias)


def use_vllm_cpu_gemm(module: torch.nn.Module) -> int:
    """On vLLM's CPU platform, run every ``nn.Linear`` under ``module`` through
    vLLM's CPU GEMM dispatch (its weight is then held packed, as vLLM's own
    layers hold theirs); elsewhere nothing changes. Returns how many layers
    were handed over."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return 0
    count = 0
    for layer in module.modules():
        if type(layer) is torch.nn.Linear and not hasattr(layer, "cpu_linear"):
            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
            layer.forward = _packed_forward.__get__(layer)
            count += 1
    return count
