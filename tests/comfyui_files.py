"""Tiny model files where a ComfyUI server looks for them, for the server test (tests/test_comfyui_server.py).

- models/checkpoints/: an SD 1.5 checkpoint that ComfyUI's own CheckpointLoaderSimple detects as SD 1.5. ComfyUI
  takes a U-Net for SD 1.5 only at SD 1.5's widths (320 channels, a 768-wide text context) and its SD 1.5 text encoder
  has a fixed config (CLIP-L: 12 layers, 768 wide), so only the depth can shrink: SD 1.5's blocks and transformer
  layout at one channel multiplier (320 at every level), the full-size CLIP-L text encoder, and TAESD as the VAE (a
  VAE layout ComfyUI reads from a checkpoint). Weights are seeded random, stored in fp16.
- models/clip_vision/: a 2-layer, 32-wide CLIP vision model. ComfyUI's CLIPVisionLoader knows only real sizes
  (ViT-L, ViT-H, ViT-bigG, SigLIP, DINOv2), so the test also installs custom_nodes/conceptrol_stand_ins.py
  (tests/comfyui_stand_ins.py): for a CLIP vision file ComfyUI does not recognise, it builds this tiny config.
- models/ipadapter/: a plain IP-Adapter (ImageProjModel) for that checkpoint, in IPAdapter_plus's safetensors layout.
- input/: reference images for LoadImage.
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import comfyui_env as env
import torch
from PIL import Image
from safetensors.torch import save_file

CHECKPOINT_UNET = env.SD15_TINY_UNET | {"model_channels": 320, "context_dim": 768, "channel_mult": [1, 1, 1, 1]}
TEXT_WIDTH = 768  # CLIP-L's hidden size: SD 1.5's text context
ADAPTER_TOKENS = 4  # image tokens of the plain IP-Adapter
CLIP_VISION_CONFIG = {  # comfy.clip_model.CLIPVisionModelProjection's config keys, at tiny sizes
    "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 224, "intermediate_size": 64, "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 32, "projection_dim": 16,
}
STAND_INS = Path(__file__).with_name("comfyui_stand_ins.py")


@dataclass(frozen=True)
class TinyFiles:
    """File names as ComfyUI's loader nodes take them (relative to their model folder)."""

    checkpoint: str = "tiny-sd15.safetensors"
    ipadapter: str = "tiny-ip-adapter_sd15.safetensors"
    clip_vision: str = "tiny-clip-vision.safetensors"


def kaiming_fill(module: torch.nn.Module, seed: int, gains: dict[str, float] | None = None) -> None:
    """Seeded weights of unit gain (std 1/sqrt(fan-in)), norms at 1, biases at 0; `gains` scales weights by name part.

    comfy.ops layers are created uninitialised. Unit gain keeps a full-width model's activations tame at any depth;
    larger gains on the cross-attention queries and keys make text attention, and so the concept mask, far from flat.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, layer in module.named_modules()
             if isinstance(layer, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            if name in norms:
                parameter.fill_(1.0)
            elif parameter.dim() < 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
            else:
                gain = next((g for part, g in (gains or {}).items() if part in name), 1.0)
                fan_in = math.prod(parameter.shape[1:])
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * gain / math.sqrt(fan_in))


def checkpoint_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """An SD 1.5 checkpoint's tensors (U-Net, CLIP-L text encoder, TAESD) as ComfyUI's CheckpointSave lays them out."""
    comfy = env.load_comfyui().comfy
    taesd = importlib.import_module("comfy.taesd.taesd")

    config = comfy.supported_models.SD15(dict(CHECKPOINT_UNET))
    model = config.get_model({})
    kaiming_fill(model.diffusion_model, seed, gains={"attn2.to_q": 4.0, "attn2.to_k": 4.0})
    text = comfy.sd1_clip.SD1ClipModel(dtype=torch.float32)
    kaiming_fill(text, seed + 1)
    vae = taesd.TAESD()
    kaiming_fill(vae, seed + 2, gains={"taesd_decoder.19": 3.0})  # its last conv: pictures around mid-grey, few
    vae.taesd_decoder[-1].bias.data.fill_(0.5)  # pixels clipped at 0 or 1
    return model.state_dict_for_saving(text.state_dict(), vae.state_dict())


def ipadapter_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A plain IP-Adapter for the checkpoint: one to_k_ip / to_v_ip pair per attn2 in IPAdapter_plus's order (16)."""
    generator = torch.Generator().manual_seed(seed)
    width = CHECKPOINT_UNET["model_channels"]  # every level's width at channel multiplier 1

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    embed = CLIP_VISION_CONFIG["projection_dim"]
    tensors = {"image_proj.proj.weight": rand(ADAPTER_TOKENS * TEXT_WIDTH, embed, scale=1 / math.sqrt(embed)),
               "image_proj.proj.bias": rand(ADAPTER_TOKENS * TEXT_WIDTH, scale=0.02),
               "image_proj.norm.weight": 1 + rand(TEXT_WIDTH, scale=0.02),
               "image_proj.norm.bias": rand(TEXT_WIDTH, scale=0.02)}
    for number in range(16):
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{number * 2 + 1}.{name}.weight"] = rand(width, TEXT_WIDTH,
                                                                         scale=1 / math.sqrt(TEXT_WIDTH))
    return tensors


def clip_vision_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    comfy = env.load_comfyui().comfy
    model = comfy.clip_model.CLIPVisionModelProjection(CLIP_VISION_CONFIG, torch.float32, "cpu",
                                                       comfy.ops.disable_weight_init)
    kaiming_fill(model, seed)
    return model.state_dict()


def reference_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random picture (an upsampled 4 x 4 noise grid), different for every seed."""
    grid = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    picture = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0]
    return Image.fromarray((picture.permute(1, 2, 0) * 255).round().byte().numpy())


def write_tiny_files(comfyui: Path, images: list[str], files: TinyFiles = TinyFiles()) -> TinyFiles:
    """Write every tiny file into the ComfyUI folder `comfyui` (its models/, input/ and custom_nodes/), and a
    reference picture under each name in `images` (input/)."""
    models = comfyui / "models"
    for folder in ("checkpoints", "ipadapter", "clip_vision"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    save_half(checkpoint_state_dict(), models / "checkpoints" / files.checkpoint)
    save_half(ipadapter_state_dict(), models / "ipadapter" / files.ipadapter)
    save_half(clip_vision_state_dict(), models / "clip_vision" / files.clip_vision)
    install_stand_ins(comfyui / "custom_nodes")
    (comfyui / "input").mkdir(exist_ok=True)
    for seed, name in enumerate(images):
        reference_image(seed).save(comfyui / "input" / name)
    return files


def install_stand_ins(custom_nodes: Path) -> Path:
    """The test-only custom node (the tiny CLIP vision config, what the test environment lacks), config beside it."""
    target = custom_nodes / "conceptrol_stand_ins.py"
    shutil.copyfile(STAND_INS, target)
    target.with_suffix(".json").write_text(json.dumps(CLIP_VISION_CONFIG, indent=1), encoding="utf-8")
    return target


def save_half(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Save as fp16 safetensors (half the bytes; ComfyUI casts to its own dtype when loading)."""
    save_file({name: tensor.detach().to(torch.float16).contiguous() for name, tensor in tensors.items()}, str(path))
