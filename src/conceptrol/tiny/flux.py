"""Tiny FLUX.1 pipelines for OminiControl and the reference adapters of ALGORITHM.md section 4, seeded and offline.

The transformer keeps FLUX.1's real block layout (19 double-stream and 38 single-stream blocks) at
tiny widths. XLabs' IP-Adapter is written in XLabs' own `ip_adapter.safetensors` format and loaded
with `pipe.load_ip_adapter(...)`; Kontext and Redux use diffusers' stock pipelines. Saved folders
look as `hf download` leaves them, so the CLI's real loading path can be tested offline.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxPriorReduxPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel, T5Config, T5EncoderModel

from .text import IMAGE_ENCODER_SIZE, CLIPImageProcessor, clip_tokenizer, image_encoder, t5_tokenizer, text_encoder

try:  # transformers 5: the Pillow-based processor, which needs no torchvision
    from transformers import SiglipImageProcessorPil as SiglipImageProcessor
except ImportError:  # transformers 4
    from transformers import SiglipImageProcessor

TEXT_DIMS = (32, 32)  # tiny (T5 d_model, CLIP hidden) = the transformer's joint_attention_dim, pooled_projection_dim
REAL_TEXT_DIMS = (4096, 768)  # what FluxPriorReduxPipeline hard-codes for its zero text without text encoders
SIGLIP_SIZE, SIGLIP_PATCH, SIGLIP_DIM = 32, 8, 16  # -> (32 / 8)^2 = 16 Redux tokens per image
XLABS_WEIGHTS = "ip_adapter.safetensors"


def flux1_transformer(seed: int = 0, double: int = 19, single: int = 38, guidance: bool = False,
                     text_dims: tuple[int, int] = TEXT_DIMS) -> FluxTransformer2DModel:
    """A FLUX.1 transformer with the real block layout (19 double, 38 single) and 2 heads of 16 channels."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_dims[0], pooled_projection_dim=text_dims[1],
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6),
    ).eval()


def _t5_encoder(vocab_size: int, seed: int, d_model: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()


def _flux_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, scaling_factor=0.36,
                         shift_factor=0.11, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2).eval()


def flux_components(seed: int = 0, double: int = 19, single: int = 38, guidance: bool = False,
                    text_dims: tuple[int, int] = TEXT_DIMS) -> dict:
    """The components of a FluxPipeline: tiny CLIP + T5 encoders, VAE and a real-layout transformer, no adapter."""
    clip, t5_tok = clip_tokenizer(), t5_tokenizer()
    return dict(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(seed + 4),
        text_encoder=text_encoder(clip, seed + 5, hidden=text_dims[1]), tokenizer=clip,
        text_encoder_2=_t5_encoder(len(t5_tok), seed + 3, text_dims[0]), tokenizer_2=t5_tok,
        transformer=flux1_transformer(seed, double, single, guidance, text_dims),
    )


def tiny_flux(seed: int = 0, guidance: bool = False, **sizes) -> FluxPipeline:
    """A tiny FLUX.1 pipeline (guidance=False: schnell-like, True: dev-like) with no adapter."""
    return FluxPipeline(**flux_components(seed, guidance=guidance, **sizes))


def tiny_ominicontrol(seed: int = 0) -> FluxPipeline:
    """A tiny FLUX.1-schnell-like pipeline (real 19 + 38 block layout) with a random OminiControl subject LoRA."""
    pipe = tiny_flux(seed)
    add_subject_lora(pipe.transformer)
    return pipe


def tiny_kontext(seed: int = 0, guidance: bool = True, **sizes) -> FluxKontextPipeline:
    """A tiny FLUX.1-Kontext pipeline (guidance-distilled, like the real one) on the same components."""
    return FluxKontextPipeline(**flux_components(seed, guidance=guidance, **sizes))


FLUX_LORA_TARGETS = ["x_embedder", "to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "norm1.linear", "norm.linear",
                     "proj_mlp", "proj_out"]


def add_subject_lora(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """A random OminiControl-style subject LoRA (adapter "subject"), drawn from the current torch seed."""
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=FLUX_LORA_TARGETS),
                            adapter_name="subject")
    return transformer


def flux_transformer(seed: int = 0, with_lora: bool = True, double: int = 2, single: int = 2) -> FluxTransformer2DModel:
    """A tiny FLUX transformer (16 input channels = 4 latent channels packed 2x2), with a random subject LoRA."""
    model = flux1_transformer(seed, double, single)
    return add_subject_lora(model) if with_lora else model


def tiny_flux_pipeline(seed: int = 0, t5_tok=None, with_lora: bool = True) -> FluxPipeline:
    """A tiny FLUX pipeline (CLIP + T5 encoders, VAE, 2+2 blocks) with an OminiControl-style random LoRA."""
    clip, t5_tok = clip_tokenizer(), t5_tok or t5_tokenizer()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_flux_vae(seed + 4),
                        text_encoder=text_encoder(clip, seed + 5), tokenizer=clip,
                        text_encoder_2=_t5_encoder(len(t5_tok), seed + 3, TEXT_DIMS[0]), tokenizer_2=t5_tok,
                        transformer=flux_transformer(seed, with_lora))


