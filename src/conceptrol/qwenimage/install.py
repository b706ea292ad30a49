"""Which pipelines the Qwen-Image family takes, and the handle that follows them."""

from __future__ import annotations

from typing import Any

from ..core.blocks import check_block, dual_stream_block_names
from ..core.config import ConceptrolConfig
from ..core.errors import ConceptrolError
from .handle import QwenEditHandle

PIPELINES = ("QwenImageEditPlusPipeline", "QwenImageEditPipeline")


def recognises(pipe: Any) -> bool:
    """A pipeline whose transformer is Qwen-Image's."""
    transformer = getattr(pipe, "transformer", None)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile's wrapper
    return type(transformer).__name__ == "QwenImageTransformer2DModel"


def install(pipe: Any, config: ConceptrolConfig) -> QwenEditHandle:
    if type(pipe).__name__ not in PIPELINES:
        raise ConceptrolError(f"{type(pipe).__name__} is not supported; Conceptrol follows Qwen-Image's reference "
                              f"images in {' and '.join(PIPELINES)}")
    if config.masking == "local":
        raise ConceptrolError("Qwen-Image-Edit has no local masking; use masking='global' (Conceptrol) or 'none'")
    config = config.with_architecture("qwenimage")
    check_block(config.concept_layer, dual_stream_block_names(pipe.transformer))
    return QwenEditHandle(pipe, config)
