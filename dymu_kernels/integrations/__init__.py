"""Hugging Face transformers integrations (import transformers lazily).

- :class:`~.clip.DToMeCLIPVisionEncoder` — a CLIP vision tower that merges
  tokens in every block (DToMe) with proportional attention.
"""

from .clip import DToMeCLIPVisionEncoder, DToMeVisionOutput

__all__ = ["DToMeCLIPVisionEncoder", "DToMeVisionOutput"]
