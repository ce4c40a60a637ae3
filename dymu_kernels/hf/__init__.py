"""DyMU in Hugging Face transformers (imports transformers lazily).

- :func:`apply_dymu` / :func:`remove_dymu` — patch a supported model instance
  (the families in :mod:`dymu_kernels.families`) with DToMe + VTU.
- :func:`dymu_stats`, :func:`kv_cache_bytes` — what merging kept and saved.
"""

from .patch import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu

__all__ = ["apply_dymu", "dymu_stats", "kv_cache_bytes", "remove_dymu"]
