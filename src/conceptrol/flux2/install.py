"""Which pipelines the FLUX.2 family takes, and the handle that follows them."""

from __future__ import annotations

from typing import Any

from ..core.blocks import check_block, dual_stream_block_names
from ..core.config import ConceptrolConfig
from ..core.errors import ConceptrolError
from .handle import Flux2Handle

PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")


def recognises(pipe: Any) -> bool:
    """A pipeline whose transformer is FLUX.2's."""
    transformer = getattr(pipe, "transformer", None)
    transformer = getattr(transformer, "_orig_mod", transformer)  # torch.compile's wrapper
    return type(transformer).__name__ == "Flux2Transformer2DModel"


def install(pipe: Any, config: ConceptrolConfig) -> Flux2Handle:
    if type(pipe).__name__ not in PIPELINES:
        raise ConceptrolError(f"{type(pipe).__name__} is not supported; Conceptrol follows FLUX.2's reference images in "
                              f"{', '.join(PIPELINES)}")
    if config.masking == "local":
        raise ConceptrolError("FLUX.2 has no local masking; use masking='global' (Conceptrol) or 'none'")
    config = config.with_architecture("flux2")
    check_block(config.concept_layer, dual_stream_block_names(pipe.transformer))
    return Flux2Handle(pipe, config)
