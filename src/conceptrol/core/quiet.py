"""Library noise that concerns only our own choices (image processors, the optional torchao), kept out of sight."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

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


# Loggers that speak while diffusers imports torchao (when it is installed): torchao about its CUDA extensions and
# Triton, torch's pytree about torchao's enums, diffusers about torchao's tensor types. Advice for library authors,
# printed on a user's plain `import`; nothing a user of conceptrol can act on.
IMPORT_NOISE = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


@contextmanager
def quiet_imports() -> Iterator[None]:
    """Import heavy libraries with IMPORT_NOISE's warnings dropped; the loggers' levels are restored afterwards."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
