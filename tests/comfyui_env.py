"""ComfyUI and ComfyUI_IPAdapter_plus as libraries for the node pack's tests, and tiny random models to run them on.

The ComfyUI tree comes from CONCEPTROL_COMFYUI (a ComfyUI folder holding custom_nodes/ComfyUI_IPAdapter_plus);
`.ci/run` points it at ../shared/comfyui/ComfyUI. Without it the tests skip with SKIP_REASON. Both projects are
GPL-3.0 and only imported here, at test time; nothing of theirs is copied into conceptrol.

Importing ComfyUI changes process-wide state (sys.path, its argument namespace, loggers), so `load_comfyui` does it
once per process, appends ComfyUI's folders to the end of sys.path (its top-level `utils`, `app`, `tests` packages
never shadow anything else) and leaves the rest of the suite alone.

torchvision: ComfyUI (comfy.sd) and IPAdapterPlus.py import torchvision at module level, but no torchvision build
importable next to the CPU torch of this project's test environment exists. When `import torchvision` fails, the
placeholder of tests/torchvision_placeholder.py (`torchvision` with `transforms` and `transforms.v2`) is in sys.modules
while ComfyUI is imported; its every attribute access raises RuntimeError("torchvision placeholder: the code under
test reached torchvision ..."), so an exercised path that really needs torchvision fails loudly instead of silently.
The paths tested here never touch it. The server test starts ComfyUI's main.py with the same placeholder
(tests/comfyui_launch.py).
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import torch
from torchvision_placeholder import placeholder_modules, torchvision_imports

COMFY_ENV = "CONCEPTROL_COMFYUI"
SKIP_REASON = (
    f"ComfyUI node tests need ComfyUI: set {COMFY_ENV}=/path/to/ComfyUI (a ComfyUI folder with "
    "custom_nodes/ComfyUI_IPAdapter_plus, as .ci/run does with ../shared/comfyui/ComfyUI) to run them"
)
CONTEXT_DIM = 32  # the tiny models' text width
EMBED_DIM = 16  # the width of the random "CLIP vision" embeddings fed to IPAdapterEmbeds
SDXL_CLIP_WIDTHS = {"l": 768, "g": 1280}  # SDXL's two text encoders: their hidden states side by side are its context
SDXL_CONTEXT_DIM = sum(SDXL_CLIP_WIDTHS.values())  # 2048: IPAdapter_plus takes an adapter of this width for SDXL
SDXL_ADM_CHANNELS = SDXL_CLIP_WIDTHS["g"] + 6 * 256  # 2816: clip_g's pooled output and six size embeddings (`y`)


def comfy_root() -> Path | None:
    """The ComfyUI folder named by CONCEPTROL_COMFYUI, or None when unset or not a ComfyUI folder."""
    value = os.environ.get(COMFY_ENV)
    if not value:
        return None
    root = Path(value).expanduser().resolve()
    return root if (root / "comfy").is_dir() and (root / "custom_nodes" / "ComfyUI_IPAdapter_plus").is_dir() else None


def _torchvision_placeholder() -> dict[str, types.ModuleType]:
    """{} when torchvision imports; else the placeholder modules, to be in sys.modules while ComfyUI is imported."""
    if torchvision_imports():
        return {}
    import diffusers  # noqa: F401  (diffusers, like transformers, decides once whether torchvision exists)

    return placeholder_modules()


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


def fill_random(module: torch.nn.Module, seed: int, scale: float = 0.05, text_scale: float = 0.3,
                key_scale: float | None = None) -> None:
    """Seeded random weights for every parameter (comfy.ops layers are created uninitialised).

    Small weights keep activations tame (large ones make CPU kernels crawl); the cross-attention queries and keys
    get larger ones (`text_scale`; `key_scale` for the keys when given, e.g. for a wide text context) so that text
    attention, and so the concept mask, is far from uniform.
    """
    generator = torch.Generator().manual_seed(seed)
    norms = {f"{name}.weight" for name, layer in module.named_modules()
             if isinstance(layer, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
    with torch.no_grad():
        for name, parameter in sorted(module.named_parameters()):
            peaky = "attn2.to_q" in name or "attn2.to_k" in name
            size = (key_scale if key_scale is not None and "attn2.to_k" in name else text_scale) if peaky else scale
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * size)
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


SDXL_TINY_MODEL = SDXL_TINY_UNET | {  # what comfy.supported_models.SDXL runs: SDXL's text width and `y` input
    "context_dim": SDXL_CONTEXT_DIM, "adm_in_channels": SDXL_ADM_CHANNELS, "num_classes": "sequential",
}
# IPAdapter_plus's SDXL adapter layers in its order ("1", "3", ... "139"): input blocks 4, 5 (2 transformer blocks
# each) and 7, 8 (10 each), output blocks 0-2 (10 each) and 3-5 (2 each), the middle block (10); widths of the tiny model
SDXL_TINY_ADAPTER_WIDTHS = [64] * 4 + [128] * 20 + [128] * 30 + [64] * 6 + [128] * 10


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


def tiny_sdxl_model(seed: int = 10):
    """A ModelPatcher around a random SDXL-layout U-Net (comfy.supported_models.SDXL, so ComfyUI's SDXL model_base).

    SDXL's blocks and transformer depths (so the concept layer ("output", 1, 3) is the real one), its text width
    2048 and `y` width 2816, SDXL's 64 channels a head (1 head at 64 channels, 2 at 128); only the channels are tiny.
    """
    comfy = load_comfyui().comfy
    model = comfy.supported_models.SDXL(dict(SDXL_TINY_MODEL)).get_model({})
    # keys of the 2048-wide context at the scale the 32-wide tiny models get (q.k over d stays O(1) per unit)
    fill_random(model.diffusion_model, seed, key_scale=0.3 * (CONTEXT_DIM / SDXL_CONTEXT_DIM) ** 0.5)
    model.diffusion_model.eval()
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def tiny_sdxl_clip(seed: int = 11):
    """A ComfyUI SDXL CLIP: SDXL's tokenizer (a 'g' and an 'l' tokenization), two random 3-layer text models.

    The encoders have SDXL's widths (768 for clip_l, 1280 for clip_g, so the context is 2048 wide and clip_g's
    projected pooled output is 1280 wide, as `y` needs) and tiny depth; built like comfy.sdxl_clip.SDXLClipModel
    (penultimate hidden states, clip_g padding with 0), whose encode_token_weights joins them.
    """
    env = load_comfyui()
    sd1, sdxl = env.comfy.sd1_clip, env.comfy.sdxl_clip

    def text_config(width: int) -> dict:
        return {"hidden_size": width, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 3,
                "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                "projection_dim": width, "bos_token_id": 0, "eos_token_id": 49407, "pad_token_id": 1}

    class TinySDXLClipModel(sdxl.SDXLClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006 (ComfyUI's signature)
            torch.nn.Module.__init__(self)
            common = {"layer": "hidden", "layer_idx": -2, "device": device, "dtype": dtype, "layer_norm_hidden_state": False}
            self.clip_l = sd1.SDClipModel(**common, textmodel_json_config=text_config(SDXL_CLIP_WIDTHS["l"]),
                                          model_options={**model_options, "model_name": "clip_l"})
            self.clip_g = sd1.SDClipModel(**common, textmodel_json_config=text_config(SDXL_CLIP_WIDTHS["g"]),
                                          special_tokens={"start": 49406, "end": 49407, "pad": 0},
                                          return_projected_pooled=True, model_options={**model_options, "model_name": "clip_g"})
            self.dtypes = {dtype}

    target = env.comfy.supported_models_base.ClipTarget(sdxl.SDXLTokenizer, TinySDXLClipModel)
    clip = env.comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    fill_random(clip.cond_stage_model, seed, scale=0.02, text_scale=0.02)
    return clip


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


def random_ipadapter(seed: int = 2, tokens: int = 4, sdxl: bool = False) -> dict:
    """An IP-Adapter state dict in IPAdapter_plus's layout (plain ImageProjModel) for the tiny SD 1.5 or SDXL U-Net.

    IPAdapter_plus takes it for an SDXL adapter exactly when its image tokens are 2048 wide (`to_k_ip` input).
    """
    generator = torch.Generator().manual_seed(seed)
    if sdxl:
        widths, context = SDXL_TINY_ADAPTER_WIDTHS, SDXL_CONTEXT_DIM
    else:
        widths, context = [32, 32, 64, 64, 64, 64] + [64, 64, 64, 64, 64, 64, 32, 32, 32] + [64], CONTEXT_DIM

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    kv_scale = 0.3 * (CONTEXT_DIM / context) ** 0.5  # the same output scale at either width
    ip_adapter = {}
    for number, width in enumerate(widths):
        ip_adapter[f"{number * 2 + 1}.to_k_ip.weight"] = rand(width, context, scale=kv_scale)
        ip_adapter[f"{number * 2 + 1}.to_v_ip.weight"] = rand(width, context, scale=kv_scale)
    image_proj = {"proj.weight": rand(tokens * context, EMBED_DIM), "proj.bias": rand(tokens * context),
                  "norm.weight": 1 + rand(context), "norm.bias": rand(context)}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def apply_ipadapter(model, seed: int = 3, weight: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                    attn_mask: torch.Tensor | None = None, weight_type: str = "linear", sdxl: bool = False):
    """IPAdapterEmbeds (IPAdapter_plus's own node) with a random adapter and random image embeddings."""
    env = load_comfyui()
    generator = torch.Generator().manual_seed(seed)
    pos = torch.randn(1, EMBED_DIM, generator=generator)
    node = env.ipadapter.IPAdapterEmbeds()
    (patched,) = node.apply_ipadapter(model, random_ipadapter(seed, sdxl=sdxl), pos_embed=pos, weight=weight,
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