def tiny_reference_image(seed: int = 0, size: int = 32) -> Image.Image:
    """A seeded random RGB image to use as a reference."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def xlabs_ip_adapter_state_dict(transformer: FluxTransformer2DModel, image_embed_dim: int, seed: int = 0,
                                num_tokens: int = 4) -> dict[str, torch.Tensor]:
    """Random XLabs FLUX IP-Adapter weights for `transformer`, keyed as XLabs' `ip_adapter.safetensors`."""
    if num_tokens != 4:  # diffusers infers 16 tokens only from 65536 = 16 x 4096 projection rows, else 4
        raise ValueError(f"diffusers loads XLabs adapters with 4 image tokens at tiny widths, not {num_tokens}")
    g = torch.Generator().manual_seed(seed)
    cross, inner = transformer.config.joint_attention_dim, transformer.inner_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    state = {"ip_adapter_proj_model.proj.weight": rand(num_tokens * cross, image_embed_dim),
             "ip_adapter_proj_model.proj.bias": rand(num_tokens * cross),
             "ip_adapter_proj_model.norm.weight": 1 + 0.1 * rand(cross),
             "ip_adapter_proj_model.norm.bias": 0.1 * rand(cross)}
    for i in range(transformer.config.num_layers):
        for part in ("k", "v"):
            name = f"double_blocks.{i}.processor.ip_adapter_double_stream_{part}_proj"
            state |= {f"{name}.weight": rand(inner, cross), f"{name}.bias": rand(inner)}
    return state


def save_tiny_xlabs_ip_adapter(folder: Path, transformer: FluxTransformer2DModel, seed: int = 0) -> Path:
    """Write `folder/ip_adapter.safetensors` and a tiny CLIP image encoder in `folder/image_encoder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = image_encoder(seed + 3)
    state = xlabs_ip_adapter_state_dict(transformer, encoder.config.projection_dim, seed)
    save_file(state, str(folder / XLABS_WEIGHTS))
    encoder.save_pretrained(folder / "image_encoder")
    return folder


def load_tiny_xlabs_ip_adapter(pipe: FluxPipeline, folder: Path | None = None, seed: int = 0) -> Path:
    """Load a tiny XLabs adapter (written first if `folder` has none) exactly as users load the real one."""
    folder = Path(folder or tempfile.mkdtemp(prefix="conceptrol-xlabs-"))
    if not (folder / XLABS_WEIGHTS).exists():
        save_tiny_xlabs_ip_adapter(folder, pipe.transformer, seed)
    if pipe.feature_extractor is None:  # diffusers would build the torchvision-backed CLIPImageProcessor
        size = IMAGE_ENCODER_SIZE
        pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    pipe.load_ip_adapter(str(folder), weight_name=XLABS_WEIGHTS,
                         image_encoder_pretrained_model_name_or_path=str(folder / "image_encoder"),
                         image_encoder_dtype=torch.float32)  # diffusers' default is float16
    return folder


def _siglip(seed: int) -> SiglipVisionModel:
    torch.manual_seed(seed)
    config = SiglipVisionConfig(hidden_size=SIGLIP_DIM, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=2, image_size=SIGLIP_SIZE, patch_size=SIGLIP_PATCH)
    return SiglipVisionModel(config).eval()


def tiny_redux_prior(seed: int = 0, txt_in_features: int = TEXT_DIMS[0],
                     text_from: FluxPipeline | None = None) -> FluxPriorReduxPipeline:
    """A tiny FLUX.1-Redux prior (SigLIP + ReduxImageEncoder); text encoders only if shared from `text_from`."""
    if text_from is not None:
        txt_in_features = text_from.text_encoder_2.config.d_model
    torch.manual_seed(seed + 7)
    embedder = ReduxImageEncoder(redux_dim=SIGLIP_DIM, txt_in_features=txt_in_features).eval()
    texts = {} if text_from is None else {
        k: getattr(text_from, k) for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")}
    return FluxPriorReduxPipeline(
        image_encoder=_siglip(seed + 6), image_embedder=embedder,
        feature_extractor=SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}), **texts,
    )


def save_tiny_flux_folders(folder: Path, seed: int = 0) -> dict[str, Path]:
    """FLUX.1-dev-, Kontext-, XLabs IP-Adapter- and Redux-like folders, as `hf download` would leave them."""
    folder = Path(folder)
    paths = {name: folder / name for name in ("flux-dev", "flux-kontext", "xlabs-ip-adapter", "flux-redux")}
    dev = tiny_flux(seed, guidance=True)
    dev.save_pretrained(paths["flux-dev"])
    tiny_kontext(seed).save_pretrained(paths["flux-kontext"])
    save_tiny_xlabs_ip_adapter(paths["xlabs-ip-adapter"], dev.transformer, seed)
    tiny_redux_prior(seed).save_pretrained(paths["flux-redux"])
    return paths
