"""Tiny pipelines with seeded random weights and real block layouts, built offline: the demo's, the tests' and the
benchmarks' models. `save_*` functions write folders laid out as `hf download` leaves the real ones."""

from .flux import (
    FLUX_LORA_TARGETS,
    REAL_TEXT_DIMS,
    TEXT_DIMS,
    XLABS_WEIGHTS,
    add_subject_lora,
    flux1_transformer,
    flux_components,
    flux_transformer,
    load_tiny_xlabs_ip_adapter,
    save_tiny_flux_folders,
    save_tiny_xlabs_ip_adapter,
    tiny_flux,
    tiny_flux_pipeline,
    tiny_kontext,
    tiny_ominicontrol,
    tiny_redux_prior,
    tiny_reference_image,
    xlabs_ip_adapter_state_dict,
)
from .sd import (
    ADAPTER_KINDS,
    ip_adapter_state_dict,
    load_tiny_ip_adapter,
    save_tiny_sd15,
    sd15_unet,
    sdxl_unet,
    tiny_sd15_pipeline,
    tiny_sdxl_pipeline,
)
from .text import (
    IMAGE_ENCODER_SIZE,
    CLIPImageProcessor,
    byte_level_alphabet,
    clip_tokenizer,
    image_encoder,
    t5_tokenizer,
    text_encoder,
)

__all__ = [
    "ADAPTER_KINDS", "CLIPImageProcessor", "FLUX_LORA_TARGETS", "IMAGE_ENCODER_SIZE", "REAL_TEXT_DIMS", "TEXT_DIMS", "XLABS_WEIGHTS", "add_subject_lora",
    "byte_level_alphabet", "clip_tokenizer", "flux1_transformer", "flux_components", "flux_transformer",
    "image_encoder", "ip_adapter_state_dict", "load_tiny_ip_adapter", "load_tiny_xlabs_ip_adapter",
    "save_tiny_flux_folders", "save_tiny_sd15", "save_tiny_xlabs_ip_adapter", "sd15_unet", "sdxl_unet",
    "t5_tokenizer", "text_encoder", "tiny_flux", "tiny_flux_pipeline", "tiny_kontext", "tiny_ominicontrol", "tiny_redux_prior",
    "tiny_reference_image", "tiny_sd15_pipeline", "tiny_sdxl_pipeline", "xlabs_ip_adapter_state_dict",
]
