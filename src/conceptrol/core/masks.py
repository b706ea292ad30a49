"""The concept masks a handle read during its last call (every family returns them in this form)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torch import Tensor

from .images import mask_overlay


@dataclass
class ConceptMasks:
    """Concept masks read at the concept layer during one call."""

    masks: Tensor  # [steps, samples, concepts, h, w], fp32 on the CPU, each in [0, 1]
    concepts: list[list[str]]  # the concept text (or span) of each sample and reference image
    layer: str  # the layer the masks were read at

    def final(self) -> Tensor:
        """The mask of the last step: [samples, concepts, h, w]."""
        return self.masks[-1]

    def overlay(self, image: Image.Image, sample: int = 0, concept: int = 0, step: int = -1) -> Image.Image:
        """One mask as a heat map over a generated image (the mask is upsampled to the image's size)."""
        return mask_overlay(image, self.masks[step, sample, concept])
