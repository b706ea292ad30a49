"""Naming a transformer block: the names a DiT's blocks go by, and the check that a named block exists."""

from __future__ import annotations

import difflib
from typing import Any

from .errors import ConceptrolError


def dual_stream_block_names(transformer: Any) -> list[str]:
    """Blocks in running order of a transformer with double- then single-stream blocks (FLUX.1, FLUX.2)."""
    return [f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))] + [
        f"single_transformer_blocks.{i}" for i in range(len(getattr(transformer, "single_transformer_blocks", ())))]


def check_block(block: str, blocks: list[str]) -> None:
    """`block` is one of `blocks`; else one line naming the closest names (or the range there is)."""
    if block not in blocks:
        close = difflib.get_close_matches(block, blocks, n=3)
        raise ConceptrolError(f"concept block {block!r} is not a block of this transformer"
                              + (f"; did you mean one of {close}?" if close else
                                 f"; it has {len(blocks)} blocks, {blocks[0]} to {blocks[-1]}"))
