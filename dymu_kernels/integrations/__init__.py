"""Hugging Face transformers integrations (import transformers lazily).

- :class:`~.clip.DToMeCLIPVisionEncoder` — a CLIP vision tower that merges
  tokens in every block (DToMe) with proportional attention.
- :func:`~.llava.apply_dymu` / :func:`~.llava.remove_dymu` — patch a
  ``LlavaForConditionalGeneration`` or ``LlavaOnevisionForConditionalGeneration``
  instance with DToMe + VTU.
"""

from .clip import DToMeCLIPVisionEncoder, DToMeVisionOutput
from .llava import apply_dymu, dymu_stats, kv_cache_bytes, remove_dymu

__all__ = ["DToMeCLIPVisionEncoder", "DToMeVisionOutput", "apply_dymu", "dymu_stats", "kv_cache_bytes", "remove_dymu"]
