"""Conceptrol for FLUX with OminiControl: the same handle contract as the U-Net path."""

from __future__ import annotations

import difflib
from typing import Any, Callable

import torch
from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
from PIL import Image

from .backends.ominicontrol import OminiControlTransformer, block_names, lora_layers
from .backends.ominicontrol_pipeline import OminiControlSettings, run_ominicontrol
from .concepts import resolve_concepts
from .config import CONCEPT_LAYERS, ConceptrolConfig
from .errors import ConceptrolError
from .processors.flux import FluxCall
from .state import ConceptMasks

REREAD_BLOCKS = ("single_transformer_blocks.18", "single_transformer_blocks.37")  # the reference re-reads here
LORA_HINT = ('load the OminiControl subject LoRA first, e.g. pipe.load_lora_weights("Yuanshi/OminiControl", '
             'weight_name="omini/subject_512.safetensors", adapter_name="subject")')


def is_flux_pipeline(pipe: Any) -> bool:
    return hasattr(getattr(pipe, "transformer", None), "single_transformer_blocks")


class FluxConceptrolHandle:
    """Call it with `prompt`, `concepts` (one) and `image` (the reference); `masking="none"` is plain OminiControl."""

    def __init__(self, pipe: Any, config: ConceptrolConfig) -> None:
        if config.masking == "local":
            raise ConceptrolError("FLUX has no local masking; use masking='global' (Conceptrol) or 'none' (OminiControl)")
        if not lora_layers(pipe.transformer):
            raise ConceptrolError(f"this FLUX pipeline has no OminiControl LoRA; {LORA_HINT}")
        blocks = block_names(pipe.transformer)
        if config.concept_layer not in blocks:
            close = difflib.get_close_matches(config.concept_layer, blocks, n=3)
            raise ConceptrolError(f"concept block {config.concept_layer!r} is not a block of this transformer"
                                  + (f"; did you mean one of {close}?" if close else f"; it has {len(blocks)} blocks"))
        rereads = [b for b in REREAD_BLOCKS if b in blocks] if config.concept_layer == CONCEPT_LAYERS["flux"] else []
        self.mask_blocks = (config.concept_layer, *rereads)
        self.pipe, self.config = pipe, config
        self.runner: OminiControlTransformer | None = OminiControlTransformer(pipe.transformer, self.mask_blocks)
        self.masks: ConceptMasks | None = None

    def __call__(self, prompt: str | list[str], concepts: list | None = None, image: Image.Image | None = None, *,
                 height: int = 512, width: int = 512, num_inference_steps: int = 8, guidance_scale: float = 3.5,
                 condition_size: int = 512, num_images_per_prompt: int = 1, max_sequence_length: int = 512,
                 generator: torch.Generator | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None) -> FluxPipelineOutput:
        """Generate; returns diffusers' FluxPipelineOutput. `concepts` holds one concept per reference image."""
        if self.runner is None:
            raise ConceptrolError("this handle was removed; call apply_conceptrol(pipe) again")
        if not isinstance(image, Image.Image):
            raise ConceptrolError("pass image=<PIL image>: OminiControl takes one reference image")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if concepts is None:
            raise ConceptrolError("pass concepts=[...], one word or phrase from the prompt for the reference image")
        settings = self._settings(height, width, num_inference_steps, guidance_scale, condition_size, max_sequence_length)
        resolved = resolve_concepts(self.pipe.tokenizer_2, prompts, concepts, len(prompts) * num_images_per_prompt,
                                    max_length=max_sequence_length)
        if len(resolved.spans[0]) != 1:
            raise ConceptrolError(f"got {len(resolved.spans[0])} concepts for 1 reference image; pass exactly one")
        call = FluxCall(spans=None if self.config.masking == "none" else [s[0] for s in resolved.spans])
        images = run_ominicontrol(self.pipe, self.runner, call, prompts, image, settings, generator,
                                  num_images_per_prompt, output_type, callback_on_step_end)
        self.masks = self._masks(call, resolved.labels, settings)
        return FluxPipelineOutput(images=images)

    def remove(self) -> None:
        """Nothing is installed on the pipeline; the handle just stops working."""
        self.runner = None

    def _settings(self, height: int, width: int, steps: int, guidance: float, condition_size: int,
                  max_sequence_length: int) -> OminiControlSettings:
        multiple = self.pipe.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width), ("condition_size", condition_size)):
            if value < multiple or value % multiple:
                raise ConceptrolError(f"{name} must be a positive multiple of {multiple} pixels for this model, got {value}")
        return OminiControlSettings(height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                                    condition_size=condition_size, condition_scale=1.0 if self.config.scale is None else self.config.scale,
                                    start=self.config.start, end=self.config.end, max_sequence_length=max_sequence_length)

    def _masks(self, call: FluxCall, labels: list[list[str]], settings: OminiControlSettings) -> ConceptMasks | None:
        if not call.records:
            return None
        packed = self.pipe.vae_scale_factor * 2
        grid = (settings.height // packed, settings.width // packed)
        at_concept_block = call.records[:: len(self.mask_blocks)]  # one read per step at the concept block
        masks = torch.stack([m.float().cpu().view(m.shape[0], 1, *grid) for m in at_concept_block])
        return ConceptMasks(masks=masks, concepts=labels, layer=self.config.concept_layer)
