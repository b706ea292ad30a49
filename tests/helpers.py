"""Offline builders and a naive reference of ALGORITHM.md section 1, shared by the tests."""

from __future__ import annotations

import gzip
import importlib.util
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from conceptrol.tiny import clip_tokenizer

# Tests run on the CPU; CONCEPTROL_TEST_DEVICE=cuda runs the pipeline tests on a GPU.
DEVICE = torch.device(os.environ.get("CONCEPTROL_TEST_DEVICE", "cpu"))
SD15_LAYER = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
SDXL_LAYER = "up_blocks.0.attentions.1.transformer_blocks.3.attn2"


def open_clip_bpe_path() -> Path:
    """CLIP's real BPE merges, shipped inside the open_clip_torch package (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("install open_clip_torch (pip install --no-deps open_clip_torch) for the real CLIP vocabulary")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def real_clip_tokenizer(folder: Path):
    """CLIP's own tokenizer, rebuilt offline from the BPE merges (the vocabulary follows from them)."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    return clip_tokenizer(merges, folder)


def reference_image(color=(200, 40, 40), size=(40, 40)) -> Image.Image:
    image = Image.new("RGB", size, color)
    image.paste((20, 20, 220), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


class ReferenceRun:
    """Per-call state of the naive reference: the global masks and the step."""

    def __init__(self, spans, masking="global", concept_layer=SD15_LAYER, start=0.0, end=1.0, scales=None):
        self.spans, self.masking, self.concept_layer = spans, masking, concept_layer
        self.start, self.end, self.scales = start, end, scales
        self.global_masks = {}  # (sample, concept) -> [h, w]
        self.step, self.total = 0, None
        self.latent_hw = None


class ReferenceProcessor:
    """ALGORITHM.md section 1 written plainly: explicit softmax, Python loops over samples and concepts."""

    def __init__(self, name, original, run: ReferenceRun):
        self.name, self.original, self.run = name, original, run

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        run = self.run
        text, ip_list = encoder_hidden_states
        residual = hidden_states
        x = hidden_states  # [R, N, C]: transformer blocks hand tokens, not feature maps
        rows, n = x.shape[0], x.shape[1]
        q = attn.head_to_batch_dim(attn.to_q(x))
        k = attn.head_to_batch_dim(attn.to_k(text))
        v = attn.head_to_batch_dim(attn.to_v(text))
        probs = attn.get_attention_scores(q, k, None)  # [R*H, N, T]
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        heads = attn.heads
        num_samples = len(run.spans)
        cfg = rows == 2 * num_samples
        grid = _grid(run.latent_hw, n)
        active = not (run.step / run.total < run.start or (run.step + 1) / run.total > run.end)
        concept = 0
        for a, states in enumerate(ip_list):
            for i in range(states.shape[1]):
                ip_k = attn.head_to_batch_dim(self.original.to_k_ip[a](states[:, i]))
                ip_v = attn.head_to_batch_dim(self.original.to_v_ip[a](states[:, i]))
                ip_out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, ip_k, None), ip_v))
                scale = self.original.scale[a] if run.scales is None else run.scales
                for s in range(num_samples):
                    mask = self._mask(probs, s, concept, heads, cfg, num_samples, grid)  # [N]
                    if not active:
                        continue
                    for r in ([s, num_samples + s] if cfg else [s]):
                        out[r] = out[r] + scale * mask[:, None] * ip_out[r]
                concept += 1
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _mask(self, probs, s, concept, heads, cfg, num_samples, grid):
        run = self.run
        if run.masking == "none":
            return torch.ones(probs.shape[1], device=probs.device)
        is_concept_layer = self.name == run.concept_layer
        key = (s, concept)
        if run.masking == "global" and not is_concept_layer and key in run.global_masks:
            stored = run.global_masks[key]
            return F.interpolate(stored[None, None], size=grid, mode="nearest").flatten()
        row = (num_samples + s) if cfg else s
        span = run.spans[s][concept]
        per_head = probs[row * heads : (row + 1) * heads, :, span].mean(dim=-1)  # [H, N]
        m = per_head.mean(dim=0)
        m = m / (m.max() + 1e-6)
        if is_concept_layer:
            run.global_masks[key] = m.view(grid)
        return m


