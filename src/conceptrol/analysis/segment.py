"""Subject masks without a mask file: segment the generated image from the concept word (ALGORITHM.md section 5).

The paper used SAM. The faithful choice is an open-vocabulary box detector (OWLv2 or Grounding DINO) with SAM on the
best box; CLIPSeg is the light option. All are loaded through transformers; their weights come from the hub (or a
local copy), so offline they fail in one line that says to pass a mask file instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..core.errors import ConceptrolError

# name -> the hub repositories it loads (a detector and SAM, or CLIPSeg alone)
SEGMENTERS: dict[str, tuple[str, ...]] = {
    "owlv2-sam": ("google/owlv2-base-patch16-ensemble", "facebook/sam-vit-base"),
    "grounding-dino-sam": ("IDEA-Research/grounding-dino-tiny", "facebook/sam-vit-base"),
    "clipseg": ("CIDAS/clipseg-rd64-refined",),
}


@dataclass
class BoxThenSam:
    """An open-vocabulary detector finds the concept's best box; SAM segments inside it."""

    name: str
    detector: Any
    detector_processor: Any
    sam: Any
    sam_processor: Any

    @torch.no_grad()
    def __call__(self, image: Image.Image, concept: str) -> Tensor:
        """The subject mask [H, W] (bool) of `concept` in `image`."""
        box = self.best_box(image, concept)
        inputs = self.sam_processor(image, input_boxes=[[box]], return_tensors="pt").to(self.sam.device)
        outputs = self.sam(**inputs, multimask_output=False)
        masks = self.sam_processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())
        return masks[0][0, 0].bool()  # [H, W]

    def best_box(self, image: Image.Image, concept: str) -> list[float]:
        """[x0, y0, x1, y1] in pixels of the highest-scoring detection of `concept`."""
        if "owl" in type(self.detector).__name__.lower():
            side = max(image.size)  # OWLv2 pads the image to a square: boxes are relative to it
            inputs = self.detector_processor(text=[[f"a photo of a {concept}"]], images=image, return_tensors="pt")
            outputs = self.detector(**inputs.to(self.detector.device))
            found = self.detector_processor.post_process_grounded_object_detection(
                outputs, threshold=0.0, target_sizes=[(side, side)])[0]
        else:
            inputs = self.detector_processor(images=image, text=f"{concept.lower()}.", return_tensors="pt")
            outputs = self.detector(**inputs.to(self.detector.device))
            found = self.detector_processor.post_process_grounded_object_detection(
                outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[image.size[::-1]])[0]
        if len(found["scores"]) == 0:
            raise ConceptrolError(f"the {self.name} detector found no {concept!r} in the image; pass a mask file")
        box = found["boxes"][found["scores"].argmax()].tolist()
        width, height = image.size
        return [min(max(box[0], 0), width), min(max(box[1], 0), height), min(max(box[2], 0), width),
                min(max(box[3], 0), height)]


@dataclass
class ClipSeg:
    """CLIPSeg's text-conditioned map, min-max normalised, thresholded at one half, at the image's size."""

    model: Any
    processor: Any
    name: str = "clipseg"

    @torch.no_grad()
    def __call__(self, image: Image.Image, concept: str) -> Tensor:
        inputs = self.processor(text=[concept], images=[image], padding=True, return_tensors="pt")
        logits = self.model(**inputs.to(self.model.device)).logits.float().cpu()
        logits = logits.reshape(1, 1, *logits.shape[-2:])
        probs = F.interpolate(logits.sigmoid(), size=image.size[::-1], mode="bilinear", align_corners=False)[0, 0]
        low, high = probs.min(), probs.max()
        return (probs - low) / (high - low + 1e-12) >= 0.5


def load_segmenter(name: str, device: str | torch.device = "cpu", sources: dict[str, str] | None = None) -> Any:
    """A segmenter by name (SEGMENTERS); `sources` maps a hub id to a local copy. Offline: one line naming --mask."""
    if name not in SEGMENTERS:
        raise ConceptrolError(f"unknown segmenter {name!r}; choose one of {', '.join(SEGMENTERS)}")
    import transformers

    repos = [(sources or {}).get(repo, repo) for repo in SEGMENTERS[name]]
    try:
        if name == "clipseg":
            return ClipSeg(_load(transformers.CLIPSegForImageSegmentation, repos[0], device),
                           transformers.CLIPSegProcessor.from_pretrained(repos[0]))
        detector_class = (transformers.Owlv2ForObjectDetection if name.startswith("owlv2")
                          else transformers.AutoModelForZeroShotObjectDetection)
        return BoxThenSam(name, _load(detector_class, repos[0], device), transformers.AutoProcessor.from_pretrained(repos[0]),
                          _load(transformers.SamModel, repos[1], device), transformers.SamProcessor.from_pretrained(repos[1]))
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConceptrolError(f"could not load the {name} segmenter ({reason}); pass --mask FILE (the subject white on "
                              "black) for each case, or download its models where the hub is reachable") from None


def _load(model_class: Any, repo: str, device: str | torch.device) -> Any:
    return model_class.from_pretrained(repo).to(device).eval()
