"""Conceptrol (He & Yao, arXiv 2503.06568): let a personalization adapter act only where the prompt puts the subject."""

from .concepts import Concept, find_concept_span
from .config import CONCEPT_LAYERS, ConceptrolConfig
from .errors import ConceptNotFoundError, ConceptrolError
from .install import ConceptrolHandle, apply_conceptrol
from .state import ConceptMasks

__all__ = [
    "CONCEPT_LAYERS",
    "Concept",
    "ConceptMasks",
    "ConceptNotFoundError",
    "ConceptrolConfig",
    "ConceptrolError",
    "ConceptrolHandle",
    "apply_conceptrol",
    "find_concept_span",
]
__version__ = "0.1.0"
