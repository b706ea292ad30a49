"""Conceptrol on SD 1.5 / SDXL with IP-Adapter: the handle that installs the processors, runs the pipeline and removes them."""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any

import torch

from ..core.callbacks import chain_step_callback
from ..core.concepts import ResolvedConcepts, resolve_concepts
from ..core.config import CONCEPT_LAYERS, ConceptrolConfig
from ..core.errors import ConceptrolError
from ..core.masks import ConceptMasks
from ..core.wrapping import ProcessorSwap
from .processor import ConceptrolIPAdapterProcessor
from .state import ConceptrolState

PROCESSOR_SUFFIX = ".processor"


def detect_architecture(unet: Any) -> str:
    """'sdxl' for U-Nets with SDXL's text-time conditioning, else 'sd15'."""
    return "sdxl" if unet.config.get("addition_embed_type") == "text_time" else "sd15"


def recognises(pipe: Any) -> bool:
    """A pipeline with a U-Net (Stable Diffusion 1.5, SDXL and their variants)."""
    return getattr(pipe, "unet", None) is not None


def install(pipe: Any, config: ConceptrolConfig) -> ConceptrolHandle:
    """Conceptrol on an SD 1.5 / SDXL pipeline with an IP-Adapter loaded by `pipe.load_ip_adapter`."""
    unet = pipe.unet
    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        raise ConceptrolError(f"{type(pipe).__name__} has no callback_on_step_end, which Conceptrol needs to follow the steps")
    processors = unet.attn_processors
    if any(isinstance(p, ConceptrolIPAdapterProcessor) for p in processors.values()):
        raise ConceptrolError("Conceptrol is already applied to this pipeline; call handle.remove() before applying it again")
    adapter_layers = {name.removesuffix(PROCESSOR_SUFFIX) for name, p in processors.items() if hasattr(p, "to_k_ip")}
    if not adapter_layers:
        raise ConceptrolError(
            "this pipeline has no IP-Adapter; call pipe.load_ip_adapter(...) first, e.g. "
            'pipe.load_ip_adapter("h94/IP-Adapter", subfolder="models", weight_name="ip-adapter-plus_sd15.safetensors")'
        )
    config = config.with_architecture(detect_architecture(unet))
    _check_layer(config.concept_layer, adapter_layers)
    return ConceptrolHandle(pipe, config)


def _check_layer(layer: str, adapter_layers: set[str]) -> None:
    if layer in adapter_layers:
        return
    close = difflib.get_close_matches(layer, sorted(adapter_layers), n=3, cutoff=0.6)
    hint = f"; did you mean one of {close}?" if close else f"; the presets are {CONCEPT_LAYERS}"
    raise ConceptrolError(
        f"concept layer {layer!r} is not a cross-attention layer with an IP-Adapter in this U-Net{hint} "
        "(names look like 'up_blocks.1.attentions.0.transformer_blocks.0.attn2')"
    )


