"""FLUX.1: OminiControl (its own forward, in ominicontrol/), and XLabs' IP-Adapter, Kontext and Redux on diffusers'
own forward (adapters.py with block_processor.py); ALGORITHM.md sections 2 and 4."""

from .install import install, recognises

__all__ = ["install", "recognises"]
