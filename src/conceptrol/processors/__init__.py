"""Attention processors, one per attention family."""

from .unet import ConceptrolIPAdapterProcessor

__all__ = ["ConceptrolIPAdapterProcessor"]
