"""What `conceptrol generate` (and the evaluation, the web UI) run: settings checked before anything heavy loads.

This module imports no torch, diffusers or transformers, so the command line answers `--help` and
argument mistakes at once.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..core.concepts import Concept
from ..core.config import check_fraction, check_window, check_window_steps
from ..core.errors import ConceptrolError

NEGATIVE_PROMPT = "deformed, ugly, wrong proportion, low res, bad anatomy, worst quality, low quality"
# The paper's demo settings (ALGORITHM.md): scale, warm-up start, steps, classifier-free guidance.
# For FLUX (no paper settings): the library's defaults (scale or reference strength c = 1, window [0, 1]) and the
# steps and guidance each adapter's own examples use.
PAPER_DEMO = {
    "sd15": dict(scale=1.5, start=0.2, steps=50, guidance=7.5),
    "sdxl": dict(scale=1.0, start=0.2, steps=50, guidance=6.0),
    "flux": dict(scale=1.0, start=0.0, steps=8, guidance=3.5),  # OminiControl on FLUX.1-schnell
    "flux-ip": dict(scale=1.0, start=0.0, steps=28, guidance=3.5),  # XLabs' IP-Adapter on FLUX.1-dev
    "flux-kontext": dict(scale=1.0, start=0.0, steps=28, guidance=2.5),  # FLUX.1 Kontext [dev]
    "flux-redux": dict(scale=1.0, start=0.0, steps=28, guidance=2.5),  # FLUX.1 Redux [dev] on FLUX.1-dev
    # Several references in one sequence (ALGORITHM.md section 6): reference strength c = 1, window [0, 1]
    "flux2-klein": dict(scale=1.0, start=0.0, steps=4, guidance=1.0),  # FLUX.2 [klein] 4B: step-distilled, no CFG
    "flux2-dev": dict(scale=1.0, start=0.0, steps=50, guidance=4.0),  # FLUX.2 [dev]: guidance-distilled
    "qwen-edit": dict(scale=1.0, start=0.0, steps=40, guidance=4.0),  # Qwen-Image-Edit-2509: true CFG 4
}
# The profiles whose pipelines take several references, each with its own concept or none (a global one).
MULTI_REFERENCE = ("flux2-klein", "flux2-dev", "qwen-edit")
QWEN_NEGATIVE_PROMPT = " "  # Qwen-Image-Edit's examples: true CFG with a blank negative prompt
PROFILE_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL", "flux": "OminiControl", "flux-ip": "XLabs' IP-Adapter",
                 "flux-kontext": "FLUX.1 Kontext", "flux-redux": "FLUX.1 Redux", "flux2-klein": "FLUX.2 [klein]",
                 "flux2-dev": "FLUX.2 [dev]", "qwen-edit": "Qwen-Image-Edit-Plus"}
# The offline models with random weights (demo, tests): name -> the profile it runs; `tiny` is tiny-sd15.
TINY_MODELS = {"tiny-sd15": "sd15", "tiny-flux": "flux", "tiny-flux-ip": "flux-ip", "tiny-flux-kontext": "flux-kontext",
               "tiny-flux-redux": "flux-redux", "tiny-flux2": "flux2-klein", "tiny-qwen-edit": "qwen-edit"}
TINY_ALIASES = {"tiny": "tiny-sd15"}
FLUX_CONDITION_SIZE = 512  # the subject_512 LoRA's resolution
MAX_SEED = 2**63 - 1
MAX_STEPS = 1000  # the schedulers' training timesteps: more steps cannot be taken
MAX_SIDE = 4096  # pixels; far beyond what SD 1.5, SDXL or FLUX.1 were trained for
DTYPES = ("auto", "fp32", "fp16", "bf16")
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")
DEVICE_ALIASES = {"gpu": "cuda", "nvidia": "cuda", "cuda0": "cuda:0", "metal": "mps", "apple": "mps"}


def tiny_profile(model: str) -> str | None:
    """The profile a tiny offline model runs (sd15, flux, flux-ip, ...), or None when `model` names another model."""
    return TINY_MODELS.get(TINY_ALIASES.get(model, model))


def resolve_concept_layer(value: str | None, flag: str = "--concept-layer") -> tuple[str | None, str | None]:
    """(layer, architecture) of a --concept-layer value: a name as given (architecture None), or `auto:PATH`, the best
    block of the analysis in PATH (an analysis.json, or the --out folder of `conceptrol analyze`) and its model's
    architecture."""
    if value is None or not value.startswith("auto:"):
        return value, None
    path = Path(value.removeprefix("auto:")).expanduser()
    path = path / "analysis.json" if path.is_dir() else path
    try:
        analysis = json.loads(path.read_text(encoding="utf-8"))
        best, architecture = analysis["best"], analysis["architecture"]
    except OSError:
        raise ConceptrolError(f"{flag} {value}: no analysis at {path}; run `conceptrol analyze ... --out DIR` and pass "
                              "auto:DIR") from None
    except (ValueError, KeyError, TypeError):
        raise ConceptrolError(f"{flag} {value}: {path} is not an analysis.json of `conceptrol analyze` (it needs "
                              "'best' and 'architecture')") from None
    return str(best), str(architecture)


GLOBAL_CONCEPT = "-"  # on the command line: this reference has no concept and stays global (FLUX.2, Qwen-Image-Edit)


def parse_concept(value: object) -> object:
    """`dog@2` is the second whole-word 'dog' of the prompt (Concept('dog', occurrence=1)); `-` is None (a reference
    that stays global); other values stay."""
    if value is None or value == GLOBAL_CONCEPT:
        return None
    match = re.fullmatch(r"(.*\S)\s*@\s*(\d+)", value) if isinstance(value, str) else None
    if match is None:
        return value
    text, number = match[1], int(match[2])
    if number < 1:
        raise ConceptrolError(f"concept {value!r}: occurrences count from 1 ({text}@2 is the second {text!r} of the "
                              "prompt)")
    return Concept(text, occurrence=number - 1)


def check_number(name: str, value: float | None, minimum: float = 0.0) -> None:
    """A finite number >= minimum (None passes: a default is used)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ConceptrolError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")