def _grid(latent_hw, n):
    h, w = latent_hw
    while h * w > n:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def run_reference(pipe, run: ReferenceRun, **kwargs):
    """Call `pipe` with the naive reference processors in place of the IP-Adapter ones, then restore them."""
    saved = dict(pipe.unet.attn_processors)
    installed = {
        key: ReferenceProcessor(key.removesuffix(".processor"), proc, run) if hasattr(proc, "to_k_ip") else proc
        for key, proc in saved.items()
    }
    pipe.unet.set_attn_processor(dict(installed))

    def pre_hook(module, args, kw):
        sample = args[0] if args else kw["sample"]
        run.latent_hw = tuple(sample.shape[-2:])
        run.total = pipe._num_timesteps

    def on_step_end(p, step, timestep, callback_kwargs):
        run.step = step + 1
        return {}

    hook = pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        return pipe(callback_on_step_end=on_step_end, **kwargs)
    finally:
        hook.remove()
        pipe.unet.set_attn_processor(dict(saved))


def run_main(capsys, *args):
    """`conceptrol ARGS` in this process: (exit status, stdout lines, stderr lines); argparse's own exits included."""
    from conceptrol.cli import main

    try:
        code = main(list(args))
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out.strip().splitlines(), captured.err.strip().splitlines()


def tiny_flux_adapter(kind: str, double: int = 2, single: int = 2) -> tuple:
    """(pipe, apply_conceptrol's extra keywords) for "xlabs-ip", "kontext" or "redux": a shallow tiny FLUX.1."""
    import tempfile

    from conceptrol.tiny import load_tiny_xlabs_ip_adapter, tiny_flux, tiny_kontext, tiny_redux_prior

    extra = {}
    if kind == "xlabs-ip":
        pipe = tiny_flux(seed=1, double=double, single=single)
        load_tiny_xlabs_ip_adapter(pipe, Path(tempfile.mkdtemp()))
    elif kind == "kontext":
        pipe = tiny_kontext(seed=2, double=double, single=single)
    else:
        pipe, extra = tiny_flux(seed=3, double=double, single=single), {"redux": tiny_redux_prior(seed=3)}
    pipe.set_progress_bar_config(disable=True)
    return pipe, extra


def flux_adapter_kwargs(kind: str, steps: int) -> dict:
    """A call's keywords for `tiny_flux_adapter(kind)` at 32x48, with the adapter's reference image."""
    from conceptrol.tiny import tiny_reference_image

    kwargs = dict(num_inference_steps=steps, height=32, width=48, output_type="latent",
                  generator=torch.Generator().manual_seed(0), max_sequence_length=32)
    if kind == "xlabs-ip":
        return kwargs | {"ip_adapter_image": tiny_reference_image()}
    if kind == "kontext":
        return kwargs | dict(image=tiny_reference_image(), _auto_resize=False, max_area=32 * 48)
    return kwargs | dict(image=tiny_reference_image(), max_sequence_length=512)  # the Redux prior encodes at 512


def send_chat_answer(handler, answer: str, status: int = 200, headers: dict | None = None) -> None:
    """Reply from a fake judge (a BaseHTTPRequestHandler) as an OpenAI-compatible chat endpoint answers."""
    import json

    reply = json.dumps({"choices": [{"message": {"content": answer}}]}).encode()
    handler.send_response(status)
    for key, value in (headers or {}).items():
        handler.send_header(key, value)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(reply)))
    handler.end_headers()
    handler.wfile.write(reply)


def cli(capsys, *args):
    """`conceptrol ARGS` in this process: (exit status, stderr lines)."""
    code, _, err = run_main(capsys, *args)
    return code, err


def dog_and_hat(folder: Path) -> tuple[Path, Path]:
    """Two reference files of different sizes in `folder`: the demo's dog (64 px) and its wave as a 'hat' (80 px)."""
    from conceptrol.app.offline_demo import reference_picture, wave_picture

    reference_picture(64).save(folder / "dog.png")
    wave_picture(80).save(folder / "hat.png")
    return folder / "dog.png", folder / "hat.png"


def tiny_flux_with_two_xlabs_adapters(folder: Path):
    """A tiny FLUX.1 pipeline with two random XLabs IP-Adapters loaded at once by `pipe.load_ip_adapter` (saved in
    `folder`), sharing the first one's image encoder."""
    from conceptrol.tiny import XLABS_WEIGHTS, load_tiny_xlabs_ip_adapter, save_tiny_xlabs_ip_adapter, tiny_flux

    pipe = tiny_flux(seed=4)
    pipe.set_progress_bar_config(disable=True)
    folders = [save_tiny_xlabs_ip_adapter(folder / name, pipe.transformer, seed=seed) for name, seed in (("a", 1), ("b", 2))]
    load_tiny_xlabs_ip_adapter(pipe, folders[0])  # registers the image encoder and feature extractor
    pipe.unload_ip_adapter()
    pipe.load_ip_adapter([str(f) for f in folders], weight_name=[XLABS_WEIGHTS] * 2,
                         image_encoder_pretrained_model_name_or_path=str(folders[0] / "image_encoder"),
                         image_encoder_dtype=torch.float32)
    return pipe
