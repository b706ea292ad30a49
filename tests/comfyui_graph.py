"""An API-format ComfyUI prompt run in library mode: every node called once, in dependency order, with no cache.

The reference for the server test: the same graph, the same node classes and the same model files, but none of the
server's machinery (validation, executor, output cache). Output nodes (SaveImage, PreviewImage) give back their images
instead of writing files.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import comfyui_env as env
import torch

OUTPUT_NODES = {"SaveImage", "PreviewImage"}


def node_classes() -> dict[str, type]:
    """The classes the example workflows use: ComfyUI's core nodes and String primitives, IPAdapter_plus, ours."""
    comfy = env.load_comfyui()
    from comfy_extras import nodes_primitive

    from conceptrol.comfyui import nodes as conceptrol_nodes

    classes = dict(comfy.nodes.NODE_CLASS_MAPPINGS) | dict(comfy.ipadapter.NODE_CLASS_MAPPINGS)
    classes |= {cls.define_schema().node_id: cls for cls in (nodes_primitive.String, nodes_primitive.StringMultiline)}
    return classes | conceptrol_nodes.NODE_CLASS_MAPPINGS


def run_graph(prompt: dict, classes: dict[str, type]) -> dict[str, tuple]:
    """Each node's outputs by node id; an output node's are its input images."""
    outputs: dict[str, tuple] = {}

    def run(node_id: str) -> tuple:
        if node_id not in outputs:
            node = prompt[node_id]
            inputs = {name: run(value[0])[value[1]] if _is_link(value) else value
                      for name, value in node["inputs"].items()}
            outputs[node_id] = _call(node["class_type"], classes[node["class_type"]], inputs)
        return outputs[node_id]

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        for node_id in prompt:
            run(node_id)
    return outputs


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _call(class_type: str, cls: type, inputs: dict) -> tuple:
    if class_type in OUTPUT_NODES:
        return (inputs["images"],)
    if hasattr(cls, "define_schema"):  # ComfyUI's newer node API (comfy_api io.ComfyNode)
        return cls.execute(**inputs).args
    return tuple(getattr(cls(), cls.FUNCTION)(**inputs))


@contextlib.contextmanager
def comfyui_folders(root: Path) -> Iterator[None]:
    """Library mode reads models and input images from the ComfyUI folder `root`, and loads the tiny CLIP vision model
    through the same test-only hook the server has (root/custom_nodes/conceptrol_stand_ins.py); undone after."""
    import comfy.clip_vision
    import folder_paths

    saved = copy.deepcopy(folder_paths.folder_names_and_paths), folder_paths.get_input_directory()
    stock_loader = comfy.clip_vision.load_clipvision_from_sd
    try:
        for name in ("checkpoints", "ipadapter", "clip_vision"):
            folder_paths.add_model_folder_path(name, str(root / "models" / name), is_default=True)
        folder_paths.set_input_directory(str(root / "input"))
        folder_paths.filename_list_cache.clear()
        hook = root / "custom_nodes" / "conceptrol_stand_ins.py"
        spec = importlib.util.spec_from_file_location("conceptrol_stand_ins", hook)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        yield
    finally:
        comfy.clip_vision.load_clipvision_from_sd = stock_loader
        folder_paths.folder_names_and_paths.clear()
        folder_paths.folder_names_and_paths.update(saved[0])
        folder_paths.set_input_directory(saved[1])
        folder_paths.filename_list_cache.clear()
