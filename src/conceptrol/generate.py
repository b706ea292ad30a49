"""One generation from settings to files: the library function behind `conceptrol generate` and the demo."""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .concepts import Concept
from .config import ConceptrolConfig
from .errors import ConceptrolError
from .images import load_reference_image
from .flux_handle import is_flux_pipeline
from .install import apply_conceptrol, detect_architecture

NEGATIVE_PROMPT = "deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality"
# The paper's demo settings (ALGORITHM.md): scale, warm-up start, steps, classifier-free guidance.
PAPER_DEMO = {
    "sd15": dict(scale=1.5, start=0.2, steps=50, guidance=7.5),
    "sdxl": dict(scale=1.0, start=0.2, steps=50, guidance=6.0),
    # FLUX: the library's defaults (c = 1, window [0, 1]); 8 steps as OminiControl runs FLUX.1-schnell.
    "flux": dict(scale=1.0, start=0.0, steps=8, guidance=3.5),
}


@dataclass(frozen=True)
class GenerateSettings:
    """What `conceptrol generate` does; None fields take the paper's demo value for the architecture."""

    prompt: str
    concept: tuple[str | Concept, ...]  # one concept per reference image (a word, or a Concept for a repeat)
    image: tuple[Path, ...]  # reference image files
    model: str = "sd15"  # preset (sd15, sdxl, flux, flux-dev), hub id or local folder
    adapter: str | None = None  # adapter variant (loading.ADAPTERS); None = plus (IP-Adapter) or subject (FLUX)
    adapter_repo: str | None = None  # hub id or local copy of h94/IP-Adapter or Yuanshi/OminiControl
    masking: str = "global"  # global, local, or none (vanilla IP-Adapter / plain OminiControl)
    concept_layer: str | None = None  # None = the architecture's preset layer (block for FLUX)
    scale: float | None = None
    start: float | None = None
    end: float = 1.0
    steps: int | None = None
    guidance: float | None = None
    negative_prompt: str = NEGATIVE_PROMPT
    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height); None = the model's default (512x512 for FLUX)
    condition_size: int = 512  # FLUX only: the reference's square size (the LoRA's resolution)
    num_images: int = 1
    device: str = "auto"
    dtype: str = "auto"
    out: Path = Path("outputs")
    save_masks: bool = False

    def __post_init__(self) -> None:
        if len(self.concept) != len(self.image):
            raise ConceptrolError(
                f"got {len(self.concept)} concept(s) for {len(self.image)} reference image(s); "
                "pass one --concept per --image, in the same order"
            )
        if self.steps is not None and self.steps < 1:
            raise ConceptrolError(f"steps must be at least 1, got {self.steps}")
        if self.num_images < 1:
            raise ConceptrolError(f"num_images must be at least 1, got {self.num_images}")
        if self.size is not None and any(s < 8 or s % 8 for s in self.size):
            raise ConceptrolError(f"size must be WIDTHxHEIGHT in multiples of 8, got {self.size}")


@dataclass
class GenerateResult:
    images: list[Image.Image]
    masks: Any  # ConceptMasks of the call, or None with masking none
    files: list[Path] = field(default_factory=list)


def prepare_output_dir(out: Path) -> Path:
    """Create the output folder and prove it is writable, before any model is loaded."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConceptrolError(f"cannot write to output folder {out} ({error.strerror or error}); pass a writable --out") from None
    return out


def generate(settings: GenerateSettings, pipe: Any = None) -> GenerateResult:
    """Generate with Conceptrol and save images (and mask overlays) into `settings.out`."""
    out = prepare_output_dir(settings.out)
    references = [load_reference_image(path) for path in settings.image]
    result = run_conceptrol(pipe if pipe is not None else pipeline_for(settings), settings, references)
    result.files = save_result(result, settings, out)
    return result


def pipeline_for(settings: GenerateSettings, flags: dict[str, str] | None = None) -> Any:
    """The pipeline and adapter the settings name, on their device and dtype (`flags`: see load_pipeline)."""
    from .loading import load_pipeline, pick_device, pick_dtype

    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device, settings.model)
    return load_pipeline(settings.model, settings.adapter, settings.adapter_repo, device, dtype, flags)


def run_conceptrol(pipe: Any, settings: GenerateSettings, references: list[Image.Image],
                   on_step: Callable[[int, int], None] | None = None) -> GenerateResult:
    """Call `pipe` under Conceptrol with the settings, paper defaults filled in; the pipeline is left as found.

    `on_step(done, total)` is called after every denoising step (for progress bars).
    """
    flux = is_flux_pipeline(pipe)
    demo = PAPER_DEMO["flux" if flux else detect_architecture(pipe.unet)]
    start = demo["start"] if settings.start is None else settings.start
    config = ConceptrolConfig(masking=settings.masking, start=start, end=settings.end,
                              concept_layer=settings.concept_layer,
                              scale=demo["scale"] if settings.scale is None else settings.scale)
    common = dict(num_inference_steps=settings.steps or demo["steps"], num_images_per_prompt=settings.num_images,
                  guidance_scale=demo["guidance"] if settings.guidance is None else settings.guidance,
                  generator=torch.Generator("cpu").manual_seed(settings.seed))
    if on_step is not None:
        common["callback_on_step_end"] = _step_reporter(on_step, common["num_inference_steps"])
    handle = apply_conceptrol(pipe, config)
    try:
        if flux:
            width, height = settings.size or (512, 512)
            output = handle(settings.prompt, concepts=list(settings.concept), image=references[0], width=width,
                            height=height, condition_size=settings.condition_size, **common)
        else:
            width, height = settings.size or (None, None)
            output = handle(prompt=settings.prompt, concepts=list(settings.concept), ip_adapter_image=[references],
                            negative_prompt=settings.negative_prompt, width=width, height=height, **common)
    finally:
        handle.remove()
    return GenerateResult(images=list(output.images), masks=handle.masks)


def _step_reporter(on_step: Callable[[int, int], None], total: int) -> Callable[..., dict]:
    """A diffusers `callback_on_step_end` that reports (steps done, total) and changes nothing."""

    def report(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        on_step(step + 1, total)
        return {}

    return report


def save_result(result: GenerateResult, settings: GenerateSettings, out: Path) -> list[Path]:
    """Write images (and overlays) under `out` only; names are built from safe characters."""
    files = []
    for index, image in enumerate(result.images):
        stem = f"{settings.masking}-seed{settings.seed}-{index}"
        files.append(_save(image, out, f"{stem}.png"))
        if settings.save_masks and result.masks is not None:
            for j, concept in enumerate(settings.concept):
                overlay = result.masks.overlay(image, sample=index, concept=j)
                files.append(_save(overlay, out, f"{stem}-mask{j}-{safe_name(getattr(concept, 'text', concept))}.png"))
    return files


def safe_name(text: str) -> str:
    """A file-name fragment of letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "concept"


def _save(image: Image.Image, out: Path, name: str) -> Path:
    path = out / name
    image.save(path)
    return path
