"""Which FLUX.1 reference adapter a pipeline carries, and the handle that follows it."""

from __future__ import annotations

from typing import Any

from ..core.config import ConceptrolConfig
from ..core.errors import ConceptrolError
from .adapters import KontextHandle, ReduxHandle, XLabsIPAdapterHandle
from .blocks import is_flux_pipeline
from .ominicontrol.handle import LORA_HINT, FluxConceptrolHandle, carries_ominicontrol


def recognises(pipe: Any) -> bool:
    """A FLUX.1 pipeline: its transformer has double- and single-stream blocks."""
    return is_flux_pipeline(pipe)


def install(pipe: Any, config: ConceptrolConfig, redux: Any = None) -> Any:
    """The handle for the one reference adapter `pipe` carries (or `redux` brings); clear errors otherwise."""
    config = config.with_architecture("flux")
    transformer = pipe.transformer
    carried = {
        "the OminiControl LoRA": carries_ominicontrol(pipe, redux),
        "an IP-Adapter": any(hasattr(p, "to_k_ip") for p in transformer.attn_processors.values()),
        "FLUX.1 Kontext": "Kontext" in type(pipe).__name__,
        "a Redux prior": redux is not None,
    }
    found = [name for name, present in carried.items() if present]
    if len(found) > 1:
        raise ConceptrolError(f"this FLUX pipeline carries {' and '.join(found)}; Conceptrol follows one reference "
                              "adapter at a time: unload the other (pipe.unload_lora_weights(), pipe.unload_ip_adapter()) "
                              "or use a separate pipeline")
    if not found:
        raise ConceptrolError(
            "this FLUX pipeline has no reference adapter; either " + LORA_HINT + ", or load XLabs' IP-Adapter "
            '(pipe.load_ip_adapter("XLabs-AI/flux-ip-adapter", weight_name="ip_adapter.safetensors", '
            'image_encoder_pretrained_model_name_or_path="openai/clip-vit-large-patch14")), or use a '
            "FluxKontextPipeline, or pass redux=FluxPriorReduxPipeline.from_pretrained(...)")
    if carried["the OminiControl LoRA"]:
        return FluxConceptrolHandle(pipe, config)
    if carried["an IP-Adapter"]:
        return XLabsIPAdapterHandle(pipe, config)
    if carried["FLUX.1 Kontext"]:
        return KontextHandle(pipe, config)
    _check_redux(pipe, redux)
    return ReduxHandle(pipe, config, redux)


def _check_redux(pipe: Any, prior: Any) -> None:
    if getattr(pipe, "text_encoder_2", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ConceptrolError("FLUX.1 Redux with Conceptrol reads the concept from the prompt, so the FLUX pipeline "
                              "needs its text encoders: load FluxPipeline with them (not text_encoder=None, "
                              "text_encoder_2=None as Redux's own examples do)")
    for part in ("image_encoder", "feature_extractor", "image_embedder"):
        if getattr(prior, part, None) is None:
            raise ConceptrolError(f"redux= must be a FluxPriorReduxPipeline with its {part}; load it with "
                                  'FluxPriorReduxPipeline.from_pretrained("black-forest-labs/FLUX.1-Redux-dev")')
