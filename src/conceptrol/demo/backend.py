"""What the web UI runs: one comparison (vanilla adapter vs Conceptrol) on a lazily loaded model (no gradio)."""

from __future__ import annotations

import gc
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from ..app.generate import PAPER_DEMO, GenerateSettings, run_conceptrol
from ..app.loading import guess_family
from ..app.settings import ModelSource
from ..core.concepts import Concept
from ..core.errors import ConceptrolError
from ..core.images import load_reference_image

Progress = Callable[[float, str], None]  # (fraction done, what is running)
# `conceptrol ui` options that point at local copies, named in "could not load" messages.
UI_FLAGS = {"model": "--model", "sd15": "--ip-adapter-repo", "sdxl": "--ip-adapter-repo", "flux": "--ominicontrol-repo"}


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the UI's model menu."""

    key: str  # preset name (sd15, sdxl, flux, flux-dev), hub id or local folder; or tiny-sd15 / tiny-flux
    label: str  # what the menu shows
    architecture: str  # sd15, sdxl, flux (OminiControl), flux-ip, flux-kontext or flux-redux: picks the defaults
    size: tuple[int, int]  # default (width, height)
    steps: int | None = None  # None = the paper's demo steps for the architecture
    concept_layer: str | None = None  # None = the architecture's preset layer
    condition_size: int | None = None  # OminiControl: the reference's square (None = 512); Kontext: its longer side

    @property
    def tiny(self) -> bool:
        return self.key.startswith("tiny-")

    def defaults(self) -> dict[str, float]:
        """Initial values of the scale, warm-up and steps controls."""
        paper = PAPER_DEMO[self.architecture]
        return dict(scale=paper["scale"], start=paper["start"], steps=self.steps or paper["steps"])


PRESET_CHOICES = {
    "sd15": ModelChoice("sd15", "Stable Diffusion 1.5 + IP-Adapter Plus", "sd15", (512, 512)),
    "sdxl": ModelChoice("sdxl", "SDXL + IP-Adapter Plus (ViT-H)", "sdxl", (1024, 1024)),
    "flux": ModelChoice("flux", "FLUX.1-schnell + OminiControl subject", "flux", (512, 512)),
    "flux-dev": ModelChoice("flux-dev", "FLUX.1-dev + OminiControl subject", "flux", (512, 512), steps=28),
    "flux-kontext": ModelChoice("flux-kontext", "FLUX.1 Kontext [dev]", "flux-kontext", (1024, 1024)),
}
DEMO_CHOICES = (  # offline, random weights: shows the whole path runs, not image quality
    ModelChoice("tiny-sd15", "tiny random SD 1.5 + IP-Adapter Plus (offline demo)", "sd15", (128, 96), steps=10),
    ModelChoice("tiny-flux", "tiny random FLUX + OminiControl LoRA (offline demo)", "flux", (128, 96), steps=8,
                concept_layer="transformer_blocks.1", condition_size=32),
    ModelChoice("tiny-flux-ip", "tiny random FLUX.1 + XLabs IP-Adapter (offline demo)", "flux-ip", (128, 96), steps=8),
    ModelChoice("tiny-flux-kontext", "tiny random FLUX.1 Kontext (offline demo)", "flux-kontext", (128, 96), steps=8,
                condition_size=32),
    ModelChoice("tiny-flux-redux", "tiny random FLUX.1 + Redux (offline demo)", "flux-redux", (128, 96), steps=8),
)


def model_choice(model: str) -> ModelChoice:
    """The menu entry for a preset name, a hub id or a local folder."""
    if model in PRESET_CHOICES:
        return PRESET_CHOICES[model]
    family = guess_family(model)
    size = {"sd15": (512, 512), "sdxl": (1024, 1024), "flux": (512, 512), "flux-kontext": (1024, 1024)}[family]
    return ModelChoice(model, model, family, size)


@dataclass(frozen=True)
class CompareRequest:
    """One click of Generate."""

    model: str  # a ModelChoice key
    prompt: str
    references: tuple[Path, ...]  # uploaded reference image files
    concepts: tuple[Concept, ...]  # one per reference
    scale: float
    start: float  # warm-up: fraction of steps before Conceptrol's adapter acts
    steps: int
    seed: int
    size: tuple[int, int]  # (width, height)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConceptrolError("type a prompt first")
        if not self.references:
            raise ConceptrolError("upload a reference image first")
        if len(self.concepts) != len(self.references):
            raise ConceptrolError(f"got {len(self.concepts)} concept(s) for {len(self.references)} reference image(s); "
                                  "pick one concept per reference")
        if self.steps < 1:
            raise ConceptrolError(f"steps must be at least 1, got {self.steps}")


