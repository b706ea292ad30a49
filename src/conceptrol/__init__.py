"""Conceptrol (He & Yao, arXiv 2503.06568): let a personalization adapter act only where the prompt puts the subject.

The public names load on first use, so `import conceptrol` (and the command line's `--help`) stays
quick; `apply_conceptrol` and the handles bring in torch and diffusers when first touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .core.errors import ConceptNotFoundError, ConceptrolError, ConceptrolWarning
from .core.quiet import quiet_imports, silence_torchvision_fallback

silence_torchvision_fallback()

__all__ = [
    "CONCEPT_LAYERS",
    "AnalysisCase",
    "BlockAnalysis",
    "Concept",
    "ConceptMasks",
    "ConceptNotFoundError",
    "ConceptrolConfig",
    "ConceptrolError",
    "ConceptrolHandle",
    "ConceptrolWarning",
    "analyze_blocks",
    "apply_conceptrol",
    "find_concept_span",
]
__version__ = "0.3.0"

_LAZY = {  # public name -> the module that defines it
    "CONCEPT_LAYERS": ".core.config",
    "ConceptrolConfig": ".core.config",
    "Concept": ".core.concepts",
    "find_concept_span": ".core.concepts",
    "ConceptMasks": ".core.masks",
    "ConceptrolHandle": ".unet.handle",
    "apply_conceptrol": ".apply",
    "analyze_blocks": ".analysis",
    "AnalysisCase": ".analysis",
    "BlockAnalysis": ".analysis",
}

if TYPE_CHECKING:
    from .analysis import AnalysisCase, BlockAnalysis, analyze_blocks
    from .apply import apply_conceptrol
    from .core.concepts import Concept, find_concept_span
    from .core.config import CONCEPT_LAYERS, ConceptrolConfig
    from .core.masks import ConceptMasks
    from .unet.handle import ConceptrolHandle


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'conceptrol' has no attribute {name!r}")
    with quiet_imports():
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
