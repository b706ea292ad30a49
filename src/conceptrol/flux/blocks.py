"""FLUX.1's transformer blocks by name: which exist, and which read the concept mask (ALGORITHM.md section 2)."""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from ..core.config import CONCEPT_LAYERS
from ..core.errors import ConceptrolError

REREAD_BLOCKS = ("single_transformer_blocks.18", "single_transformer_blocks.37")  # the reference re-reads here


def is_flux_pipeline(pipe: Any) -> bool:
    """A pipeline whose transformer has FLUX.1's double- and single-stream blocks."""
    return hasattr(getattr(pipe, "transformer", None), "single_transformer_blocks")


def block_names(transformer: nn.Module) -> list[str]:
    """The names of a FLUX transformer's blocks in running order (double-stream, then single-stream)."""
    return [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))]


def mask_blocks(transformer: nn.Module, concept_block: str) -> tuple[str, ...]:
    """The blocks that read Â: the concept block, then the reference's re-reads when it is the preset block 18."""
    blocks = block_names(transformer)
    if concept_block not in blocks:
        close = difflib.get_close_matches(concept_block, blocks, n=3)
        raise ConceptrolError(f"concept block {concept_block!r} is not a block of this transformer"
                              + (f"; did you mean one of {close}?" if close else f"; it has {len(blocks)} blocks"))
    rereads = [b for b in REREAD_BLOCKS if b in blocks] if concept_block == CONCEPT_LAYERS["flux"] else []
    return (concept_block, *rereads)
