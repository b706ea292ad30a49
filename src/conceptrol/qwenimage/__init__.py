"""Qwen-Image-Edit (QwenImageEditPlusPipeline, QwenImageEditPipeline): several references, each confined to its own
concept (ALGORITHM.md section 6)."""

from typing import Any

from .install import install, recognises
from .recording import QwenMapRecorder as map_recorder


def architecture_of(pipe: Any) -> str:
    """qwenimage: which preset concept block applies."""
    return "qwenimage"


__all__ = ["architecture_of", "install", "map_recorder", "recognises"]
