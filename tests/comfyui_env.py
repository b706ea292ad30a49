"""ComfyUI and ComfyUI_IPAdapter_plus as libraries for the node pack's tests, and tiny random models to run them on.

The ComfyUI tree comes from CONCEPTROL_COMFYUI (a ComfyUI folder holding custom_nodes/ComfyUI_IPAdapter_plus);
`.ci/run` points it at ../shared/comfyui/ComfyUI. Without it the tests skip with SKIP_REASON. Both projects are
GPL-3.0 and only imported here, at test time; nothing of theirs is copied into conceptrol.

Importing ComfyUI changes process-wide state (sys.path, its argument namespace, loggers), so `load_comfyui` does it
once per process, appends ComfyUI's folders to the end of sys.path (its top-level `utils`, `app`, `tests` packages
never shadow anything else) and leaves the rest of the suite alone.

torchvision: ComfyUI (comfy.sd) and IPAdapterPlus.py import torchvision at module level, but no torchvision build
importable next to the CPU torch of this project's test environment exists. When `import torchvision` fails, a
placeholder `torchvision` (with `transforms` and `transforms.v2`) is put into sys.modules whose every attribute
access raises RuntimeError("torchvision placeholder: the code under test reached torchvision ..."), so an exercised
path that really needs torchvision fails loudly instead of silently. The paths tested here (embeds in, no CLIP vision
model) never touch it.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import torch

COMFY_ENV = "CONCEPTROL_COMFYUI"
SKIP_REASON = (
    f"ComfyUI node tests need ComfyUI: set {COMFY_ENV}=/path/to/ComfyUI (a ComfyUI folder with "
    "custom_nodes/ComfyUI_IPAdapter_plus, as .ci/run does with ../shared/comfyui/ComfyUI) to run them"
)
CONTEXT_DIM = 32  # the tiny models' text width
EMBED_DIM = 16  # the width of the random "CLIP vision" embeddings fed to IPAdapterEmbeds


def comfy_root() -> Path | None:
    """The ComfyUI folder named by CONCEPTROL_COMFYUI, or None when unset or not a ComfyUI folder."""
    value = os.environ.get(COMFY_ENV)
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    return root if (root / "comfy").is_dir() and (root / "custom_nodes" / "ComfyUI_IPAdapter_plus").is_dir() else None


class _TorchvisionPlaceholder(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"torchvision placeholder: the code under test reached torchvision ({self.__name__}.{name}); "
                           "install a torchvision build that matches torch to run this path")


PLACEHOLDER_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2")


def _torchvision_placeholder() -> dict[str, types.ModuleType]:
    """{} when torchvision imports; else the placeholder modules, to be in sys.modules while ComfyUI is imported."""
    try:
        import torchvision  # noqa: F401
        return {}
    except Exception:  # missing, or a build for another torch (e.g. 'operator torchvision::nms does not exist')
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    # transformers and diffusers decide once (cached) whether torchvision exists: let them see that it does not
    import diffusers  # noqa: F401
    from transformers.utils import import_utils

    import_utils.is_torchvision_available()
    root, transforms, v2 = (_TorchvisionPlaceholder(name) for name in PLACEHOLDER_NAMES)
    object.__setattr__(root, "transforms", transforms)
    object.__setattr__(transforms, "v2", v2)
    return dict(zip(PLACEHOLDER_NAMES, (root, transforms, v2)))


@functools.cache
def load_comfyui() -> types.SimpleNamespace:
    """ComfyUI's modules and IPAdapter_plus, imported once per process on the CPU."""
    root = comfy_root()
    if root is None:
        raise RuntimeError(SKIP_REASON)
    placeholder = _torchvision_placeholder()
    sys.modules.update(placeholder)
    for folder in (root, root / "custom_nodes"):
        if str(folder) not in sys.path:
            sys.path.append(str(folder))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    try:
        _import_comfyui()
    finally:
        for name in placeholder:  # the imported modules keep their reference; nothing imported later finds it
            sys.modules.pop(name, None)
    import comfy
    import nodes
    from ComfyUI_IPAdapter_plus import IPAdapterPlus

    return types.SimpleNamespace(root=root, comfy=comfy, nodes=nodes, ipadapter=IPAdapterPlus)


def _import_comfyui() -> None:
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher
    import comfy.samplers
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils  # noqa: F401 (imported for the tests that use it)
    import nodes  # noqa: F401
    from ComfyUI_IPAdapter_plus import IPAdapterPlus  # noqa: F401


