"""Tiny Stable Diffusion pipelines with seeded random weights, built offline (demo, tests, benchmark).

The U-Nets keep the real block topology of SD 1.5 and SDXL, so the real concept-layer names exist;
IP-Adapter checkpoints are written in the original `image_proj.*` / `ip_adapter.*` format and loaded
through `pipe.load_ip_adapter(...)`, exactly as users load the real ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from transformers import CLIPTokenizer

from .text import IMAGE_ENCODER_SIZE, CLIPImageProcessor, clip_tokenizer, image_encoder, text_encoder

ADAPTER_KINDS = ("base", "plus", "full-face")


def _vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def sd15_unet(seed: int = 0, width: int = 32) -> UNet2DConditionModel:
    """A U-Net with SD 1.5's block layout (4 levels, cross-attention in the top three)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(width, width, 2 * width, 2 * width), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """A U-Net with SDXL's block layout (3 levels, the deepest with several transformer blocks)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 4), attention_head_dim=(2, 4, 8), norm_num_groups=8,
        cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8, use_linear_projection=True,
    ).eval()


def tiny_sd15_pipeline(seed: int = 0, tokenizer: CLIPTokenizer | None = None, pipeline_class=StableDiffusionPipeline):
    """A tiny SD 1.5-layout pipeline (any SD 1.5 pipeline class) with an image encoder, no adapter yet."""
    tokenizer = tokenizer or clip_tokenizer()
    return pipeline_class(
        vae=_vae(seed + 1), text_encoder=text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        unet=sd15_unet(seed), scheduler=_scheduler(), safety_checker=None,
        feature_extractor=CLIPImageProcessor(size=IMAGE_ENCODER_SIZE, crop_size=IMAGE_ENCODER_SIZE),
        image_encoder=image_encoder(seed + 3), requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, tokenizer: CLIPTokenizer | None = None, pipeline_class=StableDiffusionXLPipeline):
    """A tiny SDXL-layout pipeline with both text encoders and an image encoder, no adapter yet."""
    tokenizer = tokenizer or clip_tokenizer()
    return pipeline_class(
        vae=_vae(seed + 1), text_encoder=text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        text_encoder_2=text_encoder(tokenizer, seed + 4, with_projection=True), tokenizer_2=tokenizer,
        unet=sdxl_unet(seed), scheduler=_scheduler(),
        feature_extractor=CLIPImageProcessor(size=IMAGE_ENCODER_SIZE, crop_size=IMAGE_ENCODER_SIZE),
        image_encoder=image_encoder(seed + 3),
    )


def ip_adapter_state_dict(
    unet: UNet2DConditionModel, kind: str = "plus", seed: int = 0, clip_dim: int = 32, resampler_width: int = 32,
    queries: int = 8,
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights for `unet` in the original checkpoint format (`image_proj.*`, `ip_adapter.*`).

    `clip_dim` is the image encoder's width (and projection size); the real SD 1.5 Plus adapter has
    clip_dim=1280 (ViT-H), resampler_width=768 and queries=16.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"kind must be one of {ADAPTER_KINDS}")
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    proj = _image_proj(kind, cross, generator, clip_dim, resampler_width, queries)
    state = {f"image_proj.{k}": v for k, v in proj.items()}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = _hidden_size(unet, name)
        for part in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{part}.weight"] = torch.randn(hidden, cross, generator=generator) / cross**0.5
        key_id += 2
    return state


def _hidden_size(unet: UNet2DConditionModel, name: str) -> int:
    channels = unet.config.block_out_channels
    if name.startswith("mid_block"):
        return channels[-1]
    level = int(name.split(".")[1])
    return list(reversed(channels))[level] if name.startswith("up_blocks") else channels[level]


def _image_proj(kind: str, cross: int, g: torch.Generator, clip: int, width: int, queries: int) -> dict[str, torch.Tensor]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    if kind == "base":
        return {"proj.weight": rand(4 * cross, clip), "proj.bias": rand(4 * cross),
                "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    if kind == "full-face":
        return {"proj.0.weight": rand(clip, clip), "proj.0.bias": rand(clip), "proj.2.weight": rand(cross, clip),
                "proj.2.bias": rand(cross), "proj.3.weight": torch.ones(cross), "proj.3.bias": torch.zeros(cross)}
    inner = max(64, width)  # Resampler attention: heads of 64 channels
    state = {"latents": rand(1, queries, width), "proj_in.weight": rand(width, clip), "proj_in.bias": rand(width),
             "proj_out.weight": rand(cross, width), "proj_out.bias": rand(cross),
             "norm_out.weight": torch.ones(cross), "norm_out.bias": torch.zeros(cross)}
    for i in range(4):
        state |= {
            f"layers.{i}.0.norm1.weight": torch.ones(width), f"layers.{i}.0.norm1.bias": torch.zeros(width),
            f"layers.{i}.0.norm2.weight": torch.ones(width), f"layers.{i}.0.norm2.bias": torch.zeros(width),
            f"layers.{i}.0.to_q.weight": rand(inner, width), f"layers.{i}.0.to_kv.weight": rand(2 * inner, width),
            f"layers.{i}.0.to_out.weight": rand(width, inner),
            f"layers.{i}.1.0.weight": torch.ones(width), f"layers.{i}.1.0.bias": torch.zeros(width),
            f"layers.{i}.1.1.weight": rand(4 * width, width), f"layers.{i}.1.3.weight": rand(width, 4 * width),
        }
    return state


def load_tiny_ip_adapter(pipe, kinds: str | list[str] = "plus", seed: int = 0, folder: Path | None = None) -> None:
    """Write random IP-Adapter checkpoint(s) as safetensors and load them with `pipe.load_ip_adapter`."""
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    folder = Path(folder or tempfile.mkdtemp(prefix="conceptrol-ip-"))
    names = []
    for i, kind in enumerate(kinds):
        name = f"ip-adapter-{kind}-tiny-{i}.safetensors"
        save_file(ip_adapter_state_dict(pipe.unet, kind, seed + i), str(folder / name))
        names.append(name)
    pipe.load_ip_adapter(str(folder), subfolder=[""] * len(names), weight_name=names, image_encoder_folder=None)


def save_tiny_sd15(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny SD 1.5 model folder and a tiny copy of h94/IP-Adapter's layout, as `hf download` would leave them.

    Returns (model folder, adapter repo folder): `conceptrol generate --model MODEL --adapter-repo ADAPTERS`
    then runs the same loading path as the real weights, offline.
    """
    folder = Path(folder)
    model, adapters = folder / "sd15", folder / "ip-adapter"
    pipe = tiny_sd15_pipeline(seed=seed)
    pipe.register_modules(image_encoder=None)  # as the real SD 1.5: the encoder comes with the adapter
    pipe.save_pretrained(model)
    (adapters / "models").mkdir(parents=True, exist_ok=True)
    save_file(ip_adapter_state_dict(pipe.unet, "plus", seed), str(adapters / "models" / "ip-adapter-plus_sd15.safetensors"))
    image_encoder(seed + 3).save_pretrained(adapters / "models" / "image_encoder")
    return model, adapters
