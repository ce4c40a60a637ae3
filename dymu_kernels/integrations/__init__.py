"""The package's earlier public path, kept so user code keeps importing:
:mod:`dymu_kernels.hf` (patching transformers models) and
:mod:`dymu_kernels.core.encoder` (the DToMe vision encoder) are where these
live now."""

from ..core.encoder import DToMeVisionEncoder, DToMeVisionOutput
from ..hf import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu

__all__ = ["DToMeVisionEncoder", "DToMeVisionOutput", "apply_dymu", "dymu_stats", "kv_cache_bytes", "remove_dymu"]
