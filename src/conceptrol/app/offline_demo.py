"""`conceptrol demo`: the whole pipeline end to end, offline, on a tiny randomly initialised SD model."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from ..core.files import free_suffix, with_suffix, write_new_text
from .generate import GenerateSettings, generate
from .loading import tiny_pipeline
from .outputs import prepare_output_dir, write_new_png
from .settings import tiny_profile

DEMO_PROMPT = "a photo of a dog surfing a wave"
NOTE = """This folder was written by `conceptrol demo{model_flag}`.

The model is {model_text}, built in code with RANDOM weights. Nothing was downloaded, so the
pictures are noise-like: the demo shows that the whole path runs (concept located in the prompt, mask
read at the concept layer, adapter masked, images and mask overlays written), not image quality.

{files}

Prompt: "{prompt}"; {steps} steps; {width}x{height} pixels (non-square on purpose).
Each PNG carries its settings in a text chunk, and each image has a .json file beside it.
Running the demo again into this folder adds files with a -2, -3, ... suffix; nothing is overwritten.
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


def wave_picture(size: int = 64) -> Image.Image:
    """A synthetic second 'subject': blue and white bands of a wave."""
    image = Image.new("RGB", (size, size), (200, 225, 240))
    draw = ImageDraw.Draw(image)
    for band in range(0, size, max(size // 6, 1)):
        draw.arc((-size * 0.2, band - size * 0.3, size * 1.2, band + size * 0.3), 0, 180, fill=(30, 90, 170), width=3)
    return image


FLUX1 = "a tiny FLUX.1 pipeline (CLIP + T5 encoders, VAE, FLUX.1's 19 + 38 transformer blocks at tiny width)"
MODELS = {  # model -> (what the demo runs, the baseline it compares with)
    "sd15": ("a tiny Stable Diffusion 1.5-layout pipeline with a random IP-Adapter Plus checkpoint loaded "
             "through pipe.load_ip_adapter()", "vanilla IP-Adapter, scale 0.6, no warm-up"),
    "flux": (f"{FLUX1} with a random OminiControl-style subject LoRA", "plain OminiControl"),
    "flux-ip": (f"{FLUX1} with a random IP-Adapter in XLabs' file format loaded through pipe.load_ip_adapter()",
                "the stock XLabs IP-Adapter"),
    "flux-kontext": (f"{FLUX1} as a FluxKontextPipeline", "stock FLUX.1 Kontext"),
    "flux-redux": (f"{FLUX1} with a random FluxPriorReduxPipeline (SigLIP-style encoder + Redux embedder)",
                   "stock FLUX.1 Redux"),
    "flux2": ("a tiny FLUX.2 [klein] pipeline (a Qwen3 text encoder, FLUX.2's 8 + 48 transformer blocks at tiny "
              "width) given two references, the dog and the wave, each confined to its own word",
              "stock FLUX.2 [klein], both references blended"),
    "qwen-edit": ("a tiny Qwen-Image-Edit-Plus pipeline (a Qwen2.5-VL text encoder, 60 transformer blocks at tiny "
                  "width) given two references, the dog and the wave, each confined to its own word",
                  "stock Qwen-Image-Edit-Plus, both references blended"),
}
MULTI_REFERENCE_DEMOS = ("flux2", "qwen-edit")  # two references, two concepts
TINY_MODELS = tuple(MODELS)


def run_offline_demo(out: Path, steps: int = 20, seed: int = 0, model: str = "sd15") -> list[Path]:
    """Generate with and without Conceptrol on a tiny random pipeline; returns the files written (none overwritten)."""
    out = prepare_output_dir(out)
    suffix = free_suffix(out, ["reference.png", "reference-wave.png", "NOTE.txt"])
    reference = write_new_png(reference_picture(), out / with_suffix("reference.png", suffix))
    references, concepts = (reference,), ("dog",)
    if model in MULTI_REFERENCE_DEMOS:
        wave = write_new_png(wave_picture(), out / with_suffix("reference-wave.png", suffix))
        references, concepts = (reference, wave), ("dog", "wave")
    width, height = (768, 512) if model == "qwen-edit" else (96, 64)  # tiny Qwen-Image's VAE is 64x (real: 8x)
    settings = GenerateSettings(
        prompt=DEMO_PROMPT, concept=concepts, image=references, steps=steps, seed=seed, size=(width, height),
        scale=1.0, start=0.0 if model in MULTI_REFERENCE_DEMOS else 0.2, out=out, save_masks=True, device="cpu",
        dtype="fp32", model=f"tiny-{model}",
        condition_size=32 if model in ("flux", "flux-kontext") else None,  # the reference at the tiny models' scale
    )
    pipe = tiny_pipeline(tiny_profile(f"tiny-{model}"), seed)
    ours = generate(settings, pipe).files
    baseline = settings.replace(masking="none", start=0.0, save_masks=False)
    theirs = generate(baseline.replace(scale=0.6) if model == "sd15" else baseline, pipe).files
    model_text, baseline_text = MODELS[model]
    listing = [*[(path, f"the reference image of '{concept}'") for path, concept in zip(references, concepts)],
               (ours[0], "Conceptrol"),
               *[(path, f"where the concept '{concept}' was found, over the Conceptrol image")
                 for path, concept in zip(ours[2:], concepts)],
               (theirs[0], f"the plain adapter baseline ({baseline_text})")]
    files = "\n".join(f"  {path.name:<36} {text}" for path, text in listing)
    note = write_new_text(NOTE.format(prompt=DEMO_PROMPT, steps=steps, width=width, height=height, files=files,
                                      model_text=model_text, model_flag="" if model == "sd15" else f" --model {model}"),
                          out / with_suffix("NOTE.txt", suffix))
    return [*references, *ours, *theirs, note]
