"""Stable Diffusion 1.5 / SDXL with IP-Adapter (ALGORITHM.md section 1): processors wrapping diffusers' own."""

from typing import Any

from .handle import ConceptrolHandle, detect_architecture, install, recognises
from .recording import UNetMapRecorder as map_recorder


def architecture_of(pipe: Any) -> str:
    """sd15 or sdxl: which preset concept layer applies."""
    return detect_architecture(pipe.unet)


__all__ = ["ConceptrolHandle", "architecture_of", "detect_architecture", "install", "map_recorder", "recognises"]
