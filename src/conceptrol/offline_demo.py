"""`conceptrol demo`: the whole pipeline end to end, offline, on a tiny randomly initialised SD model."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from .generate import GenerateSettings, generate, prepare_output_dir

DEMO_PROMPT = "a photo of a dog surfing a wave"
NOTE = """This folder was written by `conceptrol demo`.

The model is a tiny Stable Diffusion 1.5-layout pipeline with RANDOM weights, built in code, with a
random IP-Adapter Plus checkpoint loaded through pipe.load_ip_adapter(). Nothing was downloaded, so the
pictures are noise-like: the demo shows that the whole path runs (concept located in the prompt, mask
read at the concept layer, adapter masked, images and mask overlays written), not image quality.

  reference.png                    the reference image given to the adapter
  global-seed{seed}-0.png              Conceptrol (global masking, scale 1.0, warm-up start 0.2)
  global-seed{seed}-0-mask0-dog.png    where the concept 'dog' was found, over the Conceptrol image
  none-seed{seed}-0.png                vanilla IP-Adapter baseline (scale 0.6, no warm-up)

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


def run_offline_demo(out: Path, steps: int = 20, seed: int = 0) -> list[Path]:
    """Generate with and without Conceptrol on the tiny random pipeline; returns the files written."""
    from .tiny import load_tiny_ip_adapter, tiny_sd15_pipeline

    out = prepare_output_dir(out)
    pipe = tiny_sd15_pipeline(seed=seed)
    with tempfile.TemporaryDirectory(prefix="conceptrol-demo-") as scratch:
        load_tiny_ip_adapter(pipe, "plus", seed=seed, folder=Path(scratch))
    reference = out / "reference.png"
    reference_picture().save(reference)
    width, height = 96, 64
    settings = GenerateSettings(
        prompt=DEMO_PROMPT, concept=("dog",), image=(reference,), steps=steps, seed=seed, size=(width, height),
        scale=1.0, start=0.2, out=out, save_masks=True, device="cpu", dtype="fp32",
    )
    files = [reference, *generate(settings, pipe).files]
    files += generate(replace(settings, masking="none", scale=0.6, start=0.0, save_masks=False), pipe).files
    note = out / "NOTE.txt"
    note.write_text(NOTE.format(seed=seed, prompt=DEMO_PROMPT, steps=steps, width=width, height=height), encoding="utf-8")
    return [*files, note]
