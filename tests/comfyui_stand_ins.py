"""Test-only ComfyUI custom node: what this test environment lacks for ComfyUI's server and page, and nothing else.

tests/comfyui_files.py copies this file into a temporary ComfyUI's custom_nodes/ for the server test, with the tiny
CLIP vision model's config beside it (conceptrol_stand_ins.json). It is never part of the node pack.

- Tiny CLIP vision. comfy.clip_vision recognises CLIP vision files by their layer count (real ViT-L / ViT-H /
  ViT-bigG / SigLIP / DINOv2 sizes only) and returns None for any other; for a CLIP vision file it does not
  recognise, the loader here builds the tiny config instead. Every file ComfyUI recognises loads as before. The
  library-mode run of the same graph imports this same file (comfyui_graph.comfyui_folders).
- UpscaleModelLoader. ComfyUI's own (comfy_extras/nodes_upscale_model.py) needs spandrel, which needs torchvision,
  so it does not import here; ComfyUI's frontend 1.27.10 counts on that node existing (its model-to-node defaults)
  and, without it, fails to build the model-file widget of every CheckpointLoaderSimple in the page. A node of that
  name and inputs stands in, only where ComfyUI has none; running it raises.
"""

from __future__ import annotations

import functools
from pathlib import Path

import comfy.clip_vision
import folder_paths
import nodes

CONFIG = Path(__file__).with_suffix(".json")


def tiny_aware(stock):
    @functools.wraps(stock)
    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        model = stock(sd, prefix, convert_keys)
        if model is None and "vision_model.embeddings.patch_embedding.weight" in sd:
            model = comfy.clip_vision.ClipVisionModel(str(CONFIG))
            missing, unexpected = model.load_sd(sd)
            if missing or unexpected:
                raise RuntimeError(f"the tiny CLIP vision file does not fit {CONFIG}: missing {missing}, "
                                   f"unexpected {unexpected}")
        return model

    load_clipvision_from_sd.stock = stock
    return load_clipvision_from_sd


if not hasattr(comfy.clip_vision.load_clipvision_from_sd, "stock"):
    comfy.clip_vision.load_clipvision_from_sd = tiny_aware(comfy.clip_vision.load_clipvision_from_sd)


class UpscaleModelLoaderStandIn:
    """Stands in for ComfyUI's UpscaleModelLoader where spandrel cannot be imported (see the module docstring)."""

    RETURN_TYPES = ("UPSCALE_MODEL",)
    FUNCTION = "load_model"
    CATEGORY = "loaders"

    @classmethod
    def INPUT_TYPES(cls) -> dict:  # noqa: N802 (ComfyUI's name)
        return {"required": {"model_name": (folder_paths.get_filename_list("upscale_models"),)}}

    def load_model(self, model_name: str):
        raise RuntimeError("UpscaleModelLoader is a test stand-in here: spandrel (and torchvision) are not installed")


NODE_CLASS_MAPPINGS = {} if "UpscaleModelLoader" in nodes.NODE_CLASS_MAPPINGS else {
    "UpscaleModelLoader": UpscaleModelLoaderStandIn}