def fill_random(module: torch.nn.Module, seed: int, scale: float = 0.05, text_scale: float = 0.3) -> None:
    """Seeded random weights for every parameter (comfy.ops layers are created uninitialised).

    Small weights keep activations tame (large ones make CPU kernels crawl); the cross-attention queries and keys
    get larger ones so that text attention, and so the concept mask, is far from uniform.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, layer in module.named_modules()
             if isinstance(layer, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            peaky = "attn2.to_q" in name or "attn2.to_k" in name
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * (text_scale if peaky else scale))
            if name in norms:  # normalised features keep unit scale
                parameter.add_(1.0)


SD15_TINY_UNET = {  # SD 1.5's block topology (so ("output", 3) exists) at tiny widths
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "channel_mult": [1, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "context_dim": CONTEXT_DIM,
    "use_linear_in_transformer": False, "adm_in_channels": None, "use_temporal_attention": False,
    "use_temporal_resblock": False, "legacy": False, "use_spatial_transformer": True, "use_checkpoint": False,
}

SDXL_TINY_UNET = SD15_TINY_UNET | {  # SDXL's block topology and transformer depths (10 at the deepest level)
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "transformer_depth_middle": 10, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_linear_in_transformer": True,
}


def tiny_sd15_model(seed: int = 0, heads: int = 2):
    """A ModelPatcher around a random SD 1.5-layout U-Net (comfy.supported_models.SD15)."""
    comfy = load_comfyui().comfy
    config = comfy.supported_models.SD15(dict(SD15_TINY_UNET))
    config.unet_config.update(num_heads=heads, num_head_channels=-1)  # SD15 sets 8 heads when it is built
    model = config.get_model({})
    fill_random(model.diffusion_model, seed)
    model.diffusion_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_clip(seed: int = 1):
    """A ComfyUI SD1 CLIP: the real CLIP tokenizer shipped in ComfyUI's tree, a 2-layer random text model."""
    env = load_comfyui()
    sd1 = env.comfy.sd1_clip
    text_config = {"hidden_size": CONTEXT_DIM, "intermediate_size": 64, "num_attention_heads": 2,
                   "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408,
                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": CONTEXT_DIM,
                   "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}
    clip_model = functools.partial(sd1.SDClipModel, textmodel_json_config=text_config, return_projected_pooled=False)
    target = env.comfy.supported_models_base.ClipTarget(sd1.SD1Tokenizer,
                                                        functools.partial(sd1.SD1ClipModel, clip_model=clip_model))
    clip = env.comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    fill_random(clip.cond_stage_model, seed, scale=0.1, text_scale=0.1)
    return clip


def random_ipadapter(seed: int = 2, tokens: int = 4) -> dict:
    """An IP-Adapter state dict in IPAdapter_plus's layout (plain ImageProjModel) for the tiny SD 1.5 U-Net."""
    generator = torch.Generator().manual_seed(seed)
    widths = [32, 32, 64, 64, 64, 64] + [64, 64, 64, 64, 64, 64, 32, 32, 32] + [64]  # input, output, middle layers

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    ip_adapter = {}
    for number, width in enumerate(widths):
        ip_adapter[f"{number * 2 + 1}.to_k_ip.weight"] = rand(width, CONTEXT_DIM)
        ip_adapter[f"{number * 2 + 1}.to_v_ip.weight"] = rand(width, CONTEXT_DIM)
    image_proj = {"proj.weight": rand(tokens * CONTEXT_DIM, EMBED_DIM), "proj.bias": rand(tokens * CONTEXT_DIM),
                  "norm.weight": 1 + rand(CONTEXT_DIM), "norm.bias": rand(CONTEXT_DIM)}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def apply_ipadapter(model, seed: int = 3, weight: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                    attn_mask: torch.Tensor | None = None, weight_type: str = "linear"):
    """IPAdapterEmbeds (IPAdapter_plus's own node) with a random adapter and random image embeddings."""
    env = load_comfyui()
    generator = torch.Generator().manual_seed(seed)
    pos = torch.randn(1, EMBED_DIM, generator=generator)
    node = env.ipadapter.IPAdapterEmbeds()
    (patched,) = node.apply_ipadapter(model, random_ipadapter(seed), pos_embed=pos, weight=weight,
                                      weight_type=weight_type, start_at=start_at, end_at=end_at,
                                      neg_embed=torch.zeros_like(pos), attn_mask=attn_mask)[:1]
    return patched


def encode(clip, text: str) -> list:
    """CONDITIONING of `text` through ComfyUI's CLIPTextEncode node."""
    return load_comfyui().nodes.CLIPTextEncode().encode(clip, text)[0]


def ksample(model, positive, negative, seed: int = 0, steps: int = 3, cfg: float = 5.0, size: int = 128,
            batch: int = 1) -> torch.Tensor:
    """nodes.KSampler on an empty latent of size x size pixels: the denoised latent."""
    env = load_comfyui()
    latent = env.nodes.EmptyLatentImage().generate(size, size, batch)[0]
    (out,) = env.nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", positive, negative, latent)
    return out["samples"]
