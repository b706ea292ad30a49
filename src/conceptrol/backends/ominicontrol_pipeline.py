"""OminiControl's denoising loop around a stock diffusers FluxPipeline (its encoders, VAE and scheduler).

Follows FluxPipeline.__call__ (pipelines/flux/pipeline_flux.py) step by step, adding the condition
tokens of the reference image and calling `OminiControlTransformer` instead of the transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from ..processors.flux import FluxCall, condition_scale_at
from .ominicontrol import ConditionTokens, OminiControlTransformer, StepInputs


@dataclass(frozen=True)
class OminiControlSettings:
    """One OminiControl generation; sizes in pixels."""

    height: int
    width: int
    num_inference_steps: int = 8
    guidance_scale: float = 3.5  # used only by guidance-distilled models (FLUX.1-dev)
    condition_size: int = 512  # the reference is resized to this square (512 for the subject_512 LoRA)
    condition_scale: float = 1.0  # c of ALGORITHM.md section 2
    start: float = 0.0
    end: float = 1.0
    max_sequence_length: int = 512


def encode_condition(pipe: Any, image: Image.Image, batch: int, settings: OminiControlSettings) -> ConditionTokens:
    """The reference as packed VAE-latent tokens (distribution mean) with ids (0, row, col + packed width)."""
    size = settings.condition_size
    pixels = pipe.image_processor.preprocess(image.convert("RGB").resize((size, size), Image.BICUBIC), height=size, width=size)
    pixels = pixels.to(pipe.vae.device, pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor  # [1, C, h, w]
    channels, h, w = latents.shape[1:]
    tokens = pipe._pack_latents(latents, 1, channels, h, w).repeat(batch, 1, 1)
    ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, pipe.device, tokens.dtype)
    ids[:, 2] += settings.width // (pipe.vae_scale_factor * 2)  # shifted right by the output's packed width
    return ConditionTokens(tokens=tokens, ids=ids)


@torch.no_grad()
def run_ominicontrol(pipe: Any, runner: OminiControlTransformer, call: FluxCall, prompts: list[str],
                     image: Image.Image | None, settings: OminiControlSettings, generator: torch.Generator | None,
                     num_images_per_prompt: int = 1, output_type: str = "pil",
                     callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None) -> Any:
    """Generate with OminiControl (and Conceptrol when `call.spans` is set); returns the decoded images.

    `callback_on_step_end(pipe, step, timestep, {"latents": ...})` is called as diffusers calls it;
    a returned "latents" entry replaces the latents.
    """
    device = pipe.transformer.device
    text, pooled, txt_ids = pipe.encode_prompt(prompt=prompts, prompt_2=prompts, device=device,
                                               num_images_per_prompt=num_images_per_prompt,
                                               max_sequence_length=settings.max_sequence_length)
    batch = text.shape[0]
    channels = pipe.transformer.config.in_channels // 4
    latents, img_ids = pipe.prepare_latents(batch, channels, settings.height, settings.width, text.dtype, device, generator)
    condition = encode_condition(pipe, image, batch, settings) if image is not None else None
    timesteps = _timesteps(pipe, settings.num_inference_steps, latents.shape[1], device)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full((batch,), settings.guidance_scale, device=device, dtype=torch.float32)
    for step, t in enumerate(timesteps):
        inputs = StepInputs(text=text, pooled=pooled, timestep=t.expand(batch).to(latents.dtype) / 1000,
                            img_ids=img_ids, txt_ids=txt_ids, guidance=guidance)
        c = condition_scale_at(step, len(timesteps), settings.start, settings.end, settings.condition_scale)
        velocity = runner(latents, inputs, condition, call, c)
        latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
        if callback_on_step_end is not None:
            latents = callback_on_step_end(pipe, step, t, {"latents": latents}).get("latents", latents)
    return _decode(pipe, latents, settings, output_type)


def _timesteps(pipe: Any, steps: int, image_seq_len: int, device: torch.device) -> torch.Tensor:
    config = pipe.scheduler.config
    sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)[0]


def _decode(pipe: Any, latents: torch.Tensor, settings: OminiControlSettings, output_type: str) -> Any:
    if output_type == "latent":
        return latents
    latents = pipe._unpack_latents(latents, settings.height, settings.width, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)
