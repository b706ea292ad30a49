"""`conceptrol demo`: the whole pipeline end to end, offline, on a tiny randomly initialised SD model."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from .generate import GenerateSettings, generate, prepare_output_dir

DEMO_PROMPT = "a photo of a dog surfing a wave"
NOTE = """This folder was written by `conceptrol demo{model_flag}`.

The model is {model_text}, built in code with RANDOM weights. Nothing was downloaded, so the
pictures are noise-like: the demo shows that the whole path runs (concept located in the prompt, mask
read at the concept layer, adapter masked, images and mask overlays written), not image quality.

  reference.png                    the reference image given to the adapter
  global-seed{seed}-0.png              Conceptrol
  global-seed{seed}-0-mask0-dog.png    where the concept 'dog' was found, over the Conceptrol image
  none-seed{seed}-0.png                the plain adapter baseline ({baseline})

Prompt: "{prompt}"; {steps} steps; {width}x{height} pixels (non-square on purpose).
For real images, use `conceptrol generate` with real weights (see the README).
"""


def reference_picture(size: int = 64) -> Image.Image:
    """A synthetic 'subject': a brown blob with ears on a plain background."""
    image = Image.new("RGB", (size, size), (235, 230, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((size * 0.2, size * 0.3, size * 0.8, size * 0.9), fill=(140, 90, 40))
    draw.polygon([(size * 0.25, size * 0.35), (size * 0.3, size * 0.1), (size * 0.45, size * 0.3)], fill=(110, 70, 30))
    draw.polygon([(size * 0.55, size * 0.3), (size * 0.7, size * 0.1), (size * 0.75, size * 0.35)], fill=(110, 70, 30))
    return image


MODELS = {
    "sd15": ("a tiny Stable Diffusion 1.5-layout pipeline with a random IP-Adapter Plus checkpoint loaded "
             "through pipe.load_ip_adapter()", "vanilla IP-Adapter, scale 0.6, no warm-up"),
    "flux": ("a tiny FLUX pipeline (CLIP + T5 encoders, VAE, 2+2 transformer blocks) with a random "
             "OminiControl-style subject LoRA", "plain OminiControl"),
}


def run_offline_demo(out: Path, steps: int = 20, seed: int = 0, model: str = "sd15") -> list[Path]:
    """Generate with and without Conceptrol on a tiny random pipeline; returns the files written."""
    out = prepare_output_dir(out)
    reference = out / "reference.png"
    reference_picture().save(reference)
    width, height = 96, 64
    settings = GenerateSettings(
        prompt=DEMO_PROMPT, concept=("dog",), image=(reference,), steps=steps, seed=seed, size=(width, height),
        scale=1.0, start=0.2, out=out, save_masks=True, device="cpu", dtype="fp32", condition_size=32,
        concept_layer="transformer_blocks.1" if model == "flux" else None,  # the tiny FLUX has 2 double blocks
    )
    pipe = tiny_pipeline(model, seed)
    files = [reference, *generate(settings, pipe).files]
    baseline = replace(settings, masking="none", start=0.0, save_masks=False)
    files += generate(replace(baseline, scale=0.6) if model == "sd15" else baseline, pipe).files
    note = out / "NOTE.txt"
    model_text, baseline_text = MODELS[model]
    note.write_text(NOTE.format(seed=seed, prompt=DEMO_PROMPT, steps=steps, width=width, height=height,
                                model_text=model_text, baseline=baseline_text,
                                model_flag="" if model == "sd15" else f" --model {model}"), encoding="utf-8")
    return [*files, note]


def tiny_pipeline(model: str = "sd15", seed: int = 0):
    """The demo's tiny random pipeline with its adapter: SD 1.5 layout with IP-Adapter Plus, or FLUX with a LoRA."""
    from .tiny import load_tiny_ip_adapter, tiny_flux_pipeline, tiny_sd15_pipeline

    if model == "flux":
        return tiny_flux_pipeline(seed=seed)
    pipe = tiny_sd15_pipeline(seed=seed)
    with tempfile.TemporaryDirectory(prefix="conceptrol-demo-") as scratch:
        load_tiny_ip_adapter(pipe, "plus", seed=seed, folder=Path(scratch))
    return pipe
