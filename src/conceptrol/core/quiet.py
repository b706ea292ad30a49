"""Silence the one piece of library noise that concerns only our own choice of image processors."""

from __future__ import annotations

import logging

# transformers 5 logs this (twice, for CLIP and SigLIP) when diffusers imports its pipelines without
# torchvision installed. Conceptrol uses the Pillow image processors on purpose, so the advice is noise.
TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def silence_torchvision_fallback() -> None:
    """Drop transformers' 'requires torchvision ... falling back to ...Pil' lines; every other message stays."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
