"""What an attention block analysis found: every block's AUC per case and step, its ranking, and the maps."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch import Tensor

from ..core.concepts import Concept


@dataclass(frozen=True)
class AnalysisCase:
    """One case of section 5: a prompt, its concept, a seed, and the subject mask (None: segment the image)."""

    prompt: str
    concept: str | Concept
    mask: Any = None  # a mask file, a PIL image, a boolean array or tensor [H, W]; None: segmented from the image
    seed: int = 0

    @property
    def concept_text(self) -> str:
        return self.concept.text if isinstance(self.concept, Concept) else str(self.concept)


@dataclass
class CaseResult:
    """A case as it ran: the stock pipeline's image and the subject mask it was scored against."""

    case: AnalysisCase
    image: Image.Image
    subject: Tensor  # bool [H, W] at the image's size
    mask_source: str  # the mask file, "given" (an array), or the segmenter that made it


@dataclass
class BlockAnalysis:
    """Per-block, per-step ROC AUC of the textual concept map against the subject mask (arXiv 2503.06568, Figs. 5-6).

    `auc[block][case][step]`; `mean_auc`, `ranking` and `best` use the steps in `steps` (all when None).
    """

    model: str
    architecture: str  # sd15, sdxl or flux: the family whose preset is marked
    layers: list[str]  # every analysed block in execution order, named as ConceptrolConfig(concept_layer=...) takes it
    cases: list[CaseResult]
    auc: dict[str, list[list[float]]]
    maps: dict[str, list[Tensor]]  # block -> one [steps, h, w] map per case (the conditional sample's)
    steps: slice | None = None  # the steps the ranking uses (None: all)
    preset: str | None = None  # the architecture's current concept block
    settings: dict[str, Any] = field(default_factory=dict)  # the pipeline's keywords (steps, size, guidance, ...) and,
    # from the command line, the reference images an editing model edited: what reproduces the images
    files: list[Path] = field(default_factory=list)  # what save() wrote

    @property
    def num_steps(self) -> int:
        return len(next(iter(self.auc.values()))[0]) if self.auc else 0

    def ranked_steps(self) -> range:
        """The steps the ranking uses."""
        return range(self.num_steps)[self.steps] if self.steps is not None else range(self.num_steps)

    @property
    def mean_auc(self) -> dict[str, float]:
        """Each block's AUC averaged over the cases and the ranked steps."""
        steps = self.ranked_steps()
        return {block: sum(case[k] for case in per_case for k in steps) / (len(per_case) * len(steps))
                for block, per_case in self.auc.items()}

    @property
    def ranking(self) -> list[str]:
        """The blocks, highest mean AUC first (ties in execution order)."""
        means = self.mean_auc
        return sorted(self.layers, key=lambda block: -means[block])

    @property
    def best(self) -> str:
        return self.ranking[0]

    def to_json(self, images: list[str], masks: list[str]) -> dict[str, Any]:
        """analysis.json's content; `images` and `masks` name the files the cases' pictures were written to."""
        steps = None if self.steps is None else [self.ranked_steps().start, self.ranked_steps().stop]
        cases = [{"prompt": r.case.prompt, "concept": r.case.concept_text, "seed": r.case.seed, "mask": masks[i],
                  "mask_source": r.mask_source, "image": images[i]} for i, r in enumerate(self.cases)]
        return {"model": self.model, "architecture": self.architecture, "layers": self.layers, "cases": cases,
                "steps": self.num_steps, "steps_range": steps, "preset": self.preset, "auc": self.auc,
                "mean_auc": self.mean_auc, "ranking": self.ranking, "best": self.best, "settings": self.settings}

    def save(self, folder: str | Path) -> list[Path]:
        """Write analysis.json, each case's image and mask, the maps (maps.safetensors), the pictures and
        analysis.html into `folder`; an earlier analysis there is never overwritten (its files keep their names, these
        get a -2, -3, ... suffix)."""
        from .save import save_analysis

        self.files = save_analysis(self, Path(folder))
        return self.files


def read_analysis(path: str | Path) -> dict[str, Any]:
    """A saved analysis.json (or the analysis.json in a folder)."""
    path = Path(path).expanduser()
    path = path / "analysis.json" if path.is_dir() else path
    return json.loads(path.read_text(encoding="utf-8"))
