"""OminiControl's denoising loop around a stock diffusers FluxPipeline (its encoders, VAE and scheduler).

Follows FluxPipeline.__call__ (pipelines/flux/pipeline_flux.py) step by step, adding the condition
tokens of the reference image and calling `OminiControlTransformer` instead of the transformer. Tensors are
made on `pipe._execution_device`, as there, so offloading (model, sequential, group) works as with FluxPipeline.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers, unscale_lora_layers
from PIL import Image
from torch import Tensor

from ...core.config import check_window_steps
from ...core.errors import ConceptrolError
from ..sequence import condition_scale_at
from .attention import FluxCall
from .transformer import ConditionTokens, OminiControlTransformer, StepInputs


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
    sigmas: list[float] | None = None  # custom sigmas (FluxPipeline's); None = linspace(1, 1/steps, steps)
    true_cfg_scale: float = 1.0  # s of true CFG: neg + s * (pos - neg), run only when a negative prompt is given
    lora_scale: float | None = None  # joint_attention_kwargs["scale"]: scales every active LoRA, as in FluxPipeline


@dataclass(frozen=True)
class TextInputs:
    """What FluxPipeline.encode_prompt takes for one pass: prompts, or precomputed embeddings."""

    prompt: str | list[str] | None = None  # CLIP prompts, and T5 prompts when prompt_2 is None
    prompt_2: str | list[str] | None = None  # T5 prompts
    prompt_embeds: Tensor | None = None  # [B, T, D_t5]
    pooled_prompt_embeds: Tensor | None = None  # [B, D_clip]


@dataclass(frozen=True)
class OminiControlInputs:
    """One call's inputs besides the settings, named as FluxPipeline.__call__ names them."""

    text: TextInputs
    image: Image.Image | None  # the reference; None = no condition stream
    negative: TextInputs | None = None  # true CFG's negative prompt; None = no true CFG
    num_images_per_prompt: int = 1
    generator: torch.Generator | list[torch.Generator] | None = None
    latents: Tensor | None = None  # [B, N, C_in] packed initial latents, as FluxPipeline.prepare_latents takes them
    callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None
    callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",)  # from FluxPipeline._callback_tensor_inputs


@dataclass(frozen=True)
class EncodedText:
    """FluxPipeline.encode_prompt's outputs."""

    embeds: Tensor  # [B, T, D_t5]
    pooled: Tensor  # [B, D_clip]
    ids: Tensor  # [T, 3]


def encode_condition(pipe: Any, image: Image.Image, batch: int, settings: OminiControlSettings,
                     device: torch.device) -> ConditionTokens:
    """The reference as packed VAE-latent tokens (distribution mean) with ids (0, row, col + packed width)."""
    size = settings.condition_size
    pixels = pipe.image_processor.preprocess(image.convert("RGB").resize((size, size), Image.BICUBIC), height=size, width=size)
    pixels = pixels.to(device, pipe.vae.dtype)
    latents = pipe.vae.encode(pixels).latent_dist.mean
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor  # [1, C, h, w]
    channels, h, w = latents.shape[1:]
    tokens = pipe._pack_latents(latents, 1, channels, h, w).repeat(batch, 1, 1)
    ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, device, tokens.dtype)
    ids[:, 2] += settings.width // (pipe.vae_scale_factor * 2)  # shifted right by the output's packed width
    return ConditionTokens(tokens=tokens, ids=ids)


def encode_text(pipe: Any, text: TextInputs, num_images_per_prompt: int, settings: OminiControlSettings,
                device: torch.device) -> EncodedText:
    """FluxPipeline.encode_prompt on one pass's prompts (given embeddings pass through unrepeated, as there)."""
    embeds, pooled, ids = pipe.encode_prompt(
        prompt=text.prompt, prompt_2=text.prompt_2, prompt_embeds=text.prompt_embeds,
        pooled_prompt_embeds=text.pooled_prompt_embeds, device=device, num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=settings.max_sequence_length, lora_scale=settings.lora_scale)
    return EncodedText(embeds=embeds, pooled=pooled, ids=ids)


@contextmanager
def lora_scaled(model: torch.nn.Module, scale: float | None) -> Iterator[None]:
    """Scale the model's LoRA layers for a call, as FluxTransformer2DModel.forward does with joint_attention_kwargs["scale"]."""
    if scale is None or not USE_PEFT_BACKEND:
        yield
        return
    scale_lora_layers(model, scale)
    try:
        yield
    finally:
        unscale_lora_layers(model, scale)


@dataclass(frozen=True)
class _Loop:
    """What stays fixed over the steps of one call."""

    runner: OminiControlTransformer
    call: FluxCall
    condition: ConditionTokens | None
    img_ids: Tensor  # [N, 3]
    guidance: Tensor | None  # [B]
    negative: EncodedText | None
    settings: OminiControlSettings

    def velocity(self, latents: Tensor, text: EncodedText, t: Tensor, c: float) -> Tensor:
        """The prediction for one step; with true CFG neg + s (pos - neg), the negative pass after and reading no mask."""
        positive = self.runner(latents, self._inputs(latents, text, t), self.condition, self.call, c)
        if self.negative is None:
            return positive
        negative = self.runner(latents, self._inputs(latents, self.negative, t), self.condition, self.call, c,
                               read_masks=False)
        return negative + self.settings.true_cfg_scale * (positive - negative)

    def _inputs(self, latents: Tensor, text: EncodedText, t: Tensor) -> StepInputs:
        return StepInputs(text=text.embeds, pooled=text.pooled, timestep=t.expand(latents.shape[0]).to(latents.dtype) / 1000,
                          img_ids=self.img_ids, txt_ids=text.ids, guidance=self.guidance)


