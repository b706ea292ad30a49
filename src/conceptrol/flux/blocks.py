"""FLUX.1's transformer blocks by name: which exist, and which read the concept mask (ALGORITHM.md section 2)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.blocks import check_block, dual_stream_block_names
from ..core.config import CONCEPT_LAYERS

REREAD_BLOCKS = ("single_transformer_blocks.18", "single_transformer_blocks.37")  # the reference re-reads here


def is_flux_pipeline(pipe: Any) -> bool:
    """A pipeline whose transformer has FLUX.1's double- and single-stream blocks."""
    return hasattr(getattr(pipe, "transformer", None), "single_transformer_blocks")


def block_names(transformer: nn.Module) -> list[str]:
    """The names of a FLUX transformer's blocks in running order (double-stream, then single-stream)."""
    return dual_stream_block_names(transformer)


def mask_blocks(transformer: nn.Module, concept_block: str) -> tuple[str, ...]:
    """The blocks that read Â: the concept block, then the reference's re-reads when it is the preset block 18."""
    blocks = block_names(transformer)
    check_block(concept_block, blocks)
    rereads = [b for b in REREAD_BLOCKS if b in blocks] if concept_block == CONCEPT_LAYERS["flux"] else []
    return (concept_block, *rereads)
