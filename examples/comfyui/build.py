"""Writes the example ComfyUI workflows of this folder, each in ComfyUI's two formats, from one description.

    python examples/comfyui/build.py        # rewrites *.json here (tests/test_comfyui_server.py checks they match)

`NAME.json` is the UI format (drag it onto the ComfyUI page); `NAME_api.json` is the API format (POST it to `/prompt`
as {"prompt": ...}). Each graph: checkpoint -> IPAdapter Advanced (one per reference image, chained) -> Conceptrol ->
KSampler -> VAE Decode -> Save Image, and one Conceptrol Mask -> Preview Image per concept. One "Prompt" string node
feeds both the positive CLIPTextEncode and Conceptrol, so the two never drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).parent
NEGATIVE = "deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"  # the ViT-H image encoder IPAdapter_plus's README names

# Per node type: input sockets (name, type), outputs (name, type), and widget names in the order the ComfyUI
# frontend lists them (a seed's "control_after_generate" and LoadImage's "upload" are the frontend's own widgets).
NODE_TYPES: dict[str, tuple[list, list, list]] = {
    "CheckpointLoaderSimple": ([], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], ["ckpt_name"]),
    "CLIPVisionLoader": ([], [("CLIP_VISION", "CLIP_VISION")], ["clip_name"]),
    "IPAdapterModelLoader": ([], [("IPADAPTER", "IPADAPTER")], ["ipadapter_file"]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image", "upload"]),
    "IPAdapterAdvanced": ([("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"),
                           ("image_negative", "IMAGE"), ("attn_mask", "MASK"), ("clip_vision", "CLIP_VISION")],
                          [("MODEL", "MODEL")],
                          ["weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"]),
    "PrimitiveStringMultiline": ([], [("STRING", "STRING")], ["value"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "Conceptrol": ([("model", "MODEL"), ("clip", "CLIP")], [("MODEL", "MODEL")], ["prompt", "concepts", "masking"]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")], [("LATENT", "LATENT")],
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "ConceptrolMask": ([("model", "MODEL"), ("samples", "LATENT")], [("MASK", "MASK"), ("IMAGE", "IMAGE")],
                       ["concept"]),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "Note": ([], [], ["text"]),  # the frontend's own note: in the UI format only
}
FRONTEND_ONLY = {"Note"}
FRONTEND_WIDGETS = {"control_after_generate", "upload"}


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    size: tuple[int, int]
    widgets: dict = field(default_factory=dict)  # widget name -> value
    links: dict = field(default_factory=dict)  # input name -> (source node, output slot)
    title: str | None = None


@dataclass(frozen=True)
class Example:
    """One workflow's settings."""

    name: str
    checkpoint: str
    ipadapter: str
    prompt: str
    subjects: tuple[tuple[str, str], ...]  # (concept, reference image file in ComfyUI's input/)
    size: int
    weight: float  # IPAdapter weight (diffusers' ip_adapter_scale)
    cfg: float
    note: str
    steps: int = 30
    start_at: float = 0.2  # the paper's warm-up: IPAdapter (and so Conceptrol) from 20% of the steps
    seed: int = 0


EXAMPLES = [
    Example("sd15_one_subject", "v1-5-pruned-emaonly.safetensors", "ip-adapter-plus_sd15.safetensors",
            "a dog surfing a wave, sunny day", (("dog", "dog.png"),), 512, 1.5, 7.5,
            "SD 1.5 + IP-Adapter Plus, one subject (the paper's settings: weight 1.5, start 0.2, CFG 7.5)."),
    Example("sdxl_one_subject", "sd_xl_base_1.0.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors",
            "a dog surfing a wave, sunny day", (("dog", "dog.png"),), 1024, 1.0, 6.0,
            "SDXL + IP-Adapter Plus (ViT-H), one subject (the paper's settings: weight 1.0, start 0.2, CFG 6.0)."),
    Example("sd15_two_subjects", "v1-5-pruned-emaonly.safetensors", "ip-adapter-plus_sd15.safetensors",
            "a cat and a teddy bear in the snow", (("cat", "cat.png"), ("teddy bear", "teddy_bear.png")), 512, 1.0,
            7.5, "SD 1.5, two subjects: two IPAdapters, one concept each, in the order they are applied."),
]

