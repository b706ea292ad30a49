"""FLUX.1: OminiControl (its own forward, in ominicontrol/), and XLabs' IP-Adapter, Kontext and Redux on diffusers'
own forward (adapters.py with block_processor.py); ALGORITHM.md sections 2 and 4."""

from typing import Any

from .install import install, recognises
from .recording import FluxMapRecorder as map_recorder


def architecture_of(pipe: Any) -> str:
    """flux: which preset concept block applies."""
    return "flux"


__all__ = ["architecture_of", "install", "map_recorder", "recognises"]