class ConceptrolHandle:
    """Owns one Conceptrol install: call it like the pipeline (plus `concepts`), then `remove()`."""

    def __init__(self, pipe: Any, config: ConceptrolConfig) -> None:
        self.pipe = pipe
        self.config = config
        self.state = ConceptrolState(config)

        def make(key: str, stock: Any) -> Any:
            if not hasattr(stock, "to_k_ip"):
                return stock
            name = key.removesuffix(PROCESSOR_SUFFIX)
            return ConceptrolIPAdapterProcessor(stock, self.state, name, name == config.concept_layer)

        self._swap: ProcessorSwap | None = ProcessorSwap(pipe.unet, make, self._on_unet_forward)

    @property
    def masks(self) -> ConceptMasks | None:
        """Concept masks of the last call: one [samples, concepts, h, w] mask per step, at the concept layer."""
        return self.state.last_masks

    def __call__(self, prompt: str | list[str] | None = None, concepts: list | None = None, **kwargs: Any) -> Any:
        """Run the pipeline under Conceptrol; `concepts` holds one concept per reference image."""
        if self._swap is None:
            raise ConceptrolError("this handle was removed; call apply_conceptrol(pipe) again")
        if concepts is None:
            raise ConceptrolError("pass concepts=[...], one word or phrase from the prompt per reference image")
        resolved = self._resolve(prompt, concepts, kwargs)
        if kwargs.get("prompt_2") not in (None, prompt):
            warnings.warn("concept positions are read from `prompt`; a different `prompt_2` is not searched", stacklevel=2)
        kwargs = self._with_step_callback(kwargs)
        self.state.begin(resolved.spans, resolved.labels, total_steps=kwargs.get("num_inference_steps", 50))
        output = None
        try:
            output = self.pipe(prompt=prompt, **kwargs)
            return output
        finally:
            self.state.end(completed=output is not None)

    def remove(self) -> None:
        """Restore the exact processor objects that were there before; idempotent."""
        if self._swap is None:
            return
        self._swap.undo("the U-Net's attention processors were replaced after apply_conceptrol (e.g. by "
                        "unload_ip_adapter or set_attn_processor); they are left as they are now")
        self._swap = None

    def _resolve(self, prompt: Any, concepts: list, kwargs: dict) -> ResolvedConcepts:
        num_images = count_reference_images(kwargs, self._num_adapters())
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        num_prompts = len(prompts) if prompts is not None else _embeds_batch(kwargs)
        num_samples = num_prompts * int(kwargs.get("num_images_per_prompt") or 1)
        tokenizer = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
        resolved = resolve_concepts(tokenizer, prompts, concepts, num_samples)
        if len(resolved.spans[0]) != num_images:
            raise ConceptrolError(
                f"got {len(resolved.spans[0])} concept(s) for {num_images} reference image(s); "
                "pass exactly one concept per reference image, in the same order"
            )
        return resolved

    def _num_adapters(self) -> int:
        projection = getattr(self.pipe.unet, "encoder_hid_proj", None)
        return len(getattr(projection, "image_projection_layers", [projection]))

    def _with_step_callback(self, kwargs: dict) -> dict:
        """Chain a step counter (and the mask recorder) before the user's callback_on_step_end (kept working as before)."""
        state = self.state

        def finished(step: int) -> None:
            call = state.call
            if state.config.record_masks and call.global_mask is not None:  # the concept layer's mask of this step
                call.records.append(call.global_mask.detach())
            call.step = step + 1

        return chain_step_callback(kwargs, finished)

    @torch.compiler.disable  # plain Python between U-Net calls: a compiled U-Net neither traces nor guards on it
    def _on_unet_forward(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Read the latent grid and the number of steps the pipeline really runs; build the span weights; set the
        window for this evaluation."""
        call = self.state.call
        if call is None:
            return
        sample = args[0] if args else kwargs["sample"]
        call.set_latent_size(tuple(sample.shape[-2:]))
        text = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
        if isinstance(text, torch.Tensor):
            call.weights(text.shape[1], text.device)  # built here, outside a compiled U-Net
        steps = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(steps, int) and steps > 0:
            call.total_steps = steps
        self.state.follow_window()  # the one place the window is set: before every U-Net evaluation


def count_reference_images(kwargs: dict, num_adapters: int) -> int:
    """How many reference images a call passes, over all loaded IP-Adapters."""
    embeds = kwargs.get("ip_adapter_image_embeds")
    if embeds is not None:
        return sum(e.shape[1] if e.ndim >= 3 else 1 for e in embeds)
    images = kwargs.get("ip_adapter_image")
    if images is None:
        raise ConceptrolError("pass ip_adapter_image (one reference image per concept) or ip_adapter_image_embeds")
    images = images if isinstance(images, list) else [images]
    if len(images) != num_adapters:
        raise ConceptrolError(
            f"ip_adapter_image has {len(images)} entries but {num_adapters} IP-Adapter(s) are loaded; pass one entry "
            "per adapter, and several reference images for one adapter as a nested list: [[image_a, image_b]]"
        )
    return sum(len(entry) if isinstance(entry, (list, tuple)) else 1 for entry in images)


def _embeds_batch(kwargs: dict) -> int:
    embeds = kwargs.get("prompt_embeds")
    if embeds is None:
        raise ConceptrolError("pass prompt (or prompt_embeds with explicit token spans as concepts)")
    return embeds.shape[0]
