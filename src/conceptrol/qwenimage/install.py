"""Which pipelines the Qwen-Image family takes, and the handle that follows them."""

from __future__ import annotations

from typing import Any

from ..core.config import ConceptrolConfig
from ..core.reference_handle import install_reference_handle, transformer_is
from .handle import QwenEditHandle

PIPELINES = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")


def recognises(pipe: Any) -> bool:
    """A pipeline whose transformer is Qwen-Image's."""
    return transformer_is(pipe, "QwenImageTransformer2DModel")


def install(pipe: Any, config: ConceptrolConfig) -> QwenEditHandle:
    return install_reference_handle(pipe, config, QwenEditHandle, PIPELINES, "Qwen-Image-Edit", "qwenimage")
