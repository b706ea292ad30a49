"""The ComfyUI nodes: "Conceptrol" after the IPAdapter node(s), and "Conceptrol Mask" to preview what it read."""

from __future__ import annotations

import torch.nn.functional as F

from ..core.errors import ConceptrolError
from .patch import apply_conceptrol_patch, concept_layer_of, recorded_run
from .tokens import find_token_spans, split_concepts

LATENT_SCALE = 8  # pixels per latent position (SD 1.5 and SDXL VAEs)


class Conceptrol:
    """Confines each IPAdapter's reference image to where the model puts its concept word (arXiv 2503.06568)."""

    DESCRIPTION = ("Conceptrol: each IPAdapter acts only where the model itself attends to its concept word. Place it "
                   "after the IPAdapter node(s); give the prompt of the positive CLIPTextEncode and one concept per "
                   "IPAdapter, comma-separated, in the order the IPAdapters were applied.")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "conceptrol"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the model after the IPAdapter node(s)"}),
                "clip": ("CLIP", {"tooltip": "the CLIP that encodes the positive prompt (its tokenizer finds the concepts)"}),
                "prompt": ("STRING", {"multiline": True, "tooltip": "the positive prompt, exactly as encoded"}),
                "concepts": ("STRING", {"default": "", "tooltip": "one word or phrase of the prompt per IPAdapter, "
                                                                   "comma-separated, in the order they were applied"}),
            },
            "optional": {
                "masking": (["global", "local"], {"default": "global", "tooltip": "global: the concept layer's mask "
                            "everywhere (the paper's default); local: every layer reads its own"}),
            },
        }

    def apply(self, model, clip, prompt: str, concepts: str, masking: str = "global") -> tuple:
        labels = split_concepts(concepts)
        concept_layer_of(model)  # an unsupported model fails before any tokenizing
        spans = find_token_spans(clip, prompt, labels)
        return (apply_conceptrol_patch(model, spans, labels, masking),)


class ConceptrolMask:
    """The concept mask the last sampling run read at the concept layer, as a MASK and an IMAGE to preview."""

    DESCRIPTION = ("The mask Conceptrol read for one concept in the last step of the last run. Connect the Conceptrol "
                   "node's MODEL and the KSampler's LATENT (so it runs after sampling).")
    RETURN_TYPES = ("MASK", "IMAGE")
    FUNCTION = "mask"
    CATEGORY = "conceptrol"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the Conceptrol node's output"}),
                "samples": ("LATENT", {"tooltip": "the KSampler's output: the mask is read while it samples"}),
                "concept": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "which concept (0 = the first)"}),
            },
        }

    def mask(self, model, samples: dict, concept: int = 0) -> tuple:
        run = recorded_run(model)
        if not run.last_records:
            raise ConceptrolError("no concept mask recorded yet: sample the Conceptrol node's MODEL with a KSampler "
                                  "and connect its LATENT here")
        if concept >= len(run.labels):
            raise ConceptrolError(f"concept {concept} does not exist; this Conceptrol node has {len(run.labels)} "
                                  f"concept(s): {', '.join(run.labels)}")
        height, width = samples["samples"].shape[-2:]
        final = run.last_records[-1][:, concept : concept + 1]  # [S, 1, h, w]
        mask = F.interpolate(final, size=(height * LATENT_SCALE, width * LATENT_SCALE), mode="nearest")[:, 0]
        return mask, mask.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()  # MASK [S, H, W], IMAGE [S, H, W, 3]


NODE_CLASS_MAPPINGS = {"Conceptrol": Conceptrol, "ConceptrolMask": ConceptrolMask}
NODE_DISPLAY_NAME_MAPPINGS = {"Conceptrol": "Conceptrol", "ConceptrolMask": "Conceptrol Mask"}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "Conceptrol", "ConceptrolMask"]
