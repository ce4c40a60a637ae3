"""Small models built on the reference ops (no Hugging Face dependency)."""

from .tiny_vit import TinyViT, TinyViTOutput

__all__ = ["TinyViT", "TinyViTOutput"]
