"""Which pipelines the FLUX.2 family takes, and the handle that follows them."""

from __future__ import annotations

from typing import Any

from ..core.config import ConceptrolConfig
from ..core.reference_handle import install_reference_handle, transformer_is
from .handle import Flux2Handle

PIPELINES = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline")


def recognises(pipe: Any) -> bool:
    """A pipeline whose transformer is FLUX.2's."""
    return transformer_is(pipe, "Flux2Transformer2DModel")


def install(pipe: Any, config: ConceptrolConfig) -> Flux2Handle:
    return install_reference_handle(pipe, config, Flux2Handle, PIPELINES, "FLUX.2", "flux2")
