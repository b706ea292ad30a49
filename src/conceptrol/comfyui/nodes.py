"""The ComfyUI nodes: "Conceptrol" after the IPAdapter node(s), and "Conceptrol Mask" to preview what it read."""

from __future__ import annotations

import torch.nn.functional as F

from ..core.errors import ConceptrolError
from .patch import KEPT_RUNS, apply_conceptrol_patch, concept_layer_of, recorded_run
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
    """The concept mask that made a LATENT: read at the concept layer in the last step of the run that sampled it."""

    DESCRIPTION = ("The mask Conceptrol read for one concept in the last step of the sampling run that produced this "
                   "LATENT. Connect the Conceptrol node's MODEL and the LATENT of the sampler node that sampled it "
                   "(KSampler, KSampler Advanced, SamplerCustom's output).")
    RETURN_TYPES = ("MASK", "IMAGE")
    FUNCTION = "mask"
    CATEGORY = "conceptrol"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "the Conceptrol node's output"}),
                "samples": ("LATENT", {"tooltip": "the sampler's output: the mask is the one read while making it"}),
                "concept": ("INT", {"default": 0, "min": 0, "max": 63, "tooltip": "which concept (0 = the first)"}),
            },
        }

    def mask(self, model, samples: dict, concept: int = 0) -> tuple:
        run = recorded_run(model)
        if concept >= len(run.labels):
            raise ConceptrolError(f"concept {concept} does not exist; this Conceptrol node has {len(run.labels)} "
                                  f"concept(s): {', '.join(run.labels)}")
        latent = samples["samples"]
        final = run.final_mask_of(latent)
        if final is None:
            raise ConceptrolError(_not_sampled_here(bool(run.finished)))
        height, width = latent.shape[-2:]
        final = final[:, concept : concept + 1]  # [S, 1, h, w]
        mask = F.interpolate(final, size=(height * LATENT_SCALE, width * LATENT_SCALE), mode="nearest")[:, 0]
        return mask, mask.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()  # MASK [S, H, W], IMAGE [S, H, W, 3]


def _not_sampled_here(sampled_before: bool) -> str:
    if not sampled_before:
        return ("no concept mask recorded yet: sample the Conceptrol node's MODEL with a KSampler and connect that "
                "KSampler's LATENT here")
    return ("this LATENT was not made by sampling this Conceptrol node's MODEL (or by one of its last "
            f"{KEPT_RUNS} runs): connect the LATENT output of the sampler node that samples it, directly (not a "
            "latent changed by other nodes on the way)")


NODE_CLASS_MAPPINGS = {"Conceptrol": Conceptrol, "ConceptrolMask": ConceptrolMask}
NODE_DISPLAY_NAME_MAPPINGS = {"Conceptrol": "Conceptrol", "ConceptrolMask": "Conceptrol Mask"}
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "Conceptrol", "ConceptrolMask"]
