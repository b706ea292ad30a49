"""Tiny Stable Diffusion pipelines with seeded random weights, built offline (demo, tests, benchmark).

The U-Nets keep the real block topology of SD 1.5 and SDXL, so the real concept-layer names exist;
IP-Adapter checkpoints are written in the original `image_proj.*` / `ip_adapter.*` format and loaded
through `pipe.load_ip_adapter(...)`, exactly as users load the real ones.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

try:  # transformers 5: the Pillow-based processor, which needs no torchvision
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

IMAGE_ENCODER_SIZE = 32
ADAPTER_KINDS = ("base", "plus", "full-face")


def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    codes = {b: b for b in keep} | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(codes[b]) for b in range(256)]


def clip_tokenizer(merges: list[str] | None = None, folder: Path | None = None) -> CLIPTokenizer:
    """A CLIP tokenizer from BPE merges; with no merges, one that spells every word letter by letter."""
    merges = merges or []
    alphabet = byte_level_alphabet()
    vocab = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder or tempfile.mkdtemp(prefix="conceptrol-tok-"))
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _text_encoder(tokenizer: CLIPTokenizer, seed: int, with_projection: bool = False, hidden: int = 32):
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _image_encoder(seed: int) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=32, projection_dim=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_ENCODER_SIZE, patch_size=8,
    )
    return CLIPVisionModelWithProjection(config).eval()


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
        vae=_vae(seed + 1), text_encoder=_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        unet=sd15_unet(seed), scheduler=_scheduler(), safety_checker=None,
        feature_extractor=CLIPImageProcessor(size=IMAGE_ENCODER_SIZE, crop_size=IMAGE_ENCODER_SIZE),
        image_encoder=_image_encoder(seed + 3), requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, tokenizer: CLIPTokenizer | None = None, pipeline_class=StableDiffusionXLPipeline):
    """A tiny SDXL-layout pipeline with both text encoders and an image encoder, no adapter yet."""
    tokenizer = tokenizer or clip_tokenizer()
    return pipeline_class(
        vae=_vae(seed + 1), text_encoder=_text_encoder(tokenizer, seed + 2), tokenizer=tokenizer,
        text_encoder_2=_text_encoder(tokenizer, seed + 4, with_projection=True), tokenizer_2=tokenizer,
        unet=sdxl_unet(seed), scheduler=_scheduler(),
        feature_extractor=CLIPImageProcessor(size=IMAGE_ENCODER_SIZE, crop_size=IMAGE_ENCODER_SIZE),
        image_encoder=_image_encoder(seed + 3),
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


def t5_tokenizer(max_length: int = 512):
    """A T5-layout tokenizer (pad 0, eos 1, unk 2, no start token) that spells words letter by letter."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = list(string.ascii_lowercase + string.digits + ",.!?'-")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in alphabet] + [("▁" + c, -2.5) for c in alphabet]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   model_max_length=max_length)


FLUX_LORA_TARGETS = ["x_embedder", "to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "norm1.linear", "norm.linear",
                     "proj_mlp", "proj_out"]


def flux_transformer(seed: int = 0, with_lora: bool = True, double: int = 2, single: int = 2):
    """A tiny FLUX transformer (16 input channels = 4 latent channels packed 2x2), with a random subject LoRA."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ).eval()
    if with_lora:
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=FLUX_LORA_TARGETS),
                          adapter_name="subject")
    return model


def tiny_flux_pipeline(seed: int = 0, t5_tok=None, with_lora: bool = True):
    """A tiny FLUX pipeline (CLIP + T5 encoders, VAE, transformer) with an OminiControl-style random LoRA."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import T5Config, T5EncoderModel

    clip, t5_tok = clip_tokenizer(), t5_tok or t5_tokenizer()
    torch.manual_seed(seed + 3)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=8, scaling_factor=0.36,
                        shift_factor=0.11, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2).eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=_text_encoder(clip, seed + 5),
                        tokenizer=clip, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=flux_transformer(seed, with_lora))


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
    _image_encoder(seed + 3).save_pretrained(adapters / "models" / "image_encoder")
    return model, adapters
