"""Stable Diffusion 1.5 / SDXL with IP-Adapter (ALGORITHM.md section 1): processors wrapping diffusers' own."""

from .handle import ConceptrolHandle, detect_architecture, install, recognises

__all__ = ["ConceptrolHandle", "detect_architecture", "install", "recognises"]