HOW_TO = ("{note}\n\nPut your reference photos in ComfyUI's input/ folder (or click 'choose file to upload' on the "
          "Load Image nodes). Conceptrol comes after the last IPAdapter; its 'concepts' are words of the prompt, one "
          "per IPAdapter, comma-separated, in the order the IPAdapters are applied ({concepts}). Conceptrol Mask "
          "shows where each reference acts: the concept mask read in the last step.")


def graph(example: Example) -> list[Node]:
    """The example's nodes, with their links and widget values, laid out left to right in the order data flows."""
    concepts = ", ".join(concept for concept, _ in example.subjects)
    n = len(example.subjects)
    nodes = [
        Node(1, "CheckpointLoaderSimple", (40, 40), (315, 98), {"ckpt_name": example.checkpoint}),
        Node(2, "CLIPVisionLoader", (40, 180), (315, 58), {"clip_name": CLIP_VISION}),
        Node(3, "IPAdapterModelLoader", (40, 280), (315, 58), {"ipadapter_file": example.ipadapter}),
        Node(4, "Note", (400, 40 + 330 * n), (315, 300), {"text": HOW_TO.format(note=example.note, concepts=concepts)}),
    ]
    model = (1, 0)
    for i, (concept, image) in enumerate(example.subjects):
        loader, adapter = 10 + 2 * i, 11 + 2 * i
        nodes.append(Node(loader, "LoadImage", (40, 380 + 360 * i), (315, 320), {"image": image, "upload": "image"},
                          title=f"Reference: {concept}"))
        nodes.append(Node(adapter, "IPAdapterAdvanced", (400, 40 + 330 * i), (315, 278),
                          {"weight": example.weight, "weight_type": "linear", "combine_embeds": "concat",
                           "start_at": example.start_at, "end_at": 1.0, "embeds_scaling": "V only"},
                          {"model": model, "ipadapter": (3, 0), "image": (loader, 0), "clip_vision": (2, 0)},
                          title=f"IPAdapter Advanced ({concept})"))
        model = (adapter, 0)
    nodes += [
        Node(5, "PrimitiveStringMultiline", (760, 40), (380, 130), {"value": example.prompt}, title="Prompt"),
        Node(6, "CLIPTextEncode", (760, 220), (380, 90), {"text": ""}, {"clip": (1, 1), "text": (5, 0)},
             title="Positive"),
        Node(7, "CLIPTextEncode", (760, 360), (380, 130), {"text": NEGATIVE}, {"clip": (1, 1)}, title="Negative"),
        Node(9, "EmptyLatentImage", (760, 540), (315, 106),
             {"width": example.size, "height": example.size, "batch_size": 1}),
        Node(8, "Conceptrol", (1180, 40), (340, 210), {"prompt": "", "concepts": concepts, "masking": "global"},
             {"model": model, "clip": (1, 1), "prompt": (5, 0)}),
        Node(20, "KSampler", (1180, 300), (340, 262),
             {"seed": example.seed, "control_after_generate": "fixed", "steps": example.steps, "cfg": example.cfg,
              "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0},
             {"model": (8, 0), "positive": (6, 0), "negative": (7, 0), "latent_image": (9, 0)}),
        Node(21, "VAEDecode", (1580, 40), (210, 46), {}, {"samples": (20, 0), "vae": (1, 2)}),
        Node(22, "SaveImage", (1580, 130), (420, 460), {"filename_prefix": f"conceptrol_{example.name}"},
             {"images": (21, 0)}),
    ]
    for i, (concept, _) in enumerate(example.subjects):
        mask, preview = 30 + 2 * i, 31 + 2 * i
        x = 1180 + 420 * i
        nodes.append(Node(mask, "ConceptrolMask", (x, 640), (340, 82), {"concept": i},
                          {"model": (8, 0), "samples": (20, 0)}, title=f"Conceptrol Mask ({concept})"))
        nodes.append(Node(preview, "PreviewImage", (x, 770), (340, 360), {}, {"images": (mask, 1)},
                          title=f"Mask: {concept}"))
    return nodes


def api_format(nodes: list[Node]) -> dict:
    """The prompt the frontend queues: node id -> class_type, inputs (widget values and [source id, slot] links)."""
    prompt = {}
    for node in sorted(nodes, key=lambda node: node.id):
        if node.type in FRONTEND_ONLY:
            continue
        inputs = {name: value for name, value in node.widgets.items() if name not in FRONTEND_WIDGETS}
        inputs.update({name: [str(source), slot] for name, (source, slot) in node.links.items()})
        ordered = {name: inputs[name] for name in _input_order(node.type) if name in inputs}
        prompt[str(node.id)] = {"inputs": ordered, "class_type": node.type,
                                "_meta": {"title": node.title or node.type}}
    return prompt


def _input_order(node_type: str) -> list[str]:
    sockets, _, widgets = NODE_TYPES[node_type]
    return [name for name, _ in sockets] + [name for name in widgets if name not in {s for s, _ in sockets}]


def ui_format(nodes: list[Node]) -> dict:
    """The workflow the frontend saves (LiteGraph's serialization, version 0.4)."""
    links, by_source = [], {}
    for node in sorted(nodes, key=lambda node: node.id):
        sockets = _sockets(node)
        for name, (source, slot) in node.links.items():
            link = len(links) + 1
            links.append([link, source, slot, node.id, [s for s, _, _ in sockets].index(name),
                          NODE_TYPES[_type_of(nodes, source)][1][slot][1]])
            by_source.setdefault((source, slot), []).append(link)
    serialized = [_ui_node(node, links, by_source, order) for order, node in enumerate(_execution_order(nodes))]
    return {"last_node_id": max(node.id for node in nodes), "last_link_id": len(links),
            "nodes": sorted(serialized, key=lambda node: node["id"]), "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def _sockets(node: Node) -> list[tuple[str, str, bool]]:
    """The node's input slots: its sockets, then widgets fed by a link (name, type, is a widget)."""
    sockets, _, _ = NODE_TYPES[node.type]
    linked_widgets = [(name, "STRING", True) for name in node.widgets if name in node.links]
    return [(name, kind, False) for name, kind in sockets] + linked_widgets


def _ui_node(node: Node, links: list, by_source: dict, order: int) -> dict:
    incoming = {(link[3], link[4]): link[0] for link in links}
    inputs = []
    for slot, (name, kind, is_widget) in enumerate(_sockets(node)):
        entry = {"name": name, "type": kind, "link": incoming.get((node.id, slot))}
        if is_widget:
            entry["widget"] = {"name": name}
        inputs.append(entry)
    outputs = [{"name": name, "type": kind, "links": by_source.get((node.id, slot), []), "slot_index": slot}
               for slot, (name, kind) in enumerate(NODE_TYPES[node.type][1])]
    serialized = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                  "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                  "properties": {"Node name for S&R": node.type}, "widgets_values": list(node.widgets.values())}
    if node.title:
        serialized["title"] = node.title
    return serialized


def _type_of(nodes: list[Node], node_id: int) -> str:
    return next(node.type for node in nodes if node.id == node_id)


def _execution_order(nodes: list[Node]) -> list[Node]:
    """A topological order (sources first), as the frontend numbers `order`."""
    placed: list[Node] = []
    while len(placed) < len(nodes):
        ready = [node for node in nodes if node not in placed
                 and all(source in {p.id for p in placed} for source, _ in node.links.values())]
        placed.extend(sorted(ready, key=lambda node: node.id))
    return placed


def write_all(folder: Path = HERE) -> list[Path]:
    written = []
    for example in EXAMPLES:
        nodes = graph(example)
        for path, content in ((folder / f"{example.name}.json", ui_format(nodes)),
                              (folder / f"{example.name}_api.json", api_format(nodes))):
            path.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")
            written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all():
        print(path)
