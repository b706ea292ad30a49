"""FLUX.2 (Flux2Pipeline, Flux2KleinPipeline, Flux2KleinKVPipeline): several references, each confined to its own
concept (ALGORITHM.md section 6)."""

from typing import Any

from .install import install, recognises
from .recording import Flux2MapRecorder as map_recorder


def architecture_of(pipe: Any) -> str:
    """flux2: which preset concept block applies."""
    return "flux2"


__all__ = ["architecture_of", "install", "map_recorder", "recognises"]