@torch.no_grad()
def run_ominicontrol(pipe: Any, runner: OminiControlTransformer, call: FluxCall, inputs: OminiControlInputs,
                     settings: OminiControlSettings, output_type: str = "pil") -> Any:
    """Generate with OminiControl (and Conceptrol when `call.spans` is set); returns the decoded images.

    As FluxPipeline.__call__: `callback_on_step_end(pipe, step, timestep, tensors)` gets the tensors named in
    `callback_on_step_end_tensor_inputs` and may return replacements for "latents" and "prompt_embeds";
    `pipe.num_timesteps`, `pipe.current_timestep` and `pipe.interrupt` work as there.
    """
    device = pipe._execution_device  # with offloading the models' own devices say where they are stored, not run
    text = encode_text(pipe, inputs.text, inputs.num_images_per_prompt, settings, device)
    negative = None
    if inputs.negative is not None:
        negative = encode_text(pipe, inputs.negative, inputs.num_images_per_prompt, settings, device)
    batch, channels = text.embeds.shape[0], pipe.transformer.config.in_channels // 4
    latents, img_ids = pipe.prepare_latents(batch, channels, settings.height, settings.width, text.embeds.dtype, device,
                                            inputs.generator, inputs.latents)
    _check_batches(text, negative, latents, (batch, img_ids.shape[0], channels * 4))
    condition = encode_condition(pipe, inputs.image, batch, settings, device) if inputs.image is not None else None
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full((batch,), settings.guidance_scale, device=device, dtype=torch.float32)
    loop = _Loop(runner, call, condition, img_ids, guidance, negative, settings)
    with lora_scaled(pipe.transformer, settings.lora_scale):
        latents = _denoise(pipe, loop, inputs, latents, text)
    images = _decode(pipe, latents, settings, output_type)
    pipe.maybe_free_model_hooks()  # as FluxPipeline: offload the last model (enable_model_cpu_offload)
    return images


def _denoise(pipe: Any, loop: _Loop, inputs: OminiControlInputs, latents: Tensor, text: EncodedText) -> Tensor:
    """FluxPipeline's denoising loop (step 6 of its __call__) with OminiControl's transformer."""
    settings = loop.settings
    timesteps = _timesteps(pipe, settings, latents.shape[1], latents.device)
    check_window_steps(settings.start, settings.end, len(timesteps))
    _begin(pipe, settings, len(timesteps))
    pipe.scheduler.set_begin_index(0)
    for step, t in enumerate(timesteps):
        if pipe.interrupt:
            continue
        pipe._current_timestep = t
        c = condition_scale_at(step, len(timesteps), settings.start, settings.end, settings.condition_scale)
        velocity = loop.velocity(latents, text, t, c)
        latents = pipe.scheduler.step(velocity, t, latents, return_dict=False)[0]
        latents, text = _step_end(pipe, inputs, step, t, latents, text)
    pipe._current_timestep = None
    return latents


def _begin(pipe: Any, settings: OminiControlSettings, num_timesteps: int) -> None:
    """The call state FluxPipeline keeps on itself, which step callbacks read (pipe.num_timesteps, pipe.interrupt)."""
    pipe._guidance_scale = settings.guidance_scale
    pipe._joint_attention_kwargs = {} if settings.lora_scale is None else {"scale": settings.lora_scale}
    pipe._num_timesteps = num_timesteps
    pipe._current_timestep = None
    pipe._interrupt = False


def _step_end(pipe: Any, inputs: OminiControlInputs, step: int, t: Tensor, latents: Tensor,
              text: EncodedText) -> tuple[Tensor, EncodedText]:
    """FluxPipeline's callback_on_step_end: hand over the named tensors, take back replacements."""
    if inputs.callback_on_step_end is None:
        return latents, text
    available = {"latents": latents, "prompt_embeds": text.embeds}
    tensors = {name: available[name] for name in inputs.callback_on_step_end_tensor_inputs}
    outputs = inputs.callback_on_step_end(pipe, step, t, tensors)
    return outputs.get("latents", latents), replace(text, embeds=outputs.get("prompt_embeds", text.embeds))


def _check_batches(text: EncodedText, negative: EncodedText | None, latents: Tensor, expected: tuple[int, ...]) -> None:
    if negative is not None and negative.embeds.shape[0] != text.embeds.shape[0]:
        raise ConceptrolError(f"the negative prompt gives {negative.embeds.shape[0]} sample(s) but the prompt "
                              f"{text.embeds.shape[0]}; pass one negative prompt per prompt")
    if tuple(latents.shape) != expected:
        raise ConceptrolError(f"latents must be packed as FluxPipeline.prepare_latents makes them: {list(expected)} "
                              f"(samples, (height/16)*(width/16), 4*latent channels) for this call, got {list(latents.shape)}")


def _timesteps(pipe: Any, settings: OminiControlSettings, image_seq_len: int, device: torch.device) -> torch.Tensor:
    config, steps = pipe.scheduler.config, settings.num_inference_steps
    sigmas = np.linspace(1.0, 1 / steps, steps) if settings.sigmas is None else settings.sigmas
    if config.get("use_flow_sigmas"):
        sigmas = None
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