def check_seed(seed: int, name: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConceptrolError(f"{name} must be an integer from 0 to 2**63-1 ({MAX_SEED}), got {seed!r}")


def check_steps(steps: int | None, name: str = "steps") -> None:
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise ConceptrolError(f"{name} must be from 1 to {MAX_STEPS}, got {steps}")


def check_size(size: tuple[int, int] | None, multiple: int = 8, name: str = "size") -> None:
    """WIDTHxHEIGHT in multiples of `multiple`, at most MAX_SIDE a side; says what an absurd size would cost."""
    if size is None:
        return
    width, height = size
    if width > MAX_SIDE or height > MAX_SIDE:
        factor = width * height / 512**2
        raise ConceptrolError(
            f"{name} {width}x{height} is {width * height / 1e6:,.1f} megapixels, {factor:,.0f}x the pixels of 512x512: "
            f"each step would need about {factor**2:,.0f}x the self-attention work and {factor:,.0f}x the memory of a "
            f"512x512 image; use at most {MAX_SIDE} pixels a side"
        )
    if width < multiple or height < multiple or width % multiple or height % multiple:
        raise ConceptrolError(f"{name} must be WIDTHxHEIGHT in multiples of {multiple} pixels, got {width}x{height}")


def check_dtype(dtype: str, name: str = "dtype") -> None:
    if dtype not in DTYPES:
        close = difflib.get_close_matches(dtype.lower().replace("float", "fp").replace("bfloat", "bf"), DTYPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConceptrolError(f"{name} must be one of {', '.join(DTYPES)}, got {dtype!r}{hint}")


def check_device_name(device: str, name: str = "device") -> None:
    """auto, cpu, cuda, cuda:N, mps or xpu[:N] (written as torch writes devices); availability is checked on use."""
    if device == "auto":
        return
    match = re.fullmatch(r"([a-z]+)(?::(\d+))?", device)
    if match is None or match.group(1) not in DEVICE_TYPES or (match.group(1) in ("cpu", "mps") and match.group(2)):
        suggestion = DEVICE_ALIASES.get(device.lower())
        hint = f"; did you mean {suggestion!r}?" if suggestion else ""
        raise ConceptrolError(f"{name} must be auto, cpu, cuda, cuda:N, mps or xpu, got {device!r}{hint}")


@dataclass(frozen=True)
class ModelSource:
    """Which pipeline and adapter to load, and where to run it."""

    model: str = "sd15"  # preset (sd15, sdxl, flux, flux-dev), hub id or local folder
    adapter: str | None = None  # adapter variant (loading.ADAPTERS); None = plus (IP-Adapter) or subject (FLUX)
    adapter_repo: str | None = None  # hub id or local copy of h94/IP-Adapter or Yuanshi/OminiControl
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConceptrolError("model must name a preset (sd15, sdxl, flux, flux-dev), a hub id or a local folder")
        check_device_name(self.device)
        check_dtype(self.dtype)


@dataclass(frozen=True)
class GenerateSettings:
    """What `conceptrol generate` does; None fields take the paper's demo value for the architecture."""

    prompt: str
    concept: tuple  # one concept per reference image: a word or phrase, or a Concept for a repeat
    image: tuple[Path, ...]  # reference image files (one concept each: a word, or None for a global reference)
    model: str = "sd15"  # preset (sd15, sdxl, flux, flux-dev), hub id or local folder
    adapter: str | None = None  # adapter variant (loading.ADAPTERS); None = plus (IP-Adapter) or subject (FLUX)
    adapter_repo: str | None = None  # hub id or local copy of h94/IP-Adapter or Yuanshi/OminiControl
    masking: str = "global"  # global, local, or none (vanilla IP-Adapter / plain OminiControl)
    concept_layer: str | None = None  # None = the architecture's preset layer (block for FLUX); auto:DIR = an analysis'
    concept_layer_architecture: str | None = None  # set from `auto:DIR`: the architecture that analysis was made on
    scale: float | None = None
    start: float | None = None
    end: float = 1.0
    steps: int | None = None
    guidance: float | None = None  # None = the paper's value (SD) or the model's own (FLUX)
    negative_prompt: str | None = None  # None = the paper's negative prompt (SD only)
    seed: int = 0
    size: tuple[int, int] | None = None  # (width, height); None = the model's default (512x512 for FLUX)
    condition_size: int | None = None  # FLUX only: the reference's square size (None = 512, the LoRA's)
    num_images: int = 1
    device: str = "auto"
    dtype: str = "auto"
    out: Path = Path("outputs")
    save_masks: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ConceptrolError("the prompt is empty; pass --prompt with a text that names the subject")
        if len(self.concept) != len(self.image):
            raise ConceptrolError(
                f"got {len(self.concept)} concept(s) for {len(self.image)} reference image(s); "
                "pass one --concept per --reference (or --image), in the same order"
            )
        object.__setattr__(self, "concept", tuple(parse_concept(concept) for concept in self.concept))
        if self.concept_layer is not None and self.concept_layer.startswith("auto:"):
            layer, architecture = resolve_concept_layer(self.concept_layer)
            object.__setattr__(self, "concept_layer", layer)
            object.__setattr__(self, "concept_layer_architecture", architecture)
        if self.concept and all(concept is None for concept in self.concept):
            raise ConceptrolError("every --concept is '-' (global): give at least one reference a word of the prompt")
        for concept in self.concept:
            if isinstance(concept, str) and not re.search(r"\w", concept):
                raise ConceptrolError(f"concept {concept!r} has no word in it; pass the prompt's word for the subject")
        if self.masking not in ("global", "local", "none"):
            raise ConceptrolError(f"masking must be global, local or none, got {self.masking!r}")
        if self.save_masks and self.masking == "none":
            raise ConceptrolError("--save-masks needs a concept mask, and --masking none computes none; "
                                  "leave out --save-masks or use --masking global")
        for name in ("scale", "guidance"):
            check_number(name, getattr(self, name))
        check_fraction("end", self.end)
        if self.start is not None:  # the default start depends on the model: checked with it (check_resolved_window)
            check_window(self.start, self.end)
        check_steps(self.steps)
        check_seed(self.seed)
        check_size(self.size)
        if self.condition_size is not None and not 16 <= self.condition_size <= 2048:
            raise ConceptrolError(f"condition_size must be from 16 to 2048 pixels, got {self.condition_size}")
        if not 1 <= self.num_images <= 64:
            raise ConceptrolError(f"num_images must be from 1 to 64, got {self.num_images}")
        ModelSource(self.model, self.adapter, self.adapter_repo, self.device, self.dtype)

    @property
    def source(self) -> ModelSource:
        return ModelSource(self.model, self.adapter, self.adapter_repo, self.device, self.dtype)

    def replace(self, **changes: object) -> GenerateSettings:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return GenerateSettings(**values | changes)


def resolved_values(settings: GenerateSettings, profile: str) -> dict[str, Any]:
    """The settings that default per model and adapter (settings.PAPER_DEMO), filled in."""
    demo = PAPER_DEMO[profile]
    pick = lambda value, default: default if value is None else value  # noqa: E731
    negative = {"sd15": NEGATIVE_PROMPT, "sdxl": NEGATIVE_PROMPT, "qwen-edit": QWEN_NEGATIVE_PROMPT}.get(profile)
    return {"architecture": profile, "scale": pick(settings.scale, demo["scale"]),
            "start": pick(settings.start, demo["start"]), "steps": pick(settings.steps, demo["steps"]),
            "guidance": pick(settings.guidance, demo["guidance"]),
            "negative_prompt": None if negative is None else pick(settings.negative_prompt, negative),
            "condition_size": {"flux": pick(settings.condition_size, FLUX_CONDITION_SIZE),
                               "flux-kontext": settings.condition_size}.get(profile)}


def check_resolved_window(settings: GenerateSettings, profile: str) -> None:
    """The window with the model's default start filled in holds some of the steps it will run (else it never acts)."""
    values = resolved_values(settings, profile)
    start = values["start"]
    if settings.start is None and start >= settings.end:
        raise ConceptrolError(f"start ({start:g}, the default for {PROFILE_NAMES[profile]}) must be smaller than end "
                              f"({settings.end:g}): the adapter would never act; pass a smaller --start or a larger --end")
    check_window(start, settings.end)
    check_window_steps(start, settings.end, values["steps"])