@dataclass
class Comparison:
    """The page's three outputs: vanilla adapter, Conceptrol, and where each concept was found."""

    vanilla: Image.Image
    conceptrol: Image.Image
    overlays: list[tuple[Image.Image, str]]  # (mask over the Conceptrol image, concept label), one per reference
    seconds: float


def compare(pipe: Any, choice: ModelChoice, request: CompareRequest, references: list[Image.Image],
            progress: Progress) -> Comparison:
    """The vanilla adapter (same scale, no mask, no warm-up) and Conceptrol, with the same seed."""
    began = time.perf_counter()
    settings = GenerateSettings(
        prompt=request.prompt, concept=request.concepts, image=request.references, model=choice.key,
        scale=request.scale, start=request.start, steps=request.steps, seed=request.seed, size=request.size,
        concept_layer=choice.concept_layer, condition_size=choice.condition_size,
    )
    total = 2 * request.steps
    vanilla = run_conceptrol(pipe, replace(settings, masking="none", start=0.0), references,
                             on_step=lambda done, _: progress(done / total, "vanilla adapter"))
    ours = run_conceptrol(pipe, settings, references,
                          on_step=lambda done, steps: progress((steps + done) / total, "Conceptrol"))
    image = ours.images[0]
    overlays = [(ours.masks.overlay(image, sample=0, concept=j), f"mask of '{label}'")
                for j, label in enumerate(ours.masks.concepts[0])]
    return Comparison(vanilla.images[0], image, overlays, time.perf_counter() - began)


class LocalBackend:
    """The UI's `generate_fn`: loads the chosen model on first use, keeps one loaded, runs one request at a time."""

    def __init__(self, choices: list[ModelChoice] | tuple[ModelChoice, ...], device: str = "auto", dtype: str = "auto",
                 adapter_repos: dict[str, str] | None = None,
                 loader: Callable[[ModelChoice], Any] | None = None) -> None:
        self.choices = {choice.key: choice for choice in choices}
        self.device, self.dtype = device, dtype
        self.adapter_repos = adapter_repos or {}  # architecture -> hub id or local copy of the adapter repo
        self._load = loader or self._load_pipeline
        self._lock = threading.Lock()
        self.loaded: tuple[str, Any] | None = None  # (model key, pipeline)

    def __call__(self, request: CompareRequest, progress: Progress) -> Comparison:
        choice = self._choice(request.model)
        references = [load_reference_image(path) for path in request.references]  # bad files fail before loading
        if choice.architecture.startswith("flux") and len(references) != 1:
            raise ConceptrolError(f"the FLUX adapters take one reference image, got {len(references)}; "
                                  "remove the others or pick an SD model")
        with self._lock:
            pipe = self._pipeline(choice, progress)
            return compare(pipe, choice, request, references, progress)

    def _choice(self, key: str) -> ModelChoice:
        if key not in self.choices:
            raise ConceptrolError(f"unknown model {key!r}; choose one of {', '.join(self.choices)}")
        return self.choices[key]

    def _pipeline(self, choice: ModelChoice, progress: Progress) -> Any:
        if self.loaded is not None and self.loaded[0] == choice.key:
            return self.loaded[1]
        self.loaded = None  # drop the previous model before loading the next: one in memory at a time
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        progress(0.0, f"loading {choice.label}" + ("" if choice.tiny else " (the first time downloads its weights)"))
        pipe = self._load(choice)
        self.loaded = (choice.key, pipe)
        return pipe

    def _load_pipeline(self, choice: ModelChoice) -> Any:
        if choice.tiny:
            from ..app.offline_demo import tiny_pipeline

            return tiny_pipeline(choice.key.removeprefix("tiny-"))
        from ..app.generate import pipeline_for

        source = ModelSource(model=choice.key, device=self.device, dtype=self.dtype,
                             adapter_repo=self.adapter_repos.get(choice.architecture.split("-")[0]))
        return pipeline_for(source, flags=UI_FLAGS)
